"""Rank allocator: the cubic schedule, the scores written out by hand, exact budgets, the fixed final
mask, tie-breaking, resuming, and config validation. All on a few small SVDLinear modules."""

import copy

import pytest
import torch
from torch import nn

from adalora_deploy.allocator import RankAllocator, budget_schedule
from adalora_deploy.config import AdaLoraConfig
from adalora_deploy.errors import CheckpointError, ConfigError
from adalora_deploy.layers import SVDLinear

B1, B2 = 0.85, 0.7


def small_adapters(ranks=(3, 2, 4), seed=0) -> dict[str, SVDLinear]:
    """Three SVDLinear modules of different shapes and ranks, with non-zero lam."""
    torch.manual_seed(seed)
    shapes = [(5, 4), (3, 6), (4, 4)]  # (d_in, d_out)
    mods = {f"m{k}": SVDLinear(nn.Linear(d_in, d_out), r, scaling=1.0) for k, ((d_in, d_out), r)
            in enumerate(zip(shapes, ranks, strict=True))}
    with torch.no_grad():
        for m in mods.values():
            m.lam.normal_()
    return mods


def set_random_grads(mods, gen: torch.Generator, optimizer_like: bool = True) -> None:
    """Random grads for P, lam, Q, and (like an optimizer step) a small random move of the weights."""
    with torch.no_grad():
        for m in mods.values():
            for p in (m.P, m.lam, m.Q):
                p.grad = torch.randn(p.shape, generator=gen).to(p.device, p.dtype)
                if optimizer_like:
                    p.add_(0.1 * torch.randn(p.shape, generator=gen).to(p.device))


def masks(mods) -> torch.Tensor:
    return torch.cat([m.mask for m in mods.values()])


def lams(mods) -> torch.Tensor:
    return torch.cat([m.lam.detach() for m in mods.values()])


# -- schedule ----------------------------------------------------------------------------------


# T = 20, tinit = 3, tfinal = 5, b0 = 24, bT = 8; budgeting runs over (3, 15], 12 steps long.
#   t = 4:  8 + 16 * (1 - 1/12)^3 = 8 + 16 * 1331/1728 = 20.32 -> 20
#   t = 9:  8 + 16 * (1 - 6/12)^3 = 8 + 2 = 10
#   t = 14: 8 + 16 * (1/12)^3 = 8.009 -> 8
#   t = 15 = T - tfinal: 8 + 16 * 0 = 8
@pytest.mark.parametrize(("step", "expected"), [
    (0, 24), (3, 24), (4, 20), (9, 10), (14, 8), (15, 8), (16, 8), (20, 8),
])
def test_budget_schedule_by_hand(step, expected):
    assert budget_schedule(step, total_step=20, tinit=3, tfinal=5, b0=24, bT=8) == expected


def test_budget_truncates_like_int():
    # T = 10, tinit = 0, tfinal = 0, b0 = 10, bT = 1: t = 1 -> 1 + 9 * 0.9^3 = 7.561 -> 7 (int, not round)
    assert budget_schedule(1, total_step=10, tinit=0, tfinal=0, b0=10, bT=1) == 7


def test_phases_and_allocation_steps_with_delta_t():
    cfg = AdaLoraConfig(init_r=3, target_r=1, tinit=3, tfinal=5, delta_t=4)
    alloc = RankAllocator(small_adapters((3, 3, 3)), cfg, total_step=20)
    assert (alloc.b0, alloc.bT) == (9, 3)
    assert [alloc.phase(t) for t in (0, 3, 4, 15, 16, 20)] == [
        "warmup", "warmup", "budgeting", "budgeting", "final", "final"]
    # Budgeting steps (3, 15) divisible by delta_t = 4 (PEFT's rule), plus the fixing step T - tfinal = 15.
    assert [t for t in range(1, 21) if alloc.is_allocation_step(t)] == [4, 8, 12, 15]


# -- scores by hand ----------------------------------------------------------------------------


