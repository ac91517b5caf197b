"""Our RankAllocator against PEFT's AdaLoRA on the same parameters and gradients.

A tiny BERT is adapted twice, by PEFT (lora_A, lora_E, lora_B) and by us (Q, lam, P), with equal
weights. Every step both get the same weight moves and gradients, then both allocators run with
the same 1-based step. The EMAs, the triplet scores, the budgets and the masks must agree.

Where they differ by design: PEFT keeps the triplets whose score is above the (b0 - b)-th smallest
score (torch.kthvalue, then `<=` masks), so on a tie at that threshold it masks more than b0 - b
triplets; we keep exactly b (stable sort, lower index first). With random gradients there are no
ties and the masks are equal; `test_ties_peft_masks_more_than_needed` shows the difference.
"""

import copy

import pytest
import torch
from transformers import BertForSequenceClassification

from adalora_deploy.allocator import RankAllocator, budget_schedule
from adalora_deploy.config import AdaLoraConfig
from adalora_deploy.model import prepare_model

from .conftest import tiny_bert_config

peft = pytest.importorskip("peft")

TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
KEYS = {"P": "lora_B", "lam": "lora_E", "Q": "lora_A"}  # ours -> PEFT's name


def build_pair(T, tinit, tfinal, delta_t, init_r=4, target_r=2):
    """(our AdaLoraModel, our RankAllocator, PEFT's AdaLoraModel, {name: PEFT layer}) with equal weights."""
    torch.manual_seed(0)
    base = BertForSequenceClassification(tiny_bert_config(num_hidden_layers=2))
    ours = prepare_model(copy.deepcopy(base), AdaLoraConfig(
        target_modules=TARGETS, init_r=init_r, target_r=target_r, tinit=tinit, tfinal=tfinal, delta_t=delta_t))
    theirs = peft.get_peft_model(base, peft.AdaLoraConfig(
        target_modules=TARGETS, init_r=init_r, target_r=target_r, tinit=tinit, tfinal=tfinal, deltaT=delta_t,
        total_step=T, beta1=0.85, beta2=0.85, lora_alpha=8)).base_model
    layers = {name: m for name, m in theirs.model.named_modules() if hasattr(m, "lora_E")}
    assert sorted(layers) == sorted(ours.adapters) and len(layers) == 12
    with torch.no_grad():
        for name, m in ours.adapters.items():
            for key in ("P", "lam", "Q"):
                getattr(m, key).normal_()  # O(1) values so that atol 1e-6 on the scores means something
                peft_param(layers[name], key).copy_(getattr(m, key).view_as(peft_param(layers[name], key)))
    return ours, RankAllocator(ours, ours.config, T), theirs, layers


def peft_param(layer, key) -> torch.nn.Parameter:
    return getattr(layer, KEYS[key])["default"]  # lora_E is (r, 1), our lam is (r,)


def same_step(ours, layers, gen) -> None:
    """An equal optimizer-like move of every weight and equal fresh gradients, on both sides."""
    with torch.no_grad():
        for name, m in ours.adapters.items():
            for key in ("P", "lam", "Q"):
                mine, other = getattr(m, key), peft_param(layers[name], key)
                move, grad = torch.randn(2, *mine.shape, generator=gen)
                mine.add_(0.1 * move)
                other.add_(0.1 * move.view_as(other))
                mine.grad, other.grad = grad.clone(), grad.view_as(other).clone()


def peft_scores(theirs, layers) -> torch.Tensor:
    """PEFT's triplet scores, from its own element scores and combination, in our module order."""
    alloc = theirs.rankallocator
    out = []
    for name in layers:
        def score(key, name=name):
            return alloc._element_score(f"{name}.{KEYS[key]}.default")
        vec = torch.cat([score("Q").mean(dim=1, keepdim=True), score("P").mean(dim=0).view(-1, 1)], dim=1)
        out.append(alloc._combine_ipt(score("lam"), vec))  # (r,)
    return torch.cat(out)


