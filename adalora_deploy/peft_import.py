"""Import of PEFT AdaLoRA adapters (adapter_config.json + adapter_model.safetensors) as an AdaLoraModel.

What PEFT 0.21 saves and how its loaded model computes (read from peft/tuners/adalora):
- Per adapted module: lora_A (r, d_in), lora_E (r, 1), lora_B (d_out, r); they map to Q, lam, P.
- With a `rank_pattern` (module -> init_r booleans, True = kept), the saved tensors hold only the kept
  triplets, in order; a module whose pattern is all True is saved unsliced.
- The loaded layer adds lora_alpha / (ranknum + 1e-5) * B (A * E) x, where ranknum stays init_r after
  the resize by rank_pattern (for modules left with rank >= 1). So s = lora_alpha / (init_r + 1e-5),
  not exactly alpha / init_r; we keep PEFT's value.
- modules_to_save (the task head) are saved under their module paths.

The dropped triplets are gone from the file; they come back here as zero triplets with mask False,
so the adapter has init_r triplets per module like a checkpoint of ours, and pruning drops them.
Only AdaLoRA is accepted: a plain LoRA adapter is refused, not imported as rank-fixed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import AdaLoraConfig
from .constants import (
    CAUSAL_LM,
    FEATURE_EXTRACTION,
    LABELLED_TASKS,
    PEFT_CONFIG_FILE,
    PEFT_WEIGHTS_FILE,
    QUESTION_ANSWERING,
    SEQUENCE_CLASSIFICATION,
    TOKEN_CLASSIFICATION,
)
from .errors import CheckpointError
from .io import load_safetensors, read_json

PEFT_PREFIX = "base_model.model."
RANKNUM_EPS = 1e-5  # PEFT divides by (ranknum + 1e-5)
PEFT_TASKS = {
    "SEQ_CLS": SEQUENCE_CLASSIFICATION, "FEATURE_EXTRACTION": FEATURE_EXTRACTION,
    "TOKEN_CLS": TOKEN_CLASSIFICATION, "QUESTION_ANS": QUESTION_ANSWERING, "CAUSAL_LM": CAUSAL_LM,
}
# Tasks whose head is newly initialised on the base model, so PEFT must have saved it (modules_to_save).
HEADED_TASKS = (SEQUENCE_CLASSIFICATION, TOKEN_CLASSIFICATION, QUESTION_ANSWERING)
PEFT_TO_TRIPLET = {"lora_A": "Q", "lora_E": "lam", "lora_B": "P"}


def is_peft_adapter(path: str | os.PathLike) -> bool:
    return (Path(path) / PEFT_CONFIG_FILE).is_file()


@dataclass
class PeftAdapter:
    """A PEFT AdaLoRA adapter in our checkpoint's tensor layout.

    Attributes:
        config: adapter_config.json as read.
        tensors: NAME.P (d_out, init_r), NAME.lam (init_r), NAME.Q (init_r, d_in), NAME.mask (init_r)
            per adapted module, and the modules_to_save tensors, by module path in the transformers model.
        modules: adapted module paths, in file order.
        head_modules: module paths of the saved modules_to_save.
        task: our task name.
        scaling: s as PEFT's loaded model applies it.
    """

    config: dict
    tensors: dict[str, torch.Tensor]
    modules: list[str]
    head_modules: list[str]
    task: str
    scaling: float

    @property
    def init_r(self) -> int:
        return int(self.config["init_r"])


def _check_config(config: dict, path: Path) -> None:
    peft_type = config.get("peft_type")
    if peft_type != "ADALORA":
        raise CheckpointError(
            f"{path} is a PEFT {peft_type} adapter; only AdaLoRA adapters (peft_type ADALORA) can be exported "
            "(plain LoRA is refused, not treated as rank-fixed): merge it with PEFT's merge_and_unload() "
            "and export the merged model with optimum-cli"
        )
    unsupported = {
        "bias": config.get("bias", "none") != "none",
        "use_dora": bool(config.get("use_dora")),
        "layer_replication": bool(config.get("layer_replication")),
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise CheckpointError(f"{path}: PEFT options {', '.join(bad)} are not supported by the export; re-train without them")
    if int(config.get("init_r", 0)) < 1:
        raise CheckpointError(f"{path}: init_r must be >= 1, got {config.get('init_r')!r}")


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    weights = path / PEFT_WEIGHTS_FILE
    if not weights.is_file() and (path / "adapter_model.bin").is_file():
        raise CheckpointError(
            f"{path} has adapter_model.bin only; pickled weights are not loaded: re-save the adapter with "
            "save_pretrained(..., safe_serialization=True)"
        )
    state = load_safetensors(weights, "PEFT adapter weights")
    outside = [k for k in state if not k.startswith(PEFT_PREFIX)]
    if outside:
        raise CheckpointError(f"{weights}: unexpected keys {outside[:3]} (expected the prefix {PEFT_PREFIX!r})")
    return {k[len(PEFT_PREFIX):]: v for k, v in state.items()}


def _split(state: dict[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """Adapter tensors by module ({"lora_A": ...}) and the other (modules_to_save) tensors."""
    adapters: dict[str, dict[str, torch.Tensor]] = {}
    head: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        module, _, kind = key.rpartition(".")  # a parameter name is the last component of its key
        if kind in PEFT_TO_TRIPLET:
            adapters.setdefault(module, {})[kind] = value
        elif ".lora_" in key or kind.startswith("lora_"):
            raise CheckpointError(f"PEFT tensor {key} is not supported (only Linear/Conv1D lora_A/E/B adapters are)")
        else:
            head[key] = value
    return adapters, head


def _pattern(config: dict, module: str, saved: int) -> list[bool]:
    init_r = int(config["init_r"])
    pattern = (config.get("rank_pattern") or {}).get(f"{module}.lora_E")
    if pattern is None:
        pattern = [True] * init_r  # never allocated: every triplet kept
    if len(pattern) != init_r or sum(map(bool, pattern)) != saved:
        raise CheckpointError(
            f"PEFT adapter: {module} has {saved} saved triplets but its rank_pattern keeps "
            f"{sum(map(bool, pattern))} of {len(pattern)} (init_r {init_r}); the adapter files do not belong together"
        )
    return [bool(b) for b in pattern]


def _triplet(module: str, parts: dict[str, torch.Tensor], pattern: list[bool]) -> dict[str, torch.Tensor]:
    """Our NAME.P/lam/Q/mask at init_r, the saved triplets placed where the pattern keeps them."""
    missing = sorted(set(PEFT_TO_TRIPLET) - set(parts))
    if missing:
        raise CheckpointError(f"PEFT adapter: {module} lacks {', '.join(missing)}; the weights file is incomplete")
    A, E, B = parts["lora_A"].float(), parts["lora_E"].float().reshape(-1), parts["lora_B"].float()
    if A.dim() != 2 or B.dim() != 2 or not A.shape[0] == E.shape[0] == B.shape[1]:
        raise CheckpointError(
            f"PEFT adapter: {module} has inconsistent shapes lora_A {tuple(A.shape)}, lora_E {tuple(parts['lora_E'].shape)}, "
            f"lora_B {tuple(B.shape)}"
        )
    mask = torch.tensor(pattern, dtype=torch.bool)  # (init_r,)
    keep = torch.nonzero(mask).flatten()
    P = torch.zeros(B.shape[0], mask.numel()).index_copy_(1, keep, B)  # (d_out, init_r)
    Q = torch.zeros(mask.numel(), A.shape[1]).index_copy_(0, keep, A)  # (init_r, d_in)
    lam = torch.zeros(mask.numel()).index_copy_(0, keep, E)  # (init_r,)
    return {f"{module}.P": P, f"{module}.lam": lam, f"{module}.Q": Q, f"{module}.mask": mask}


def peft_scaling(config: dict) -> float:
    """s as PEFT's loaded layer applies it: lora_alpha (or r when alpha <= 0) / (init_r + 1e-5)."""
    init_r = int(config["init_r"])
    alpha = float(config.get("lora_alpha", 1))
    return (alpha if alpha > 0 else float(init_r)) / (init_r + RANKNUM_EPS)