def two_steps_by_hand(mods, steps, metric):
    """The docs/method.md formulas, written out per tensor, for two EMA steps from zero.

    `steps` holds, per step, {module: {"P"|"lam"|"Q": (weight, grad)}} as the allocator saw them.
    """
    (w1, w2) = steps
    scores = []
    for name, m in mods.items():
        s = {}
        for key in ("P", "lam", "Q"):
            i1 = (w1[name][key][0] * w1[name][key][1]).abs()
            ibar1 = (1 - B1) * i1
            ubar1 = (1 - B2) * (i1 - ibar1).abs()
            i2 = (w2[name][key][0] * w2[name][key][1]).abs()
            ibar2 = B1 * ibar1 + (1 - B1) * i2
            ubar2 = B2 * ubar1 + (1 - B2) * (i2 - ibar2).abs()
            s[key] = ibar2 * ubar2 if metric == "sensitivity-uncertainty" else ibar2
        scores.append(torch.stack([
            s["lam"][i] + s["P"][:, i].sum() / m.d_out + s["Q"][i, :].sum() / m.d_in for i in range(m.r)]))
    return torch.cat(scores)


def weights_and_grads(mods) -> dict:
    return {n: {k: (getattr(m, k).detach().float().clone(), getattr(m, k).grad.float().clone()) for k in ("P", "lam", "Q")}
            for n, m in mods.items()}


@pytest.mark.parametrize(("metric", "dtype"), [
    ("sensitivity-uncertainty", torch.float32), ("sensitivity", torch.float32),
    ("sensitivity-uncertainty", torch.bfloat16),  # bf16 weights and grads, scored in fp32
])
def test_scores_by_hand_two_steps(metric, dtype):
    mods = {k: m.to(dtype) for k, m in small_adapters().items()}
    cfg = AdaLoraConfig(init_r=4, target_r=1, beta1=B1, beta2=B2, tinit=5, importance=metric)
    alloc = RankAllocator(mods, cfg, total_step=10)
    gen = torch.Generator().manual_seed(1)
    seen = []
    for step in (1, 2):  # warm-up: EMAs only, nothing masked
        set_random_grads(mods, gen)
        seen.append(weights_and_grads(mods))
        alloc.update_and_allocate(step)
    expected = two_steps_by_hand(mods, seen, metric)
    assert all(t.dtype == torch.float32 for t in alloc.state_dict()["ibar"])
    assert expected.shape == (3 + 2 + 4,) and expected.min() > 0
    torch.testing.assert_close(alloc.scores(), expected, atol=1e-7, rtol=1e-6)


def test_magnitude_scores_are_abs_lam():
    mods = small_adapters()
    alloc = RankAllocator(mods, AdaLoraConfig(init_r=4, target_r=1, importance="magnitude"), total_step=10)
    torch.testing.assert_close(alloc.scores(), lams(mods).abs(), atol=0, rtol=0)
    set_random_grads(mods, torch.Generator().manual_seed(0))
    magnitude = lams(mods).abs()  # after the "optimizer" moved lam, as the allocator sees it
    budget = alloc.update_and_allocate(1)
    assert int(masks(mods).sum()) == budget < alloc.b0
    assert magnitude[masks(mods)].min() > magnitude[~masks(mods)].max()
    assert torch.all(lams(mods)[~masks(mods)] == 0)


# -- budgets, masks, final phase ---------------------------------------------------------------


@pytest.mark.parametrize("delta_t", [1, 3])
def test_budget_met_exactly_after_every_allocation(delta_t):
    mods = small_adapters()
    T = 30
    alloc = RankAllocator(mods, AdaLoraConfig(init_r=4, target_r=2, tinit=4, tfinal=6, delta_t=delta_t), T)
    gen = torch.Generator().manual_seed(0)
    allocations = 0
    for step in range(1, T + 1):
        before = masks(mods).clone()
        set_random_grads(mods, gen)
        budget = alloc.update_and_allocate(step)
        assert budget == alloc.budget(step)
        if alloc.is_allocation_step(step) or step > alloc.final_step:
            allocations += 1
            assert int(masks(mods).sum()) == budget, step
            assert torch.all(lams(mods)[~masks(mods)] == 0), step
        else:
            assert torch.equal(masks(mods), before), step  # masks only change at allocations
    assert budget == alloc.bT == 2 * 3
    assert allocations == len([t for t in range(5, 24) if t % delta_t == 0]) + 1 + 6


