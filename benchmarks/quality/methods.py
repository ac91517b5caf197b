"""The three methods of the quality benchmark, trained by ONE loop so that only the adapter differs:
ours (adalora_deploy's SVD adapter + RankAllocator + orth penalty, through its Python API), PEFT's
LoRA, and PEFT's AdaLoRA.

The loop follows `adalora_deploy.training.fit` (AdamW with no weight decay, linear warm-up over 6% of
the steps then linear decay, gradient clipping at 1.0, the allocator after optimizer.step() and before
zero_grad()), draws plain shuffled batches from `adalora_deploy.data.batches` (identical for every
method at one seed; no length grouping), and adds a `device` so that the full-size grid can run on a
GPU; scoring mirrors `training.evaluate`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from adalora_deploy.constants import SEQUENCE_CLASSIFICATION
from adalora_deploy.data import Encoded, batches, collate
from adalora_deploy.training import EVAL_BATCH_SIZE, MAX_GRAD_NORM, WARMUP_FRACTION

# The paper's adapted modules for BERT: every attention and FFN projection (36 on MiniLM).
TARGET_MODULES = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
# The paper starts AdaLoRA at 1.5x its final budget: init_r = ceil(1.5 * target_r).
INIT_FACTOR = 1.5


@dataclass
class Schedule:
    """What every method shares: optimizer steps, batch, learning rate, and the device.

    Args:
        steps: optimizer steps.
        batch_size: rows per step.
        lr: AdamW learning rate (adapters and classifier head alike), weight decay 0.
        device: "cpu" or "cuda".
    """

    steps: int
    batch_size: int
    lr: float
    device: str = "cpu"


@dataclass
class Method:
    """A model ready to train, plus the hooks the loop calls.

    Args:
        model: returns `.loss` and `.logits` when called on a collated batch.
        after_step: called with the 1-based step after optimizer.step(), before zero_grad().
        penalty: extra loss added to the task loss (our orth penalty), or None.
        adapter_params: counts adapter parameters once training is done (after pruning).
        ranks: final rank per module once training is done, or None for LoRA.
    """

    model: torch.nn.Module
    after_step: Callable[[int], object] | None
    penalty: Callable[[], torch.Tensor] | None
    adapter_params: Callable[[], int]
    ranks: Callable[[], dict[str, int]] | None = None


def _to(batch: dict, device: str) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def fit(method: Method, train: Encoded, schedule: Schedule, seed: int, progress=None) -> list[float]:
    """Train `method.model` in place; returns the task loss of every step.

    Args:
        method: the model and its hooks.
        train: the tokenised training rows.
        schedule: steps, batch size, lr, device.
        seed: the batch-order seed (the same batches for every method).
        progress: an optional tqdm bar, advanced once per step.
    """
    from transformers import get_linear_schedule_with_warmup

    model = method.model
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=schedule.lr, weight_decay=0.0)
    sched = get_linear_schedule_with_warmup(opt, round(WARMUP_FRACTION * schedule.steps), schedule.steps)
    model.train()
    losses = []
    rows = batches(len(train), schedule.batch_size, seed)
    for step, idx in zip(range(1, schedule.steps + 1), rows, strict=False):
        loss = model(**_to(collate(train, idx), schedule.device)).loss
        total = loss + method.penalty() if method.penalty is not None else loss
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        opt.step()
        sched.step()
        if method.after_step is not None:
            method.after_step(step)
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses


@torch.no_grad()
def evaluate(model: torch.nn.Module, heldout: Encoded, device: str = "cpu") -> float:
    """Held-out accuracy, batched by length as `training.evaluate` does."""
    model.eval()
    order = sorted(range(len(heldout)), key=lambda i: len(heldout.input_ids[i]))
    correct = 0
    for start in range(0, len(order), EVAL_BATCH_SIZE):
        batch = _to(collate(heldout, order[start:start + EVAL_BATCH_SIZE]), device)
        labels = batch.pop("labels")  # (B,)
        correct += int((model(**batch).logits.argmax(dim=-1) == labels).sum())
    return correct / len(heldout)


def load_classifier(model_path: str, id2label: dict[int, str]):
    """The base model with a fresh 2-way classification head (trained by every method)."""
    from adalora_deploy.model import load_base_model

    return load_base_model(
        model_path, SEQUENCE_CLASSIFICATION, num_labels=len(id2label), id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
    )


def init_rank(target_r: int) -> int:
    return math.ceil(INIT_FACTOR * target_r)


# -- the three methods -----------------------------------------------------------------------------


def build_ours(
    base, target_r: int, steps: int, orth_reg: float, importance: str, schedule: tuple, scaling: float,
) -> Method:
    """Our AdaLoRA through the library's Python API: prepare_model + RankAllocator + orth penalty.

    Args:
        base: the classifier to adapt (moved to the device already).
        target_r: average final rank; init_r = ceil(1.5 * target_r), alpha = scaling * init_r.
        steps: T of the budget schedule.
        orth_reg: gamma.
        importance: the allocator's importance metric.
        schedule: (tinit, tfinal, delta_t).
        scaling: s = alpha / init_r.
    """
    from adalora_deploy.allocator import RankAllocator
    from adalora_deploy.config import AdaLoraConfig
    from adalora_deploy.model import prepare_model

    tinit, tfinal, delta_t = schedule
    init_r = init_rank(target_r)
    config = AdaLoraConfig(
        target_modules=TARGET_MODULES, init_r=init_r, target_r=target_r, alpha=scaling * init_r,
        tinit=tinit, tfinal=tfinal, delta_t=delta_t, orth_reg=orth_reg, importance=importance, total_step=steps,
    )
    model = prepare_model(base, config)
    allocator = RankAllocator(model, config, steps)
    penalty = (lambda: orth_reg * model.orth_penalty()) if orth_reg > 0 else None
    return Method(model, allocator.update_and_allocate, penalty,
                  lambda: model.parameter_counts()["adapter_params_after"], model.ranks)


def build_prune_lora(base, target_r: int, steps: int, schedule: tuple, scaling: float) -> Method:
    """The paper's "prune LoRA" ablation: plain LoRA doublets W0 + s P Q (P = 0 at init, like LoRA's B)
    pruned by the same allocator, without lam and without the orth penalty.

    Built from our adapter with lam frozen at 1: the allocator's triplet score then reduces to the
    doublet score mean s(P[:, i]) + mean s(Q[i, :]), and masking sets lam[i] = 0, which removes the
    doublet for good (lam does not train, so a pruned doublet cannot come back).
    """
    from adalora_deploy.allocator import RankAllocator
    from adalora_deploy.config import AdaLoraConfig
    from adalora_deploy.model import prepare_model

    tinit, tfinal, delta_t = schedule
    init_r = init_rank(target_r)
    config = AdaLoraConfig(
        target_modules=TARGET_MODULES, init_r=init_r, target_r=target_r, alpha=scaling * init_r,
        tinit=tinit, tfinal=tfinal, delta_t=delta_t, orth_reg=0.0, total_step=steps,
    )
    model = prepare_model(base, config)
    with torch.no_grad():
        for m in model.adapters.values():
            m.P.zero_()
            m.lam.fill_(1.0).requires_grad_(False)
    allocator = RankAllocator(model, config, steps)

    def doublet_params() -> int:
        return sum(int(m.mask.sum()) * (m.d_in + m.d_out) for m in model.adapters.values())

    return Method(model, allocator.update_and_allocate, None, doublet_params, model.ranks)


def build_peft_lora(base, r: int, scaling: float) -> Method:
    """PEFT's LoRA at rank r on TARGET_MODULES; task type SEQ_CLS also trains the classifier head."""
    from peft import LoraConfig, TaskType, get_peft_model

    model = get_peft_model(base, LoraConfig(
        task_type=TaskType.SEQ_CLS, r=r, lora_alpha=scaling * r, lora_dropout=0.0, target_modules=TARGET_MODULES,
    ))
    count = sum(p.numel() for n, p in model.named_parameters() if "lora_A" in n or "lora_B" in n)
    return Method(model, None, None, lambda: count)


