"""ONNX export of AdaLoRA checkpoints: merged and factored graphs (installed as adalora_deploy.exporters).

    from adalora_deploy.exporters import export
    export("checkpoint/", "onnx/", prune_ranks=True)   # -> onnx/merged/, onnx/factored/
"""

from .errors import ExportError, ExportValidationError
from .onnx_export import export

__all__ = ["ExportError", "ExportValidationError", "export"]
