"""The optional dependency sets (pyproject's extras) and the one-line error when one is missing.

The base install serves exports (onnxruntime, tokenizers, numpy, fastapi, uvicorn); a command that
needs more checks here first and says which extra to install, before any work is done.
"""

from __future__ import annotations

import importlib.util

from .errors import AdaLoraDeployError

# extra -> the top-level modules it brings (what `find_spec` can see without importing them)
EXTRAS = {
    "train": ("torch", "transformers", "safetensors"),
    "export": ("torch", "transformers", "safetensors", "optimum", "onnx"),
    "all": ("torch", "transformers", "safetensors", "optimum", "onnx", "matplotlib"),
}


class MissingExtraError(AdaLoraDeployError):
    """A command needs packages that only an extra installs."""


def missing(modules: tuple[str, ...]) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def require(extra: str, what: str, modules: tuple[str, ...] | None = None) -> None:
    """Raise MissingExtraError, naming the extra to install, when `modules` (default: the extra's) are absent.

    Args:
        extra: "train", "export" or "all".
        what: the command or option that needs them, for the message.
        modules: the modules actually needed, when fewer than the whole extra.
    """
    absent = missing(modules or EXTRAS[extra])
    if absent:
        raise MissingExtraError(
            f"{what} needs {', '.join(absent)}, which this install lacks: pip install 'adalora-deploy[{extra}]'"
        )
