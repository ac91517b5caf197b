"""The graphs `bench` compares, each behind one `forward(feeds)` call.

From a checkpoint everything is exported into a work directory: merged and factored (pruned),
factored unpruned, the base model without adapter, and Optimum's plain export of the merged model.
From an export directory, what is there is measured, plus PyTorch when the source checkpoint is found.
"""

from __future__ import annotations

import inspect
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from adalora_deploy.constants import ADAPTER_FILE, FINGERPRINT_FILE, MODEL_FILE, MODES
from adalora_deploy.constants import CHECKPOINT_CONFIG_FILE as CHECKPOINT_CONFIG
from adalora_deploy.constants import MODEL_CONFIG_FILE as CONFIG_FILE
from adalora_deploy.errors import CheckpointError
from adalora_deploy.io import read_json
from adalora_deploy.runtime.session import OrtSession, SessionConfig, open_session, read_manifest

# Variant names, in the order they are reported; "merged" is the reference for ratios.
VARIANTS = (
    "pytorch", "onnx_base", "merged", "factored_pruned", "factored_unpruned", "optimum_plain",
    "merged_int8", "factored_int8", "optimum_int8",
)
INT8_VARIANTS = ("merged_int8", "factored_int8", "optimum_int8")
DESCRIPTIONS = {
    "pytorch": "PyTorch eager, masked unpruned SVD adapter (what training produced)",
    "onnx_base": "ONNX base model without adapter (every triplet pruned, same exporter as merged)",
    "merged": "ONNX merged graph, pruned adapter folded into W0 (export default)",
    "factored_pruned": "ONNX factored graph, low-rank branch with pruned triplets removed",
    "factored_unpruned": "ONNX factored graph, low-rank branch keeping all init_r triplets",
    "optimum_plain": "Optimum's plain ONNX export of the same merged model (no ORT transformer optimisation)",
    "merged_int8": "ONNX merged graph, pruned, int8 (export --quantize int8: ORT dynamic quantization after fusion)",
    "factored_int8": "ONNX factored graph, pruned, int8 (export --quantize int8, branches int8)",
    "optimum_int8": "Optimum's int8 path: ORTQuantizer, AutoQuantizationConfig.avx512_vnni(is_static=False, "
    "per_channel=True), on Optimum's plain export of the same merged model",
}
# bench's int8 exports are for timing: the accuracy gate is left open, its figures are reported instead
BENCH_MAX_ACCURACY_DROP = 100.0

ExportFn = Callable[..., Path]


@dataclass
class Variant:
    """One graph under test: `forward(feeds)` runs it once on host arrays and returns when done."""

    name: str
    forward: Callable[[dict[str, np.ndarray]], object]
    provider: str
    path: str | None = None

    @property
    def description(self) -> str:
        return DESCRIPTIONS[self.name]


def is_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / CHECKPOINT_CONFIG).is_file()


def onnx_variant(name: str, model_dir: Path, config: SessionConfig) -> Variant:
    session: OrtSession = open_session(model_dir, config)
    return Variant(name, session.run, session.provider, str(model_dir))


def pytorch_variant(model, checkpoint: Path, device: str = "cpu", fp16: bool = False) -> Variant:
    """The eager AdaLoraModel: masked, unpruned triplets, exactly as training left them.

    Args:
        model: the AdaLoraModel loaded from `checkpoint`.
        checkpoint: where it came from (reported).
        device: "cpu" or "cuda".
        fp16: run in half precision (CUDA only).
    """
    import torch

    model = model.eval().to(device)
    model = model.half() if fp16 else model
    accepted = set(inspect.signature(model.model.forward).parameters)

    def forward(feeds: dict[str, np.ndarray]):
        with torch.inference_mode():
            out = model(**{k: torch.from_numpy(v).to(device) for k, v in feeds.items() if k in accepted})
            if device != "cpu":
                torch.cuda.synchronize()  # the clock must see the kernels finish
        return out

    provider = "torch-cuda" if device != "cpu" else "torch-cpu"
    return Variant("pytorch", forward, provider, str(checkpoint))


def zero_adapter_checkpoint(checkpoint: Path, out: Path) -> Path:
    """A copy of `checkpoint` with every triplet pruned (lam = 0, mask = False).

    Exported merged, it is W0 with the same head: the base model, through the same exporter and
    optimiser as the merged graph, so that the two differ only in the weights' values.
    """
    from safetensors.torch import save_file

    from adalora_deploy.io import load_safetensors, write_json

    shutil.copytree(checkpoint, out)
    state = load_safetensors(checkpoint / ADAPTER_FILE, "adapter weights")
    for key, tensor in state.items():
        if key.endswith((".lam", ".mask")):
            state[key] = tensor.new_zeros(tensor.shape)
    save_file(state, str(out / ADAPTER_FILE))
    meta = read_json(checkpoint / CHECKPOINT_CONFIG, "checkpoint config")
    meta["ranks"] = {name: 0 for name in meta.get("ranks", {})}
    meta["budget"] = 0
    meta["adapter_params_after"] = 0
    # Not the trained model any more: its reload fingerprint would (rightly) refuse the export.
    (out / FINGERPRINT_FILE).unlink(missing_ok=True)
    meta.pop("fingerprint", None)
    write_json(out / CHECKPOINT_CONFIG, meta)
    return out