def build_peft_adalora(base, target_r: int, steps: int, orth_reg: float, schedule: tuple, scaling: float) -> Method:
    """PEFT's AdaLoRA with update_and_allocate(step) after every optimizer step.

    PEFT adds its orth penalty inside forward when labels are given, as the mean over the P and Q
    matrices separately; ours is the mean over modules of (P norm + Q norm), so PEFT's weight is
    2 * gamma for the same penalty.
    """
    from peft import AdaLoraConfig, TaskType, get_peft_model

    tinit, tfinal, delta_t = schedule
    init_r = init_rank(target_r)
    model = get_peft_model(base, AdaLoraConfig(
        task_type=TaskType.SEQ_CLS, init_r=init_r, target_r=target_r, lora_alpha=scaling * init_r,
        lora_dropout=0.0, target_modules=TARGET_MODULES, tinit=tinit, tfinal=tfinal, deltaT=delta_t,
        orth_reg_weight=2 * orth_reg, total_step=steps,
    ))
    return Method(model, model.base_model.update_and_allocate, None,
                  lambda: peft_adalora_params(model), lambda: peft_adalora_ranks(model))


def peft_adalora_ranks(model) -> dict[str, int]:
    """Final rank of every module of a PEFT AdaLoRA model, read from its rank_pattern."""
    pattern = model.peft_config["default"].rank_pattern
    return {name.removesuffix(".lora_E.default").removesuffix(".lora_E"): int(sum(keep))
            for name, keep in pattern.items()}


def peft_adalora_params(model) -> int:
    """Adapter parameters after pruning: kept triplets * (d_in + d_out + 1), as our manifest counts."""
    ranks = peft_adalora_ranks(model)
    total = 0
    for name, module in model.named_modules():
        key = name.removeprefix("base_model.model.")
        if key in ranks and hasattr(module, "lora_E"):
            d_out, d_in = module.get_base_layer().weight.shape
            total += ranks[key] * (d_in + d_out + 1)
    return total


@dataclass
class RunOutcome:
    """One run's figures."""

    accuracy: float
    adapter_params: int
    trainable_params: int
    ranks: dict[str, int] | None
    final_loss: float
    train_s: float


def run_method(method: Method, train: Encoded, heldout: Encoded, schedule: Schedule, seed: int, progress=None):
    """Train, score and count one method; returns a RunOutcome."""
    trainable = sum(p.numel() for p in method.model.parameters() if p.requires_grad)
    start = time.perf_counter()
    losses = fit(method, train, schedule, seed, progress)
    train_s = time.perf_counter() - start
    acc = evaluate(method.model, heldout, schedule.device)
    ranks = method.ranks() if method.ranks is not None else None
    return RunOutcome(acc, method.adapter_params(), trainable, ranks, sum(losses[-20:]) / len(losses[-20:]), train_s)
