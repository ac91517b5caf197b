"""ONNX export of AdaLoRA checkpoints: merged and factored graphs (installed as adalora_deploy.exporters)."""
