"""The two module transforms the exporter traces: merged and factored (docs/method.md, "Pruning and export").

Both take a transformers model whose adapted layers are SVDLinear (pruned or not) and return a
plain copy that TorchScript can trace; neither mutates its input.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from adalora_deploy.layers import SVDLinear, merge_adapters, replace_module, svd_modules

# The branch's submodule name; it scopes the branch's ONNX node names ("/.../<name>/MatMul"), which
# is how the graph passes find the branches again (exporters/graph.py).
BRANCH_NAME = "adalora_branch"


class LowRankBranch(nn.Module):
    """(x @ Q'^T) @ P'^T with the two factors stored pre-transposed, so each is one MatMul."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor):
        super().__init__()
        self.register_buffer("down", down)  # Q'^T: (d_in, r)
        self.register_buffer("up", up)  # P'^T: (r, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.down) @ self.up  # (..., r) then (..., d_out)


class FactoredLinear(nn.Module):
    """y = (x @ W0^T + branch(x)) + b.

    The branch joins the base MatMul's output *before* the bias Add. ONNX Runtime's fusions absorb
    the bias into the op that follows (BiasGelu, SkipLayerNormalization, MultiHeadAttention), so
    this is the one point where the branch can rejoin a fused graph.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, branch: LowRankBranch):
        super().__init__()
        self.register_buffer("weight", weight)  # W0: (d_out, d_in), torch's Linear layout
        self.register_buffer("bias", bias)  # (d_out,) or None
        setattr(self, BRANCH_NAME, branch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.linear(x, self.weight) + getattr(self, BRANCH_NAME)(x)  # (..., d_out)
        return y if self.bias is None else y + self.bias


def _linear_weight(base: nn.Module) -> torch.Tensor:
    # Conv1D stores (d_in, d_out); the export works in Linear's (d_out, d_in).
    return base.weight.detach().T if isinstance(base, Conv1D) else base.weight.detach()


@torch.no_grad()
def factored_linear(module: SVDLinear) -> FactoredLinear:
    """The export form of one adapter: P' = P * (s * lam) folded in fp32, Q' = Q, all its triplets."""
    P, lam, Q = module.P.float(), module.lam.float(), module.Q.float()
    P_folded = P * (module.scaling * lam)  # (d_out, r): s * lam folded into P's columns
    dtype = module.base.weight.dtype
    branch = LowRankBranch(Q.T.to(dtype).contiguous(), P_folded.T.to(dtype).contiguous())
    bias = module.base.bias.detach().clone() if module.base.bias is not None else None
    return FactoredLinear(_linear_weight(module.base).clone().contiguous(), bias, branch)


def factored_model(model: nn.Module) -> nn.Module:
    """A copy of `model` where each SVDLinear becomes a FactoredLinear, or its plain base at rank 0.

    Every triplet the module holds is kept (zeros included): prune first to drop masked ones.
    """
    out = copy.deepcopy(model)
    for name, module in svd_modules(out).items():
        replace_module(out, name, module.base if module.r == 0 else factored_linear(module))
    return out.eval()


def merged_model(model: nn.Module) -> nn.Module:
    """A copy of `model` with W = W0 + s P diag(lam) Q folded in fp32, then cast to W0's dtype."""
    return merge_adapters(model).eval()
