"""Each setting is declared once, on its config field: every field is a flag of its command, with the
field's help and default, and the flags build the config back (adalora_deploy/flags.py)."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from adalora_deploy import flags
from adalora_deploy.bench.run import BenchConfig
from adalora_deploy.commands import bench, demo, export, serve, train
from adalora_deploy.demo import BENCH_FIELDS, DEMO_DEFAULTS, DEMO_HELP, TRAIN_FIELDS, DemoConfig
from adalora_deploy.exporters.options import ExportConfig
from adalora_deploy.runtime.server import ServerConfig
from adalora_deploy.train_config import TrainConfig

# (command module, its config, the arguments a parse needs, the config those defaults must build)
COMMANDS = {
    "train": (train, TrainConfig, ["--out", "x"], {"out": "x"}),
    "bench": (bench, BenchConfig, ["some-dir"], {}),
    "demo": (demo, DemoConfig, [], {}),
    "serve": (serve, ServerConfig, ["some-dir"], {}),
    "export": (export, ExportConfig, ["ckpt", "--out", "o"], {}),
}
# Fields set from Python only, on purpose: nothing else may lack a flag.
PYTHON_ONLY = {("BenchConfig", "seed"), ("DemoConfig", "progress"), ("ExportConfig", "validate")}
# The public flags of each command (users' scripts depend on these names).
PUBLIC_FLAGS = {
    "train": "--model --data --eval-data --steps --batch-size --lr --max-length --seed --init-r --target-r --alpha "
             "--tinit --tfinal --delta-t --orth-reg --importance --target-modules --modules-to-save --task --out "
             "--overwrite --threads",
    "bench": "--batch-sizes --seq-lens --adapters --runs --warmup --provider --threads --dtype --int8 --eval-data "
             "--json --markdown --plot --overwrite",
    "demo": "--out --overwrite --model --data --steps --batch-size --lr --max-length --seed --init-r --target-r "
            "--alpha --threads --bench-batch-sizes --bench-seq-lens --bench-runs --provider --fast",
    "serve": "--mode --adapters --adapter-root --host --port --provider --threads --max-batch-size --max-wait-ms "
             "--max-texts --max-chars --max-queue-texts --max-queue-tokens --max-batch-tokens --request-timeout "
             "--body-timeout --log-level",
    "export": "--out --prune-ranks --mode --dtype --opset --optimize --no-optimize --task --base --overwrite "
              "--quantize --eval-data --max-accuracy-drop --quantize-branches --no-quantize-branches",
}


def command_parser(module) -> argparse.ArgumentParser:
    return module.add_parser(argparse.ArgumentParser().add_subparsers())


def options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {s: a for a in parser._actions for s in a.option_strings if s not in ("-h", "--help")}


@pytest.mark.parametrize("command", COMMANDS)
def test_every_field_is_a_flag_with_its_help_and_default(command):
    module, config_cls, _, _ = COMMANDS[command]
    by_flag = options(command_parser(module))
    for f in dataclasses.fields(config_cls):
        if (config_cls.__name__, f.name) in PYTHON_ONLY:
            assert f.metadata["flag"] is False and f.metadata["help"]
            assert flags.flag_name(f) not in by_flag
            continue
        action = by_flag.get(flags.flag_name(f))
        assert action is not None, f"{config_cls.__name__}.{f.name} has no flag in `{command}`"
        assert action.dest == f.name
        assert f.metadata.get("help") and action.help == f.metadata["help"], f.name
        if action.required:
            assert f.metadata["required"] is True
        else:
            assert action.default == flags.field_default(f), f.name


@pytest.mark.parametrize("command", COMMANDS)
def test_public_flag_names_stay(command):
    module = COMMANDS[command][0]
    assert set(options(command_parser(module))) == set(PUBLIC_FLAGS[command].split())


@pytest.mark.parametrize("command", COMMANDS)
def test_default_flags_build_the_default_config(command):
    module, config_cls, argv, required = COMMANDS[command]
    args = command_parser(module).parse_args(argv)
    assert config_cls(**flags.config_kwargs(args, config_cls)) == config_cls(**required)


def test_export_takes_the_export_config_fields_with_their_defaults():
    import inspect

    from adalora_deploy.exporters import export as export_function

    keywords = {name: p.default for name, p in inspect.signature(export_function).parameters.items()
                if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert keywords == {f.name: flags.field_default(f) for f in dataclasses.fields(ExportConfig)}


def test_demo_config_is_train_and_bench_fields_with_documented_defaults():
    """The demo's own defaults are these and only these (DEMO_DEFAULTS); every other borrowed field has
    the type, parsing, help and default of train's or bench's field."""
    assert DEMO_DEFAULTS == {"steps": None, "lr": 1e-2, "alpha": 96.0, "bench_runs": None}
    demo_fields = {f.name: f for f in dataclasses.fields(DemoConfig)}
    sources = [(TrainConfig, {n: n for n in TRAIN_FIELDS}), (BenchConfig, BENCH_FIELDS)]
    for config_cls, names in sources:
        source = {f.name: f for f in dataclasses.fields(config_cls)}
        for demo_name, name in names.items():
            mine, theirs = demo_fields[demo_name], source[name]
            assert mine.type == theirs.type, demo_name
            assert mine.metadata.get("type") is theirs.metadata.get("type"), demo_name
            assert mine.metadata["help"] == DEMO_HELP.get(demo_name, theirs.metadata["help"]), demo_name
            expected = DEMO_DEFAULTS.get(demo_name, flags.field_default(theirs))
            assert flags.field_default(mine) == expected, demo_name
    resolved = DemoConfig()
    assert (resolved.steps, resolved.bench_runs, resolved.lr, resolved.alpha) == (TrainConfig.steps, 20, 1e-2, 96.0)


def test_list_flags_parse_as_the_field_declares():
    args = command_parser(demo).parse_args(["--bench-batch-sizes", "1,8", "--bench-seq-lens", "16"])
    assert (args.bench_batch_sizes, args.bench_seq_lens) == ([1, 8], [16])
    args = command_parser(train).parse_args(["--out", "x", "--target-modules", "query, value"])
    assert args.target_modules == ["query", "value"]


def test_a_field_without_help_or_parser_is_refused():
    @dataclasses.dataclass
    class NoHelp:
        size: int = 1

    @dataclasses.dataclass
    class NoParser:
        sizes: list[int] = dataclasses.field(default_factory=list, metadata={"help": "sizes"})

    for config_cls, message in ((NoHelp, "has no help"), (NoParser, "needs a parse function")):
        with pytest.raises(TypeError, match=message):
            flags.add_config_flags(argparse.ArgumentParser(), config_cls)


def test_the_cli_adds_a_command_s_flags_only_when_it_is_used():
    from adalora_deploy.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert all(commands[name]._add_flags is not None for name in COMMANDS)  # no config module imported yet
    assert parser.parse_args(["serve", "d", "--port", "9"]).port == 9
    assert commands["serve"]._add_flags is None and commands["train"]._add_flags is not None
    assert "--max-length" in commands["train"].format_help()


HELP_WITHOUT_EXTRAS = """
import argparse, sys
for name in ("torch", "transformers", "optimum", "onnx", "safetensors", "matplotlib"):
    sys.modules[name] = None  # importing it raises ImportError, as in the serving-only install
from adalora_deploy.cli import COMMANDS, build_parser
parser = build_parser()
commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
print(sum("--" in commands[name].format_help() for name in COMMANDS))
"""


def test_every_command_s_flags_build_without_the_extras():
    """The config modules the flags come from are torch-free: the base install parses every command and
    can then say which extra a command needs (tests/test_extras.py)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", HELP_WITHOUT_EXTRAS], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "6"