def test_kept_triplets_are_the_top_scores():
    mods = small_adapters()
    alloc = RankAllocator(mods, AdaLoraConfig(init_r=4, target_r=1, tinit=0, tfinal=2), total_step=6)
    set_random_grads(mods, torch.Generator().manual_seed(3))
    budget = alloc.update_and_allocate(2)
    scores = alloc.scores()
    assert scores[masks(mods)].min() > scores[~masks(mods)].max()
    assert int(masks(mods).sum()) == budget


def test_final_mask_fixed_and_reapplied():
    mods = small_adapters()
    T, tfinal = 12, 4
    alloc = RankAllocator(mods, AdaLoraConfig(init_r=4, target_r=1, tinit=2, tfinal=tfinal), T)
    gen = torch.Generator().manual_seed(0)
    for step in range(1, T - tfinal + 1):
        set_random_grads(mods, gen)
        alloc.update_and_allocate(step)
    fixed = masks(mods).clone()
    assert torch.equal(fixed, alloc.final_mask) and int(fixed.sum()) == alloc.bT == 3
    ema = [t.clone() for t in alloc.state_dict()["ibar"]]
    for step in range(T - tfinal + 1, T + 1):
        set_random_grads(mods, gen)  # the optimizer moves every lam, the pruned ones included
        assert torch.all(lams(mods)[~fixed] != 0)
        assert alloc.update_and_allocate(step) == alloc.bT
        assert torch.equal(masks(mods), fixed)
        assert torch.all(lams(mods)[~fixed] == 0) and torch.all(lams(mods)[fixed] != 0)
    for before, after in zip(ema, alloc.state_dict()["ibar"], strict=True):
        assert torch.equal(before, after)  # no EMA updates from T - tfinal on


def test_pruned_triplet_can_come_back():
    mods = small_adapters((2, 2, 2))
    alloc = RankAllocator(mods, AdaLoraConfig(init_r=2, target_r=1, tinit=0, tfinal=2, beta1=0.1, beta2=0.1), 20)
    first = mods["m0"]
    for m in mods.values():  # scores from lam alone: s = Ibar * Ubar of |lam * grad|
        m.P.grad, m.Q.grad, m.lam.grad = torch.zeros_like(m.P), torch.zeros_like(m.Q), torch.ones_like(m.lam)
    first.lam.grad = torch.tensor([10.0, 0.0])  # triplet 1 of m0 gets score 0, the only one
    assert alloc.update_and_allocate(1) == alloc.b0 - 1
    assert first.mask.tolist() == [True, False] and first.lam[1] == 0
    with torch.no_grad():
        first.lam[1] = 5.0  # the optimizer moves it again, with a large gradient
    first.lam.grad = torch.tensor([0.0, 10.0])
    assert alloc.update_and_allocate(2) == alloc.b0 - 1
    assert first.mask[1] and first.lam[1] == 5.0


def test_tie_break_is_deterministic_lowest_index_first():
    for _ in range(3):
        mods = small_adapters()
        alloc = RankAllocator(mods, AdaLoraConfig(init_r=4, target_r=1, tinit=0, tfinal=2), total_step=10)
        for m in mods.values():
            for p in (m.P, m.lam, m.Q):
                p.grad = torch.zeros_like(p)  # all scores 0: one big tie
        budget = alloc.update_and_allocate(1)
        assert torch.all(alloc.scores() == 0)
        expected = torch.arange(alloc.b0) < budget  # the lowest flat indices win
        assert torch.equal(masks(mods), expected)


def test_frozen_modules_are_skipped():
    mods = small_adapters()
    frozen = mods["m1"]
    for p in (frozen.P, frozen.lam, frozen.Q):
        p.requires_grad_(False)
    alloc = RankAllocator(mods, AdaLoraConfig(init_r=4, target_r=1, tinit=2, tfinal=2), total_step=10)
    gen = torch.Generator().manual_seed(0)
    set_random_grads({k: m for k, m in mods.items() if k != "m1"}, gen)
    alloc.update_and_allocate(1)
    state = alloc.state_dict()
    assert all(torch.all(t == 0) for t in state["ibar"][3:6])  # m1's P, lam, Q
    assert all(torch.any(t != 0) for t in state["ibar"][:3] + state["ibar"][6:])


