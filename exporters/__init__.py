"""ONNX export of AdaLoRA checkpoints: merged and factored graphs (installed as adalora_deploy.exporters).

    from adalora_deploy.exporters import export
    export("checkpoint/", "onnx/", prune_ranks=True)   # -> onnx/merged/, onnx/factored/
"""

from .errors import ExportError, ExportValidationError
from .options import ExportConfig

__all__ = ["ExportConfig", "ExportError", "ExportValidationError", "export"]


def __getattr__(name: str):
    # `export` imports torch, Optimum and onnx: loaded on first use, so that the CLI can read ExportConfig
    # (the `export` flags) from an install without them and name the extra to install.
    if name == "export":
        from .onnx_export import export

        return export
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
