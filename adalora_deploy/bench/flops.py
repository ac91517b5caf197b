"""FLOPs of the merged graph and of the factored low-rank branch, from ranks and shapes.

Per token, a Linear d_in -> d_out costs 2 d_in d_out FLOPs. The factored branch of rank r costs
2 r d_in (x Q'^T) + 2 r d_out (then P'^T) + d_out (the add), and nothing at rank 0. Attention adds
4 T hidden FLOPs per token and layer (Q K^T and A V). Per sequence of T tokens:

    merged  = T * (sum over Linear layers of 2 d_in d_out) + layers * 4 T^2 hidden
    branch  = T * (sum over adapted modules of 2 r (d_in + d_out) + d_out)
    share   = branch / merged      (the factored graph's extra work over merged)

The task head (modules_to_save) acts once per sequence and is left out; embeddings, LayerNorm and
softmax cost the same in every variant and are small.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class FlopCount:
    """FLOPs per sequence of `seq_len` tokens."""

    seq_len: int
    merged: float
    branch_pruned: float
    branch_unpruned: float

    @property
    def share(self) -> float:
        """Extra FLOPs of the pruned factored graph over merged, as a fraction of merged."""
        return self.branch_pruned / self.merged

    @property
    def share_unpruned(self) -> float:
        return self.branch_unpruned / self.merged

    def to_dict(self) -> dict:
        return {
            "seq_len": self.seq_len, "merged": self.merged, "branch_pruned": self.branch_pruned,
            "branch_unpruned": self.branch_unpruned, "share": self.share, "share_unpruned": self.share_unpruned,
        }


def branch_flops(d_in: int, d_out: int, r: int) -> int:
    """Per-token FLOPs of a rank-r factored branch: two thin matmuls and the add."""
    return 2 * r * (d_in + d_out) + d_out if r > 0 else 0


def _config_value(config, *names: str) -> int:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return 0


def count_flops(model, seq_len: int) -> FlopCount:
    """FLOPs per sequence for an AdaLoraModel (its ranks and its layers' shapes).

    Args:
        model: an adalora_deploy.model.AdaLoraModel.
        seq_len: tokens per sequence.
    """
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    from adalora_deploy.layers import linear_shape

    head = tuple(model.modules_to_save)
    linear = 0
    for name, module in model.model.named_modules():
        in_head = any(name == h or name.startswith(h + ".") for h in head)
        if isinstance(module, nn.Linear | Conv1D) and not in_head:
            d_out, d_in = linear_shape(module)
            linear += 2 * d_in * d_out  # per token
    ranks = model.ranks()
    pruned = sum(branch_flops(m.d_in, m.d_out, ranks[n]) for n, m in model.adapters.items())
    unpruned = sum(branch_flops(m.d_in, m.d_out, m.r) for m in model.adapters.values())
    config = model.model.config
    layers = _config_value(config, "num_hidden_layers", "n_layer", "num_layers")
    hidden = _config_value(config, "hidden_size", "n_embd", "dim", "d_model")
    attention = layers * 4 * seq_len * seq_len * hidden
    return FlopCount(seq_len, float(seq_len * linear + attention), float(seq_len * pruned), float(seq_len * unpruned))
