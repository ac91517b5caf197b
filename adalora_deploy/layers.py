"""The SVD adapter: W = W0 + s * P diag(lam) Q, wrapped around nn.Linear or GPT-2's Conv1D."""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


def linear_shape(base: nn.Module) -> tuple[int, int]:
    """(d_out, d_in) of a Linear or Conv1D; Conv1D stores its weight transposed, (d_in, d_out)."""
    if isinstance(base, nn.Linear):
        return base.out_features, base.in_features
    if isinstance(base, Conv1D):
        d_in, d_out = base.weight.shape
        return d_out, d_in
    raise TypeError(f"cannot adapt {type(base).__name__}: only nn.Linear and Conv1D are supported")


class SVDLinear(nn.Module):
    """A frozen linear layer plus the triplets (P[:, i], lam[i], Q[i, :]).

    `mask` marks the triplets the allocator keeps; a pruned triplet has lam = 0 and mask = False,
    while P and Q stay so that it can come back at a later allocation.
    """

    def __init__(self, base: nn.Module, r: int, scaling: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.d_out, self.d_in = linear_shape(base)
        self.r = r
        self.scaling = scaling
        w = base.weight
        self.P = nn.Parameter(torch.empty(self.d_out, r, dtype=w.dtype, device=w.device))
        self.lam = nn.Parameter(torch.zeros(r, dtype=w.dtype, device=w.device))
        self.Q = nn.Parameter(torch.empty(r, self.d_in, dtype=w.dtype, device=w.device))
        self.register_buffer("mask", torch.ones(r, dtype=torch.bool, device=w.device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        nn.init.normal_(self.P, mean=0.0, std=0.02)
        nn.init.normal_(self.Q, mean=0.0, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (..., d_out)
        if self.r == 0:
            return y
        h = self.dropout(x) @ self.Q.T  # (..., r)
        return y + ((h * self.lam) @ self.P.T) * self.scaling  # (..., d_out)

    def delta_weight(self) -> torch.Tensor:
        """s * P diag(lam) Q in torch's Linear layout (d_out, d_in), computed in fp32."""
        P, lam, Q = self.P.float(), self.lam.float(), self.Q.float()
        return self.scaling * (P * lam) @ Q  # (d_out, d_in)

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_out={self.d_out}, r={self.r}, scaling={self.scaling:g}"


@torch.no_grad()
def merge(module: SVDLinear) -> nn.Module:
    """A copy of `module.base` with the adapter folded in: W0 + s P diag(lam) Q, in fp32, then cast."""
    base = copy.deepcopy(module.base)
    delta = module.delta_weight()  # (d_out, d_in)
    if isinstance(base, Conv1D):
        delta = delta.T  # Conv1D weight is (d_in, d_out)
    base.weight.copy_((base.weight.float() + delta).to(base.weight.dtype))
    return base


def svd_modules(model: nn.Module) -> dict[str, SVDLinear]:
    """Every SVDLinear in `model`, by module path, in registration order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, SVDLinear)}


def replace_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, child, new)


def merge_adapters(model: nn.Module) -> nn.Module:
    """A copy of `model` with every SVDLinear replaced by its merged base layer."""
    merged = copy.deepcopy(model)
    for name, module in svd_modules(merged).items():
        replace_module(merged, name, merge(module))
    return merged


def orthogonal_penalty(modules: dict[str, SVDLinear] | list[SVDLinear]) -> torch.Tensor:
    """mean over modules of ||P^T P - I||_F + ||Q Q^T - I||_F (the reference code's plain norm)."""
    mods = list(modules.values()) if isinstance(modules, dict) else list(modules)
    mods = [m for m in mods if m.r > 0]
    if not mods:
        raise ValueError("orthogonal_penalty needs at least one adapted module of rank > 0")
    total = 0.0
    for m in mods:
        eye = torch.eye(m.r, dtype=m.P.dtype, device=m.P.device)
        total = total + torch.linalg.matrix_norm(m.P.T @ m.P - eye) + torch.linalg.matrix_norm(m.Q @ m.Q.T - eye)
    return total / len(mods)