def optimum_plain_export(checkpoint: Path, out: Path, opset: int | None = None, fp16: bool = False) -> Path:
    """Optimum's plain ONNX export (no ORT transformer optimisation) of the merged PyTorch model.

    Args:
        checkpoint: the AdaLoRA checkpoint.
        out: the directory to write.
        opset: the opset of our own export, so that the two graphs differ only in optimisation.
        fp16: export in half precision (traced on CUDA, as Optimum requires for fp16).
    """
    from optimum.exporters.onnx import onnx_export_from_model

    from adalora_deploy.exporters.specs import TASKS
    from adalora_deploy.layers import merge_adapters
    from adalora_deploy.model import AdaLoraModel

    adapted = AdaLoraModel.from_pretrained(checkpoint).eval()
    merged = merge_adapters(adapted.model)  # plain transformers model, adapter folded into W0
    device = "cuda" if fp16 else "cpu"
    merged = merged.half().to(device) if fp16 else merged
    onnx_export_from_model(
        merged, out, task=TASKS[adapted.task].optimum_task, opset=opset, do_validation=False, optimize=None,
        device=device,
    )
    return out


def optimum_int8_export(plain: Path, out: Path) -> Path:
    """Optimum's own dynamic int8 quantization of its plain export (what an Optimum user would run).

    Args:
        plain: the directory of `optimum_plain_export`.
        out: the directory to write; its model is renamed model.onnx, as the other variants'.
    """
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    config = AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=True)
    ORTQuantizer.from_pretrained(plain).quantize(save_dir=out, quantization_config=config, file_suffix="quantized")
    (out / "model_quantized.onnx").rename(out / MODEL_FILE)
    return out


def default_export() -> ExportFn:
    from adalora_deploy.exporters import export

    return export


def export_all(
    checkpoint: Path, workdir: Path, dtype: str = "fp32", export_fn: ExportFn | None = None, int8: bool = False,
    eval_data: str | None = None,
) -> dict:
    """Export every ONNX variant of `checkpoint` under `workdir`; returns {variant name: model dir}.

    Args:
        checkpoint: an AdaLoRA checkpoint directory.
        workdir: an empty scratch directory.
        dtype: "fp32" or "fp16", passed to the exporter.
        export_fn: the exporter (adalora_deploy.exporters.export by default).
        int8: also export merged_int8, factored_int8 (ours) and optimum_int8 (Optimum's quantizer).
        eval_data: labelled rows for our int8 export's evaluation (None: the checkpoint's held-out split).
    """
    export_fn = export_fn or default_export()
    pruned = export_fn(checkpoint, workdir / "pruned", mode="both", prune_ranks=True, dtype=dtype)
    unpruned = export_fn(checkpoint, workdir / "unpruned", mode="factored", prune_ranks=False, dtype=dtype)
    zero = zero_adapter_checkpoint(checkpoint, workdir / "zero-adapter-checkpoint")
    base = export_fn(zero, workdir / "base", mode="merged", prune_ranks=True, dtype=dtype)
    opset = (read_manifest(Path(pruned) / "merged") or {}).get("opset")
    plain = optimum_plain_export(checkpoint, workdir / "optimum-plain", opset=opset, fp16=dtype == "fp16")
    dirs = {
        "onnx_base": Path(base) / "merged",
        "merged": Path(pruned) / "merged",
        "factored_pruned": Path(pruned) / "factored",
        "factored_unpruned": Path(unpruned) / "factored",
        "optimum_plain": Path(plain),
    }
    if int8:
        q = export_fn(checkpoint, workdir / "int8", mode="both", prune_ranks=True, quantize="int8",
                      eval_data=eval_data, max_accuracy_drop=BENCH_MAX_ACCURACY_DROP)
        dirs.update(merged_int8=Path(q) / "merged", factored_int8=Path(q) / "factored",
                    optimum_int8=optimum_int8_export(Path(plain), workdir / "optimum-int8"))
    return dirs


def factored_name(manifest: dict | None) -> str:
    """factored_pruned or factored_unpruned, from what the manifest says about pruning."""
    manifest = manifest or {}
    if "pruned" in manifest:
        return "factored_pruned" if manifest["pruned"] else "factored_unpruned"
    before, after = manifest.get("ranks_before") or {}, manifest.get("ranks_after") or {}
    return "factored_pruned" if before and after != before else "factored_unpruned"


def dirs_in_export(path: Path) -> dict:
    """{variant name: model dir} for an export root or a single mode directory."""
    if (path / MODEL_FILE).is_file():
        candidates = [path]
    else:
        candidates = [path / m for m in MODES if (path / m / MODEL_FILE).is_file()]
    if not candidates:
        raise CheckpointError(
            f"{path} is neither a checkpoint (no {CHECKPOINT_CONFIG}) nor an export directory (no {MODEL_FILE}, "
            "merged/ or factored/): pass one of those"
        )
    found = {}
    for model_dir in candidates:
        manifest = read_manifest(model_dir) or {}
        mode = manifest.get("mode", model_dir.name)
        if manifest.get("quantization"):
            found[f"{mode}_int8"] = model_dir
        else:
            found["merged" if mode == "merged" else factored_name(manifest)] = model_dir
    return found


def source_checkpoint(model_dirs: dict) -> Path | None:
    """The checkpoint an export came from, when its manifest names one that still exists."""
    for model_dir in model_dirs.values():
        manifest = read_manifest(model_dir) or {}
        source = manifest.get("source")
        value = source.get("path") if isinstance(source, dict) else None
        if isinstance(value, str) and is_checkpoint(value):
            return Path(value)
    return None


def model_config(model_dirs: dict) -> dict:
    """The transformers config.json shared by the exported graphs."""
    first = next(iter(model_dirs.values()))
    return read_json(Path(first) / CONFIG_FILE, "model config") if (Path(first) / CONFIG_FILE).is_file() else {}
