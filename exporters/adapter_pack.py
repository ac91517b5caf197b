"""`export SRC --prune-ranks --mode adapter`: an adapter pack, the part of a checkpoint that differs from
its base model, for serving many adapters on one multi graph (docs/adapter_pack.md).

    adapter_pack.safetensors   MODULE.down (d_in, r) = Q'^T and MODULE.up (r, d_out) = P'^T per module
                               at its own pruned rank (P' = P * (s * lam), folded in fp32), and the
                               task head's tensors under their module paths (e.g. classifier.weight)
    adapter_manifest.json      base identity, ranks, shapes, task, id2label, source

A pack never holds the base weights: it is kilobytes to megabytes.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from adalora_deploy import __version__
from adalora_deploy.constants import (
    ADAPTER_MANIFEST_FILE,
    ADAPTER_PACK_FILE,
    ADAPTER_PACK_FORMAT,
    DOWN_SUFFIX,
    SEQUENCE_CLASSIFICATION,
    UP_SUFFIX,
)
from adalora_deploy.io import write_json
from adalora_deploy.layers import replace_module, svd_modules
from adalora_deploy.prune import prune

from .errors import ExportError
from .manifest import source_hash
from .source import Source

log = logging.getLogger("adalora_deploy.export")

# Config entries that fix what the base weights compute; labels, architectures and paths do not.
IDENTITY_CONFIG_KEYS = (
    "model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
    "hidden_act", "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "position_embedding_type",
)
# Model types whose sequence-classification head is one Linear on the backbone's pooled output, which
# is what the multi graph computes per row (exporters/multi.py).
MULTI_HEADS = {"bert": "classifier"}


def plain_model(model: nn.Module) -> nn.Module:
    """A copy of `model` with every SVDLinear replaced by its frozen base layer (the base model)."""
    out = copy.deepcopy(model)
    for name, module in svd_modules(out).items():
        replace_module(out, name, module.base)
    return out.eval()


def base_identity(model: nn.Module) -> dict:
    """The identity of a model's base (backbone) weights and config, which packs and multi graphs share.

    sha256 over the backbone's tensors (name, dtype, shape, bytes, in name order) and the config entries
    in IDENTITY_CONFIG_KEYS. The task head is not part of it: adapters bring their own.

    Args:
        model: a transformers model (SVDLinear adapters allowed; their base layers are what counts).
    """
    backbone = plain_model(model).base_model
    digest = hashlib.sha256()
    for name, tensor in sorted(backbone.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    config = model.config.to_dict()
    entries = {k: config[k] for k in IDENTITY_CONFIG_KEYS if k in config}
    digest.update(json.dumps(entries, sort_keys=True).encode())
    return {"sha256": digest.hexdigest(), "model_type": config.get("model_type"), "config": entries}


def head_module(model: nn.Module) -> str:
    """The module path of the task head a multi graph takes as an input, for this model type."""
    model_type = model.config.model_type
    if model_type not in MULTI_HEADS:
        raise ExportError(
            f"multi-adapter graphs are declared for {', '.join(MULTI_HEADS)} sequence classifiers, not "
            f"{model_type!r}: export this checkpoint with --mode merged or factored"
        )
    return MULTI_HEADS[model_type]


def check_packable(source: Source) -> str:
    """The head module of `source`; refuses what a multi graph cannot serve, naming the reason."""
    if source.task != SEQUENCE_CLASSIFICATION:
        raise ExportError(f"--mode adapter packs {SEQUENCE_CLASSIFICATION} adapters, this one is {source.task}: "
                          "export it with --mode merged or factored")
    head = head_module(source.model.model)
    extra = [m for m in source.model.modules_to_save if m != head]
    if extra:
        raise ExportError(
            f"the adapter trains {extra} in full besides the head {head!r}; a multi graph shares every "
            "backbone weight: export it with --mode merged or factored"
        )
    return head


def pack_tensors(source: Source, head: str) -> tuple[dict[str, torch.Tensor], dict[str, int], dict[str, list[int]]]:
    """(tensors, ranks, shapes): the folded factors at each module's pruned rank, and the head."""
    pruned = prune(source.model.adapter_state_dict())
    scaling = source.model.config.scaling
    tensors: dict[str, torch.Tensor] = {}
    for name, m in pruned.modules.items():
        if m.rank_after == 0:
            continue
        P, lam, Q = (pruned.tensors[f"{name}.{k}"].float() for k in ("P", "lam", "Q"))
        tensors[name + DOWN_SUFFIX] = Q.T.contiguous()  # (d_in, r)
        tensors[name + UP_SUFFIX] = (P * (scaling * lam)).T.contiguous()  # (r, d_out)
    for key, value in source.model.model.get_submodule(head).state_dict().items():
        tensors[f"{head}.{key}"] = value.detach().float().cpu().contiguous()
    shapes = {name: [m.d_out, m.d_in] for name, m in pruned.modules.items()}
    return tensors, pruned.ranks_after, shapes


def pack_manifest(source: Source, head: str, ranks: dict[str, int], shapes: dict[str, list[int]]) -> dict:
    config = source.model.model.config
    head_weight = source.model.model.get_submodule(head).weight
    return {
        "format": ADAPTER_PACK_FORMAT,
        "package_version": __version__,
        "task": source.task,
        "base": {**base_identity(source.model.model), "name_or_path": source.model.base_model.get("name_or_path")},
        "ranks": ranks,
        "shapes": shapes,
        "head": {"module": head, "num_labels": int(head_weight.shape[0]), "hidden": int(head_weight.shape[1])},
        "id2label": {str(k): v for k, v in (config.id2label or {}).items()},
        "scaling": source.model.config.scaling,
        "adapter_params": sum(r * (shapes[n][0] + shapes[n][1]) for n, r in ranks.items()),
        "source": {"kind": source.kind, "path": str(source.path), **source_hash(source.files)},
    }


def write_pack(source: Source, out: Path) -> None:
    """Write the pack of `source` into the (temporary) directory `out`."""
    head = check_packable(source)
    tensors, ranks, shapes = pack_tensors(source, head)
    save_file(tensors, str(out / ADAPTER_PACK_FILE), metadata={"format": ADAPTER_PACK_FORMAT})
    write_json(out / ADAPTER_MANIFEST_FILE, pack_manifest(source, head, ranks, shapes))
    size = (out / ADAPTER_PACK_FILE).stat().st_size
    log.info("adapter pack: %d modules at rank >= 1 of %d, %.1f KiB", sum(r > 0 for r in ranks.values()),
             len(ranks), size / 1024)


def export_adapter(checkpoint, out, *, prune_ranks: bool, base: str | None = None, overwrite: bool = False) -> Path:
    """`export SRC --prune-ranks --mode adapter --out OUT`: write the adapter pack of SRC into OUT.

    Args:
        checkpoint: an adalora-deploy checkpoint or a PEFT AdaLoRA adapter directory.
        out: the pack directory; written atomically.
        prune_ranks: must be True: a pack holds each module at its pruned rank.
        base: overrides the base model the checkpoint names.
        overwrite: replace a non-empty `out`.
    """
    from adalora_deploy.io import atomic_output_dir, check_output_dir

    from .source import load_source

    if not prune_ranks:
        raise ExportError("--mode adapter packs each module at its pruned rank: add --prune-ranks")
    check_output_dir(out, overwrite)
    source = load_source(checkpoint, base=base)
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        write_pack(source, tmp)
    return Path(out)
