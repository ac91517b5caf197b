"""ExportConfig: the options of `export()` and the `adalora-deploy export` flags, declared once.

Torch-free (the CLI builds its parser from it before torch is imported): `export()` takes these
fields as keyword arguments, with these defaults, and checks them when it runs (onnx_export.py).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from adalora_deploy.constants import ADAPTER_MODE, MODES, MULTI_MODE, TASK_IDS

EXPORT_MODES = (*MODES, "both", ADAPTER_MODE, MULTI_MODE)
EXPORT_TASKS = TASK_IDS


@dataclass
class ExportConfig:
    """How to export, one field per `adalora-deploy export` flag (each field's help is its flag's)."""

    prune_ranks: bool = field(default=False, metadata={
        "help": "drop masked triplets and slice P/Q to each module's effective rank; rank-0 modules lose their "
        "branch"})
    mode: str = field(default="both", metadata={
        "help": "which graphs to write (default: both); adapter: an adapter pack of CHECKPOINT (needs "
        "--prune-ranks) written into OUT; multi: OUT/multi/, one base graph that serves many adapter packs "
        "(CHECKPOINT may then be a base model path)", "choices": EXPORT_MODES})
    dtype: str = field(default="fp32", metadata={"help": "weight dtype; fp16 is meant for GPUs",
                                                 "choices": ("fp32", "fp16")})
    opset: int | None = field(default=None, metadata={
        "help": "ONNX opset (default: Optimum's recommendation for the architecture, at least 17)"})
    optimize: bool = field(default=True, metadata={
        "help": "apply ONNX Runtime's transformer fusions and record the fused-op counts (default: on)",
        "action": argparse.BooleanOptionalAction})
    task: str | None = field(default=None, metadata={
        "help": f"task to export: {', '.join(EXPORT_TASKS)} (default: the checkpoint's)"})
    base: str | None = field(default=None, metadata={
        "help": "override the base model the checkpoint names", "metavar": "PATH_OR_ID"})
    overwrite: bool = field(default=False, metadata={"help": "replace a non-empty --out"})
    quantize: str | None = field(default=None, metadata={
        "help": "int8: ONNX Runtime's dynamic quantization of the fused graph for CPU serving (int8 weights per "
        "channel, activations quantized at run time), judged by accuracy on labelled data", "choices": ("int8",)})
    eval_data: str | None = field(default=None, metadata={
        "help": "labelled CSV/JSONL (text, label[, text_pair]) the int8 graph is judged on (default: the "
        "checkpoint's held-out split when its data is known; refused otherwise)", "metavar": "FILE"})
    max_accuracy_drop: float = field(default=1.0, metadata={
        "help": "most accuracy points int8 may lose against fp32; beyond it nothing is written "
        "(default: %(default)s)", "metavar": "POINTS"})
    quantize_branches: bool | None = field(default=None, metadata={
        "help": "factored int8: quantize the low-rank branch MatMuls too (default: yes; on MiniLM it was as "
        "accurate as fp32 branches and 8%% faster at batch 32; docs/quantization.md)",
        "action": argparse.BooleanOptionalAction})
    # Python only: the command always validates.
    validate: bool = field(default=True, metadata={
        "help": "check every graph against PyTorch and raise ExportValidationError on any failure", "flag": False})
