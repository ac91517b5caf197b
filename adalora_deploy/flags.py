"""Command-line flags generated from config dataclasses: each setting is declared once, on its field.

A field becomes the flag `--field-name`; what the flag needs beyond the field's type and default is
plain data in the field's metadata (PEFT's style), so the config modules stay free of argparse:

    lr: float = field(default=5e-3, metadata={"help": "AdamW learning rate (default: %(default)s)"})

Metadata keys: "help" (required), "type" (a parse function, for types other than int/float/str),
"choices", "metavar", "action" (bools are store_true unless given), "required" (a required flag keeps
the field's default for Python callers), and "flag": False for a field that is Python-only.
Torch-free and standard-library only: the CLI builds its parsers with it before any stage is imported.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Iterator

# Annotations as written in the config modules (they use `from __future__ import annotations`).
SCALARS: dict[str, Callable] = {"int": int, "float": float, "str": str, "bool": bool}
PASSED_THROUGH = ("choices", "metavar", "action", "required")


def int_list(text: str) -> list[int]:
    """"1,8,32" -> [1, 8, 32] (integers >= 1), with an error that shows the form."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, e.g. 1,8,32") from err
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give integers >= 1, e.g. 1,8,32")
    return values


def name_list(text: str) -> list[str]:
    """"query,value" or "query value" -> ["query", "value"]."""
    return [name for name in text.replace(",", " ").split() if name]


def flag_fields(config_cls) -> Iterator[dataclasses.Field]:
    """The fields of `config_cls` that are command-line flags (all but metadata "flag": False)."""
    return (f for f in dataclasses.fields(config_cls) if f.metadata.get("flag", True))


def flag_name(f: dataclasses.Field) -> str:
    return "--" + f.name.replace("_", "-")


def field_default(f: dataclasses.Field):
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def _parse_function(f: dataclasses.Field) -> Callable:
    if "type" in f.metadata:
        return f.metadata["type"]
    annotation = (f.type if isinstance(f.type, str) else f.type.__name__).removesuffix(" | None")
    if annotation not in SCALARS:
        raise TypeError(f"field {f.name} ({f.type}) needs a parse function: metadata={{'type': ...}}")
    return SCALARS[annotation]


def flag_options(f: dataclasses.Field) -> dict:
    """argparse keyword arguments of the field's flag."""
    if "help" not in f.metadata:
        raise TypeError(f"field {f.name} has no help: field(metadata={{'help': ...}})")
    options = {"help": f.metadata["help"], "default": field_default(f)}
    options.update((k, f.metadata[k]) for k in PASSED_THROUGH if k in f.metadata)
    parse = _parse_function(f)
    if parse is bool:
        options.setdefault("action", "store_true")
    elif parse is not str and "action" not in options:
        options["type"] = parse
    if options.get("required"):
        del options["default"]
    return options


def add_config_flags(parser: argparse.ArgumentParser, config_cls, skip: tuple[str, ...] = ()) -> None:
    """Add one flag per field of the dataclass `config_cls` (in field order), except those in `skip`."""
    for f in flag_fields(config_cls):
        if f.name not in skip:
            parser.add_argument(flag_name(f), **flag_options(f))


def config_kwargs(args: argparse.Namespace, config_cls) -> dict:
    """The parsed values of `config_cls`'s flags, by field name: `config_cls(**config_kwargs(args, cls))`."""
    return {f.name: getattr(args, f.name) for f in flag_fields(config_cls) if hasattr(args, f.name)}


def borrow(config_cls, name: str, as_name: str | None = None, default=dataclasses.MISSING,
           help: str | None = None) -> tuple:
    """Field `name` of `config_cls`, as a (name, type, Field) of another config (dataclasses.make_dataclass):
    same type, parsing and help; `as_name`, `default` and `help` replace the source's where they differ."""
    source = next(f for f in dataclasses.fields(config_cls) if f.name == name)
    metadata = {**source.metadata, **({"help": help} if help is not None else {})}
    if default is dataclasses.MISSING and source.default_factory is not dataclasses.MISSING:
        new = dataclasses.field(default_factory=source.default_factory, metadata=metadata)
    else:
        new = dataclasses.field(default=source.default if default is dataclasses.MISSING else default, metadata=metadata)
    return as_name or name, source.type, new


class LazyParser(argparse.ArgumentParser):
    """A subcommand's parser that adds its flags when first used: building the CLI then imports no
    command's config module (the server's pulls in FastAPI, the bench's numpy)."""

    def __init__(self, *args, **kwargs):
        self._add_flags: Callable | None = None
        super().__init__(*args, **kwargs)

    def _ready(self) -> None:
        if self._add_flags is not None:
            add, self._add_flags = self._add_flags, None
            add(self)

    def parse_known_args(self, args=None, namespace=None):
        self._ready()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._ready()
        return super().format_help()

    def format_usage(self) -> str:
        self._ready()
        return super().format_usage()


def add_flags_later(parser: argparse.ArgumentParser, add: Callable[[argparse.ArgumentParser], None]):
    """Call `add(parser)` when the parser is first used (a LazyParser), else now; returns `parser`."""
    if isinstance(parser, LazyParser):
        parser._add_flags = add
    else:
        add(parser)
    return parser
