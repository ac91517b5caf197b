"""`adalora-deploy export CHECKPOINT --out OUT`: merged and/or factored ONNX graphs, validated against PyTorch."""

from __future__ import annotations

import argparse

from adalora_deploy.flags import add_config_flags, add_flags_later, config_kwargs


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "export",
        help="export a checkpoint (ours or a PEFT AdaLoRA adapter) to merged and factored ONNX graphs",
        description="Export CHECKPOINT to OUT/merged/ and OUT/factored/ (ONNX model directories loadable by "
        "ONNX Runtime, Optimum's ORTModel classes and transformers pipelines), each validated against PyTorch.",
    )
    return add_flags_later(p, add_flags)


def add_flags(p: argparse.ArgumentParser) -> None:
    from adalora_deploy.exporters.options import ExportConfig

    p.add_argument("checkpoint", help="checkpoint directory from `adalora-deploy train`, or a PEFT AdaLoRA adapter "
                   "directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--out", required=True, help="export directory (must be empty or absent unless --overwrite)")
    add_config_flags(p, ExportConfig)


def _show_progress() -> None:
    """Step lines on the current stderr (re-bound on every run, so repeated calls in one process work)."""
    import logging
    import sys

    logger = logging.getLogger("adalora_deploy.export")
    for old in [h for h in logger.handlers if getattr(h, "_adalora_progress", False)]:
        logger.removeHandler(old)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[export] %(message)s"))
    handler._adalora_progress = True
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def run(args: argparse.Namespace) -> int:
    from adalora_deploy.extras import require

    require("export", "export")
    from adalora_deploy.exporters import ExportConfig, export

    _show_progress()
    out = export(args.checkpoint, args.out, **config_kwargs(args, ExportConfig))
    print(out)
    return 0
