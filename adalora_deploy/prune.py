"""Pruning: drop the masked triplets of a checkpoint and slice P and Q to each module's effective rank.

`prune` is a plain function over the checkpoint's tensors (docs/formats.md):

    NAME.P (d_out, r)  NAME.lam (r)  NAME.Q (r, d_in)  NAME.mask (r)   ->   the kept triplets only

A triplet is masked when its mask is False; the allocator leaves its lam at exactly 0, so removing
it changes nothing in the model's function. A module that keeps no triplet loses its branch.
`pruned_model` then rebuilds a model whose adapters have the new shapes (gpt-fast's habit: build
the new tensors offline, then swap in modules of the new shapes).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .constants import TRIPLET_KEYS
from .errors import CheckpointError
from .layers import SVDLinear, replace_module, svd_modules


@dataclass(frozen=True)
class ModuleRank:
    """One adapted module before and after pruning."""

    d_out: int
    d_in: int
    rank_before: int  # stored triplets (init_r)
    rank_after: int  # kept triplets (the effective rank)

    @property
    def params_before(self) -> int:
        return self.rank_before * (self.d_out + self.d_in + 1)  # P column + Q row + lam, per triplet

    @property
    def params_after(self) -> int:
        return self.rank_after * (self.d_out + self.d_in + 1)


@dataclass
class PrunedAdapter:
    """The tensors after pruning, and what pruning did to each module.

    `tensors` holds NAME.P/lam/Q/mask for every module left with rank >= 1 (mask all True), and
    every non-adapter tensor of the input (e.g. the classifier head) unchanged.
    """

    tensors: dict[str, torch.Tensor]
    modules: dict[str, ModuleRank]

    @property
    def ranks_before(self) -> dict[str, int]:
        return {name: m.rank_before for name, m in self.modules.items()}

    @property
    def ranks_after(self) -> dict[str, int]:
        return {name: m.rank_after for name, m in self.modules.items()}

    @property
    def params_before(self) -> int:
        return sum(m.params_before for m in self.modules.values())

    @property
    def params_after(self) -> int:
        return sum(m.params_after for m in self.modules.values())


def adapter_module_names(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Module paths that carry a triplet set (a NAME.mask tensor), in the tensors' order."""
    return [key[: -len(".mask")] for key in tensors if key.endswith(".mask")]


def _triplets(tensors: Mapping[str, torch.Tensor], name: str) -> tuple[torch.Tensor, ...]:
    missing = [f"{name}.{k}" for k in TRIPLET_KEYS if f"{name}.{k}" not in tensors]
    if missing:
        raise CheckpointError(f"adapter tensors incomplete: missing {', '.join(missing)}; re-create the checkpoint")
    P, lam, Q, mask = (tensors[f"{name}.{k}"] for k in TRIPLET_KEYS)
    r = mask.shape[0]
    if mask.dtype != torch.bool or mask.dim() != 1:
        raise CheckpointError(f"{name}.mask must be a 1-D bool tensor, got {mask.dtype} {tuple(mask.shape)}")
    if P.dim() != 2 or P.shape[1] != r or tuple(lam.shape) != (r,) or Q.dim() != 2 or Q.shape[0] != r:
        raise CheckpointError(
            f"{name}: inconsistent triplet shapes P {tuple(P.shape)}, lam {tuple(lam.shape)}, "
            f"Q {tuple(Q.shape)}, mask {tuple(mask.shape)}; expected (d_out, r), (r,), (r, d_in), (r,)"
        )
    return P, lam, Q, mask


def _check_masked_lam(name: str, lam: torch.Tensor, mask: torch.Tensor) -> str | None:
    # A masked triplet with lam != 0 still contributes to the output: dropping it would change the model.
    bad = torch.nonzero(~mask & (lam != 0)).flatten().tolist()
    if not bad:
        return None
    return f"{name} triplets {bad} (lam {[float(lam[i]) for i in bad]})"


def prune(tensors: Mapping[str, torch.Tensor]) -> PrunedAdapter:
    """Drop every masked triplet and slice P and Q to each module's effective rank.

    Args:
        tensors: a checkpoint's adapter tensors (adapter.safetensors): NAME.P, NAME.lam, NAME.Q,
            NAME.mask per adapted module, plus any other trained tensors (passed through).

    Returns:
        The pruned tensors (modules at rank 0 dropped entirely) and the per-module ranks.

    Raises:
        CheckpointError: a masked triplet has a non-zero lam, or the triplet tensors are inconsistent.
    """
    names = adapter_module_names(tensors)
    out: dict[str, torch.Tensor] = {}
    modules: dict[str, ModuleRank] = {}
    problems = []
    for name in names:
        P, lam, Q, mask = _triplets(tensors, name)
        problems.append(_check_masked_lam(name, lam, mask))
        keep = torch.nonzero(mask).flatten()  # indices of kept triplets, in their original order
        modules[name] = ModuleRank(P.shape[0], Q.shape[1], mask.shape[0], keep.numel())
        if keep.numel() > 0:
            out[f"{name}.P"] = P[:, keep].contiguous()  # (d_out, r')
            out[f"{name}.lam"] = lam[keep].contiguous()  # (r',)
            out[f"{name}.Q"] = Q[keep].contiguous()  # (r', d_in)
            out[f"{name}.mask"] = torch.ones(keep.numel(), dtype=torch.bool)
    problems = [p for p in problems if p]
    if problems:
        raise CheckpointError(
            "masked triplets with non-zero lam (the mask says pruned but the triplet still acts): "
            + "; ".join(problems) + ". Re-apply the mask (lam = 0 where mask is False) or re-train"
        )
    adapter_keys = {f"{name}.{k}" for name in names for k in TRIPLET_KEYS}
    out.update({k: v for k, v in tensors.items() if k not in adapter_keys})
    return PrunedAdapter(out, modules)


@torch.no_grad()
def _resized(module: SVDLinear, P: torch.Tensor, lam: torch.Tensor, Q: torch.Tensor) -> SVDLinear:
    resized = SVDLinear(copy.deepcopy(module.base), P.shape[1], module.scaling)
    resized.dropout = module.dropout
    resized.P.copy_(P)
    resized.lam.copy_(lam)
    resized.Q.copy_(Q)
    return resized.requires_grad_(False)


def pruned_model(model: nn.Module, pruned: PrunedAdapter) -> nn.Module:
    """A copy of `model` whose SVDLinear adapters take the pruned shapes.

    Modules at rank 0 become their plain base layer (no branch); s is kept as alpha / init_r.

    Args:
        model: the transformers model with SVDLinear adapters (AdaLoraModel.model).
        pruned: the result of `prune` on that model's adapter tensors.

    Returns:
        A new model; `model` is left untouched.
    """
    out = copy.deepcopy(model)
    adapters = svd_modules(out)
    if set(adapters) != set(pruned.modules):
        raise CheckpointError(
            f"pruned adapter has modules {sorted(set(pruned.modules) ^ set(adapters))[:5]} that the model "
            "does not have (or lacks): prune the tensors of this model's checkpoint"
        )
    for name, module in adapters.items():
        if pruned.modules[name].rank_after == 0:
            replace_module(out, name, module.base)
            continue
        P, lam, Q = (pruned.tensors[f"{name}.{k}"] for k in ("P", "lam", "Q"))
        replace_module(out, name, _resized(module, P, lam, Q))
    return out