def test_state_dict_resume_matches_uninterrupted():
    T = 16
    cfg = AdaLoraConfig(init_r=4, target_r=1, tinit=2, tfinal=4, delta_t=2)
    a_mods = small_adapters()
    b_mods = copy.deepcopy(a_mods)
    a = RankAllocator(a_mods, cfg, T)
    gen_a, gen_b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for step in range(1, 14):  # past the fixing step 12
        set_random_grads(a_mods, gen_a)
        set_random_grads(b_mods, gen_b)
        a.update_and_allocate(step)
        if step == 7:
            b = RankAllocator(b_mods, cfg, T)
            with torch.no_grad():
                for ma, mb in zip(a_mods.values(), b_mods.values(), strict=True):
                    mb.mask.copy_(ma.mask)
                    mb.lam.copy_(ma.lam)
            b.load_state_dict(a.state_dict())
        elif step > 7:
            b.update_and_allocate(step)
    torch.testing.assert_close(b.scores(), a.scores(), atol=0, rtol=0)
    assert torch.equal(masks(b_mods), masks(a_mods)) and torch.equal(b.final_mask, a.final_mask)


def test_load_state_dict_rejects_other_modules():
    cfg = AdaLoraConfig(init_r=4, target_r=1, tinit=2, tfinal=2)
    a = RankAllocator(small_adapters(), cfg, 10)
    b = RankAllocator(small_adapters((3, 3, 4)), cfg, 10)
    with pytest.raises(CheckpointError, match="does not match"):
        b.load_state_dict(a.state_dict())


def test_step_must_be_one_based():
    alloc = RankAllocator(small_adapters(), AdaLoraConfig(init_r=4, target_r=1), total_step=10)
    with pytest.raises(ValueError, match=r"step \(0\)"):
        alloc.update_and_allocate(0)


# -- config validation -------------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "total_step", "names"), [
    ({"tinit": 6, "tfinal": 5}, 10, ["6 + 5 = 11", "total_step (10)", "lower tinit/tfinal or train longer"]),
    ({"tinit": 4, "tfinal": 6}, 10, ["4 + 6 = 10", "budgeting phase would be empty", "lower tinit/tfinal"]),
    ({"init_r": 4, "target_r": 5}, 10, ["target_r (5)", "init_r (4)", "lower target_r or raise init_r"]),
    ({"beta1": 1.0}, 10, ["beta1 (1.0)", "open interval (0, 1)", "e.g. 0.85"]),
    ({"beta2": 0.0}, 10, ["beta2 (0.0)", "open interval (0, 1)"]),
    ({"beta1": -0.5}, 10, ["beta1 (-0.5)"]),
])
def test_config_errors_name_value_and_fix(kwargs, total_step, names):
    with pytest.raises(ValueError) as err:
        cfg = AdaLoraConfig(**kwargs)
        RankAllocator(small_adapters(), cfg, total_step)
    assert isinstance(err.value, ConfigError)
    for text in names:
        assert text in str(err.value)


def test_config_total_step_checked_at_build():
    with pytest.raises(ConfigError, match=r"must be < total_step \(8\)"):
        AdaLoraConfig(tinit=4, tfinal=4, total_step=8)


# -- no host sync on the device ----------------------------------------------------------------


@pytest.mark.gpu
def test_no_host_sync_on_cuda():
    mods = {k: m.cuda() for k, m in small_adapters().items()}
    alloc = RankAllocator(mods, AdaLoraConfig(init_r=4, target_r=1, tinit=1, tfinal=2), total_step=6)
    gen = torch.Generator().manual_seed(0)
    for step in range(1, 7):  # warm-up, budgeting allocations, fixing, re-applying
        set_random_grads(mods, gen)
        torch.cuda.set_sync_debug_mode("error")
        try:
            alloc.update_and_allocate(step)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert int(masks(mods).sum()) == alloc.bT