def _task(config: dict, head: dict, path: Path) -> str:
    task_type = config.get("task_type")
    if task_type is None:
        return SEQUENCE_CLASSIFICATION if head else FEATURE_EXTRACTION
    if task_type not in PEFT_TASKS:
        raise CheckpointError(
            f"{path}: PEFT task_type {task_type!r} is not supported; supported: {', '.join(PEFT_TASKS)}"
        )
    return PEFT_TASKS[task_type]


def read_peft_adapter(path: str | os.PathLike) -> PeftAdapter:
    """Read and convert a PEFT AdaLoRA adapter directory (no base model needed).

    Args:
        path: directory with adapter_config.json and adapter_model.safetensors.

    Returns:
        The adapter in our tensor layout, with its task and PEFT's scaling.
    """
    path = Path(path)
    config = read_json(path / PEFT_CONFIG_FILE, "PEFT adapter config")
    _check_config(config, path)
    adapters, head = _split(_read_weights(path))
    if not adapters:
        raise CheckpointError(f"{path / PEFT_WEIGHTS_FILE} holds no lora_A/lora_E/lora_B tensors")
    tensors: dict[str, torch.Tensor] = {}
    for module, parts in adapters.items():
        saved = parts["lora_A"].shape[0] if "lora_A" in parts else 0
        tensors.update(_triplet(module, parts, _pattern(config, module, saved)))
    tensors.update(head)
    head_modules = list(dict.fromkeys(key.rpartition(".")[0] for key in head))
    return PeftAdapter(config, tensors, list(adapters), head_modules, _task(config, head, path), peft_scaling(config))