def assert_ema_equal(alloc, theirs, layers) -> None:
    ra = theirs.rankallocator
    state = alloc.state_dict()
    for k, name in enumerate(layers):
        for j, key in enumerate(("P", "lam", "Q")):
            pname = f"{name}.{KEYS[key]}.default"
            for mine, other in ((state["ibar"], ra.exp_avg_ipt), (state["ubar"], ra.exp_avg_unc)):
                torch.testing.assert_close(mine[3 * k + j], other[pname].view_as(mine[3 * k + j]), atol=1e-6, rtol=0)


def assert_lam_equal(ours, layers, check_mask: bool) -> None:
    """lam equal on both sides; right after an allocation, our mask is where PEFT's lam is not 0."""
    for name, m in ours.adapters.items():
        lora_E = peft_param(layers[name], "lam").detach().view(-1)
        torch.testing.assert_close(m.lam.detach(), lora_E, atol=0, rtol=0)
        if check_mask:  # between allocations the optimizer moves pruned lam away from 0 again
            assert torch.equal(m.mask, lora_E != 0), name


@pytest.mark.parametrize(("T", "tinit", "tfinal", "delta_t"), [(14, 2, 4, 1), (16, 3, 4, 3)])
def test_same_as_peft_over_a_whole_run(T, tinit, tfinal, delta_t):
    ours, alloc, theirs, layers = build_pair(T, tinit, tfinal, delta_t)
    gen = torch.Generator().manual_seed(1)
    masked_steps = 0
    for step in range(1, T + 1):
        same_step(ours, layers, gen)
        budget = alloc.update_and_allocate(step)
        theirs.update_and_allocate(step)  # PEFT's documented call: after optimizer.step(), 1-based
        assert budget == theirs.rankallocator.budget_schedule(step)[0]
        if step < T - tfinal:  # PEFT resets its EMAs at T - tfinal
            assert_ema_equal(alloc, theirs, layers)
            torch.testing.assert_close(alloc.scores(), peft_scores(theirs, layers), atol=1e-6, rtol=0)
        allocated = alloc.is_allocation_step(step) or step > T - tfinal
        assert_lam_equal(ours, layers, check_mask=allocated)
        masked_steps += allocated
    assert masked_steps == len([t for t in range(tinit + 1, T - tfinal) if t % delta_t == 0]) + 1 + tfinal
    assert sum(ours.ranks().values()) == alloc.bT == 2 * 12
    final = theirs.peft_config["default"].rank_pattern
    for name, m in ours.adapters.items():
        assert m.mask.tolist() == final[f"{name}.lora_E.default"], name


def test_schedule_equals_peft():
    T, tinit, tfinal = 50, 7, 11
    _, alloc, theirs, _ = build_pair(T, tinit, tfinal, delta_t=1, init_r=6, target_r=2)
    ra = theirs.rankallocator
    assert (alloc.b0, alloc.bT) == (ra.init_bgt, ra.target_bgt) == (72, 24)
    for step in range(0, T + 1):
        assert alloc.budget(step) == ra.budget_schedule(step)[0]
        assert budget_schedule(step, T, tinit, tfinal, 72, 24) == ra.budget_schedule(step)[0]


def test_ties_peft_masks_more_than_needed():
    """All weights and gradients 1: every triplet has the same score. PEFT's `<= kthvalue` threshold
    then masks every triplet; our exact top-b keeps exactly b, the lowest flat indices."""
    T, tinit = 10, 0
    ours, alloc, theirs, layers = build_pair(T, tinit, tfinal=2, delta_t=1)
    with torch.no_grad():
        for name, m in ours.adapters.items():
            for key in ("P", "lam", "Q"):
                for p in (getattr(m, key), peft_param(layers[name], key)):
                    p.fill_(1.0)
                    p.grad = torch.ones_like(p)
    budget = alloc.update_and_allocate(1)
    theirs.update_and_allocate(1)
    scores = alloc.scores()
    torch.testing.assert_close(scores, peft_scores(theirs, layers), atol=1e-6, rtol=0)
    assert torch.all(scores == scores[0])
    mine = torch.cat([m.mask for m in ours.adapters.values()])
    assert int(mine.sum()) == budget == alloc.budget(1) > 0
    assert torch.equal(mine, torch.arange(alloc.b0) < budget)
    peft_kept = sum(int((peft_param(layer, "lam") != 0).sum()) for layer in layers.values())
    assert peft_kept == 0  # PEFT keeps none of the b it was asked for
