"""Importance-driven rank allocation: sensitivity/uncertainty EMAs, triplet scores, the cubic budget,
and exact top-b masking (docs/method.md, Eqs. 7-12).

The score of triplet i of a module (P: d_out x r, Q: r x d_in) is

    S_i = s(lam_i) + (1/d_out) sum_j s(P[j, i]) + (1/d_in) sum_j s(Q[i, j]),   s(w) = Ibar(w) * Ubar(w)
    Ibar = b1 Ibar + (1 - b1) I,   Ubar = b2 Ubar + (1 - b2) |I - Ibar|,   I(w) = |w * dL/dw|

The per-step path is vectorised and never synchronises with the device: the EMAs are a handful of
`torch._foreach_*` calls over all adapter tensors, the budget is computed on the host from the step
number alone, and masks are built with a stable sort and a scatter on the device.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .config import AdaLoraConfig
from .errors import CheckpointError
from .layers import SVDLinear

if TYPE_CHECKING:
    from .model import AdaLoraModel

PHASES = ("warmup", "budgeting", "final")


def budget_schedule(step: int, total_step: int, tinit: int, tfinal: int, b0: int, bT: int) -> int:
    """The number of triplets kept after optimizer step `step` (the cubic schedule, docs/method.md Eq. 12).

    b0 while step <= tinit; bT once step > total_step - tfinal; in between
    bT + (b0 - bT) * (1 - (step - tinit) / (total_step - tfinal - tinit))^3, truncated with int()
    exactly as PEFT's AdaLoRA does, so that both give the same budgets.

    Args:
        step: optimizer steps done (1-based; 0 means before training).
        total_step: T, the number of optimizer steps of the whole run.
        tinit: warm-up steps at the full budget.
        tfinal: final steps at the target budget, with the mask fixed.
        b0: initial budget (sum of init_r over modules).
        bT: final budget (target_r x number of modules).

    Returns:
        The budget b(step), an int.
    """
    if step <= tinit:
        return b0
    if step > total_step - tfinal:
        return bT
    remaining = 1 - (step - tinit) / (total_step - tfinal - tinit)
    return int((b0 - bT) * remaining**3 + bT)


def _adapter_dict(adapters) -> dict[str, SVDLinear]:
    # An AdaLoraModel carries its adapters in `.adapters`; a plain dict is taken as is.
    found = getattr(adapters, "adapters", adapters)
    if not isinstance(found, dict) or not all(isinstance(m, SVDLinear) for m in found.values()):
        raise TypeError("RankAllocator needs a dict of SVDLinear adapters or an AdaLoraModel")
    if not found or not any(m.r > 0 for m in found.values()):
        raise ValueError("RankAllocator needs at least one adapted module of rank > 0")
    return dict(found)


def _top_b_mask(scores: torch.Tensor, b: int) -> torch.Tensor:
    """Exactly b True entries: the b largest scores, ties broken towards the lower index.

    A stable descending sort keeps equal scores in index order, so the same scores always give the
    same mask. PEFT instead masks every triplet whose score is <= the (b0 - b)-th smallest score
    (torch.kthvalue), which keeps fewer than b triplets when scores tie at that threshold.
    """
    order = torch.sort(scores, descending=True, stable=True).indices  # (n,)
    keep = torch.zeros_like(scores, dtype=torch.bool)  # (n,)
    return keep.scatter_(0, order[:b], True)


class RankAllocator:
    """Tracks the importance of every triplet (P[:, i], lam[i], Q[i, :]) and masks the least important.

    Call `update_and_allocate(step)` once per optimizer step, after `optimizer.step()` and before
    `zero_grad()`, with `step` the number of optimizer steps done including this one (1-based, like
    PEFT's `global_step`). The EMAs are updated while step < T - tfinal; in the budgeting phase
    (tinit < step < T - tfinal), on every step divisible by delta_t (PEFT's rule), exactly the top-b
    triplets are kept; at step == T - tfinal the final top-bT mask is fixed, and it is re-applied after
    every later step. Masking a triplet sets `lam[i] = 0` and `mask[i] = False` on its SVDLinear; a
    triplet masked in the budgeting phase can come back at a later allocation.

    Args:
        adapters: the SVDLinear modules by name, or an AdaLoraModel.
        config: the AdaLoRA config (betas, schedule, importance metric).
        total_step: T, the number of optimizer steps of the run.
    """

    def __init__(self, adapters: dict[str, SVDLinear] | AdaLoraModel, config: AdaLoraConfig, total_step: int):
        config.check_schedule(total_step)
        self.config = config
        self.total_step = total_step
        self.modules = _adapter_dict(adapters)
        mods = list(self.modules.values())
        self.ranks = [m.r for m in mods]
        self.b0 = sum(self.ranks)
        self.bT = config.target_r * len(mods)
        # Triplets are collected once: per module (P, lam, Q), flattened in registration order.
        self._params = [t for m in mods for t in (m.P, m.lam, m.Q)]
        self._ibar = [torch.zeros_like(p, dtype=torch.float32) for p in self._params]
        self._ubar = [torch.zeros_like(p, dtype=torch.float32) for p in self._params]
        self.final_mask: torch.Tensor | None = None  # (n_triplets,) bool, set at step T - tfinal

    # -- schedule (host only) -------------------------------------------------------------------

    @property
    def final_step(self) -> int:
        """T - tfinal: the step at which the mask is fixed."""
        return self.total_step - self.config.tfinal

    def budget(self, step: int) -> int:
        """b(step) for this run (see `budget_schedule`)."""
        c = self.config
        return budget_schedule(step, self.total_step, c.tinit, c.tfinal, self.b0, self.bT)

    def phase(self, step: int) -> str:
        """The schedule's phase at `step`: "warmup" (step <= tinit), "final" (step > T - tfinal, budget
        bT; the mask is fixed at T - tfinal itself) or "budgeting" (in between)."""
        if step <= self.config.tinit:
            return "warmup"
        return "final" if step > self.final_step else "budgeting"

    def is_allocation_step(self, step: int) -> bool:
        """True where `update_and_allocate(step)` masks to a new top-b (the fixing step included)."""
        budgeting = self.config.tinit < step < self.final_step
        return step == self.final_step or (budgeting and step % self.config.delta_t == 0)

    # -- per-step path ----------------------------------------------------------------------------

    @torch.no_grad()
    def update_and_allocate(self, step: int) -> int:
        """Update the EMAs and mask to the budget for optimizer step `step` (1-based).

        Args:
            step: optimizer steps done, including the one just taken.

        Returns:
            The budget b(step), computed on the host from `step` alone.
        """
        if step < 1:
            raise ValueError(f"step ({step}) must be >= 1: pass the number of optimizer steps done")
        if step < self.final_step and self.config.importance != "magnitude":
            self._update_ema()
        budget = self.budget(step)
        if step == self.final_step:
            self.final_mask = _top_b_mask(self.scores(), self.bT)
            self._apply(self.final_mask)
        elif step > self.final_step:
            self._apply(self._fixed_mask())
        elif self.is_allocation_step(step):
            self._apply(_top_b_mask(self.scores(), budget))
        return budget

    def _update_ema(self) -> None:
        # Only tensors that received a gradient this step (a frozen module has grad None).
        pairs = [(p, g, i, u) for p, i, u in zip(self._params, self._ibar, self._ubar, strict=True)
                 if (g := p.grad) is not None]
        if not pairs:
            return
        params, grads, ibar, ubar = (list(x) for x in zip(*pairs, strict=True))
        b1, b2 = self.config.beta1, self.config.beta2
        if params[0].dtype != torch.float32:  # half-precision adapters: score in fp32
            params, grads = [p.float() for p in params], [g.float() for g in grads]
        sens = torch._foreach_mul(params, grads)  # I = w * dL/dw, per tensor
        torch._foreach_abs_(sens)
        # lerp(x, y, 1 - b) = b x + (1 - b) y in one pass (equal to PEFT's two-term form within 1 ulp).
        torch._foreach_lerp_(ibar, sens, 1 - b1)  # Ibar = b1 Ibar + (1 - b1) I
        if self.config.importance == "sensitivity":
            return  # s = Ibar: the uncertainty is not needed
        torch._foreach_sub_(sens, ibar)
        torch._foreach_abs_(sens)  # |I - Ibar|, with the updated Ibar as PEFT does
        torch._foreach_lerp_(ubar, sens, 1 - b2)  # Ubar = b2 Ubar + (1 - b2) |I - Ibar|

    def _apply(self, keep: torch.Tensor) -> None:
        """Write a flat keep-mask into every module: mask[i] = keep, lam[i] = 0 where not kept."""
        mods = list(self.modules.values())
        keeps = list(keep.split(self.ranks))  # per module (r,)
        torch._foreach_copy_([m.mask for m in mods], keeps)
        lams = [m.lam for m in mods]
        torch._foreach_mul_(lams, [k.to(lam.device, lam.dtype) for k, lam in zip(keeps, lams, strict=True)])

    def _fixed_mask(self) -> torch.Tensor:
        if self.final_mask is None:
            raise RuntimeError(
                f"no final mask: update_and_allocate({self.final_step}) (step T - tfinal) was never called; "
                "call it once per optimizer step, or resume with load_state_dict"
            )
        return self.final_mask

    # -- scores -----------------------------------------------------------------------------------

    @torch.no_grad()
    def scores(self) -> torch.Tensor:
        """S_i for every triplet, flat in module registration order.

        Returns:
            (n_triplets,) fp32: s(lam_i) + mean_j s(P[j, i]) + mean_j s(Q[i, j]) with s = Ibar * Ubar
            ("sensitivity-uncertainty") or s = Ibar ("sensitivity"); |lam_i| for "magnitude".
        """
        if self.config.importance == "magnitude":
            return torch.cat([m.lam.detach().float().abs() for m in self.modules.values()])  # (n,)
        if self.config.importance == "sensitivity":
            s = self._ibar
        else:
            s = torch._foreach_mul(self._ibar, self._ubar)  # s(w) = Ibar * Ubar, per tensor
        per_module = [
            s_lam + s_P.mean(dim=0) + s_Q.mean(dim=1)  # (r,)
            for s_P, s_lam, s_Q in zip(s[0::3], s[1::3], s[2::3], strict=True)
        ]
        return torch.cat(per_module)  # (n_triplets,)

    # -- resume -----------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The EMA buffers and the fixed final mask (None before step T - tfinal), for resuming."""
        return {
            "modules": list(self.modules),
            "ranks": list(self.ranks),
            "ibar": [t.clone() for t in self._ibar],
            "ubar": [t.clone() for t in self._ubar],
            "final_mask": None if self.final_mask is None else self.final_mask.clone(),
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned, after checking it matches these adapters."""
        shapes = [tuple(t.shape) for t in self._ibar]
        same = state.get("modules") == list(self.modules) and state.get("ranks") == self.ranks
        if not same or [tuple(t.shape) for t in state["ibar"]] != shapes:
            raise CheckpointError(
                "allocator state does not match the adapted modules (names, ranks or shapes differ): "
                "resume with the same model and config"
            )
        for mine, saved in ((self._ibar, state["ibar"]), (self._ubar, state["ubar"])):
            torch._foreach_copy_(mine, [t.to(b.device, torch.float32) for t, b in zip(saved, mine, strict=True)])
        mask = state["final_mask"]
        self.final_mask = None if mask is None else mask.to(self._ibar[0].device, torch.bool).clone()