def _label_kwargs(adapter: PeftAdapter, base_path: str) -> dict:
    """num_labels from the saved head (its output layer is the 2-D weight with the fewest rows)."""
    if adapter.task not in HEADED_TASKS:
        return {}
    weights = [v for k, v in adapter.tensors.items() if k.rpartition(".")[0] in adapter.head_modules and v.dim() == 2]
    if not weights:
        task_type = next(k for k, v in PEFT_TASKS.items() if v == adapter.task)
        raise CheckpointError(
            f"the PEFT adapter has no saved task head for {adapter.task} (modules_to_save): re-train with "
            f"task_type='{task_type}' so that the head is saved, or export with --task feature-extraction"
        )
    if adapter.task not in LABELLED_TASKS:
        return {}
    num_labels = min(w.shape[0] for w in weights)
    from transformers import AutoConfig

    id2label = getattr(AutoConfig.from_pretrained(base_path), "id2label", None) or {}
    if len(id2label) != num_labels:
        id2label = {i: f"LABEL_{i}" for i in range(num_labels)}
    return {"num_labels": num_labels, "id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}


def _check_nothing_random(adapter: PeftAdapter, new_modules: list[str], path) -> None:
    """Refuse an adapter whose model needs modules that loading the base initialises at random and that
    PEFT did not save (DeBERTa's pooler and DistilBERT's pre_classifier under PEFT's default
    modules_to_save): exporting it would serve weights that no training produced."""
    saved = adapter.head_modules
    unsaved = [m for m in new_modules if not any(m == h or m.startswith(h + ".") for h in saved)]
    if unsaved:
        names = ", ".join(unsaved)
        raise CheckpointError(
            f"{path}: the PEFT adapter does not hold {names}, which the base model lacks, so loading would draw "
            f"them at random and the export would serve untrained weights; re-train with PEFT's "
            f"modules_to_save={sorted(set(saved) | {m.rpartition('.')[0] or m for m in unsaved})!r}"
        )


def our_config(adapter: PeftAdapter) -> AdaLoraConfig:
    """Our AdaLoraConfig for the adapter: alpha is set so that alpha / init_r equals PEFT's s."""
    c = adapter.config
    return AdaLoraConfig(
        target_modules=adapter.modules, modules_to_save=adapter.head_modules, init_r=adapter.init_r,
        target_r=min(int(c.get("target_r", adapter.init_r)), adapter.init_r),
        alpha=adapter.scaling * adapter.init_r, dropout=float(c.get("lora_dropout", 0.0)),
        extra={"peft": {k: c.get(k) for k in ("peft_version", "lora_alpha", "target_r", "total_step", "tinit",
                                              "tfinal", "deltaT", "task_type", "base_model_name_or_path")}},
    )


def load_peft_adapter(path: str | os.PathLike, base: str | None = None):
    """The AdaLoraModel equivalent to PEFT's `PeftModel.from_pretrained(base, path)`.

    Args:
        path: the PEFT adapter directory.
        base: overrides adapter_config.json's base_model_name_or_path (a path or hub id).

    Returns:
        An AdaLoraModel in eval mode, with masks from rank_pattern and the saved head loaded.
    """
    from .model import load_base_model_with_info, prepare_model, resolve_model_path

    adapter = read_peft_adapter(path)
    name = base or adapter.config.get("base_model_name_or_path")
    if not name:
        raise CheckpointError(f"{path}: adapter_config.json names no base model: pass --base")
    revision = None if base else adapter.config.get("revision")
    kwargs = _label_kwargs(adapter, resolve_model_path(name))
    model, new = load_base_model_with_info(name, adapter.task, revision, **kwargs)
    _check_nothing_random(adapter, new, path)
    adapted = prepare_model(model, our_config(adapter), adapter.task)
    adapted.base_model = {"name_or_path": name, "revision": revision}
    adapted.load_adapter_state(adapter.tensors, source=str(path))
    return adapted.eval()
