"""Training-step time with and without the rank allocator and orthogonal penalty, against PEFT's AdaLoRA.

Three variants of the packaged MiniLM (sequence classification, 2 labels), batch 32, sequence 64, CPU,
measured interleaved in one process (the order rotates every round):

  ours:  our SVD adapters, loss + gamma * orth_penalty, our RankAllocator after every optimizer step
  peft:  PEFT's AdaLoRA with the same config (its orth_reg inside forward, its update_and_allocate)
  plain: our SVD adapters, allocator and penalty off (the reference step)
  peft-plain: PEFT's AdaLoRA with its allocator and penalty off (the loss is computed outside PEFT,
         which adds its penalty only when the model computes the loss); it separates PEFT's adapter
         forward/backward cost from its allocator + penalty cost

All steps fall in the budgeting phase with delta_t = 1, so both allocators mask on every step (the
most expensive setting). Besides the step totals, the allocator calls are timed inside each step, and
each penalty's forward + backward is timed on its own (a small part is measured more precisely
directly than as a difference of two noisy totals).

One intra-op thread by default: on a machine whose few cores other jobs share, every multi-threaded
OpenMP region waits at its barrier for a descheduled thread, which inflates small ops such as the
penalty's many tiny matmuls many times over and makes the figures unreproducible.

Usage:
    .venv/bin/python benchmarks/train_overhead.py --rounds 15 --out benchmarks/train_overhead
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from adalora_deploy.constants import SEQUENCE_CLASSIFICATION

TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
INIT_R, TARGET_R, ALPHA, GAMMA, LR = 12, 4, 32.0, 0.1, 1e-3
TOTAL_STEP, TINIT, TFINAL = 1000, 0, 100  # measured steps stay in the budgeting phase (1..~40)
BATCH, SEQ = 32, 64
VARIANTS = {
    "ours": "our SVD adapters + gamma * orth_penalty in the loss + our RankAllocator after every optimizer step",
    "peft": "PEFT's AdaLoRA, same config: its orth_reg (inside forward) + its update_and_allocate",
    "plain": "our SVD adapters, allocator and penalty off (the reference step)",
    "peft-plain": "PEFT's AdaLoRA with its allocator and penalty off (loss computed outside PEFT)",
}


@dataclass
class Variant:
    """One model under test, its optimizer, its step function and its timings."""

    name: str
    model: torch.nn.Module
    step_fn: object
    optimizer: torch.optim.Optimizer | None = None
    allocator: object = None  # our RankAllocator (ours), None otherwise
    step: int = 0
    totals: list[float] = field(default_factory=list)
    allocator_s: list[float] = field(default_factory=list)
    penalty_s: list[float] = field(default_factory=list)


def load_minilm():
    from adalora_deploy.model import load_base_model

    torch.manual_seed(0)
    return load_base_model(None, SEQUENCE_CLASSIFICATION, num_labels=2)


def build_ours(with_allocator: bool) -> Variant:
    from adalora_deploy.allocator import RankAllocator
    from adalora_deploy.config import AdaLoraConfig
    from adalora_deploy.model import prepare_model

    cfg = AdaLoraConfig(target_modules=TARGETS, init_r=INIT_R, target_r=TARGET_R, alpha=ALPHA,
                        tinit=TINIT, tfinal=TFINAL, delta_t=1, orth_reg=GAMMA)
    model = prepare_model(load_minilm(), cfg)
    variant = Variant("ours" if with_allocator else "plain", model, None)
    variant.allocator = RankAllocator(model, cfg, TOTAL_STEP) if with_allocator else None
    variant.step_fn = lambda batch: ours_step(variant, batch)
    return variant


def ours_step(v: Variant, batch: dict) -> None:
    loss = v.model(**batch).loss
    if v.allocator is not None:
        loss = loss + GAMMA * v.model.orth_penalty()
    loss.backward()
    v.optimizer.step()
    if v.allocator is not None:
        t0 = time.perf_counter()
        v.allocator.update_and_allocate(v.step)
        v.allocator_s.append(time.perf_counter() - t0)
    v.optimizer.zero_grad(set_to_none=True)


def build_peft(with_allocator: bool) -> Variant:
    import peft

    cfg = peft.AdaLoraConfig(target_modules=TARGETS, init_r=INIT_R, target_r=TARGET_R, lora_alpha=ALPHA,
                             tinit=TINIT, tfinal=TFINAL, deltaT=1, total_step=TOTAL_STEP,
                             orth_reg_weight=GAMMA, task_type="SEQ_CLS")
    model = peft.get_peft_model(load_minilm(), cfg)
    variant = Variant("peft" if with_allocator else "peft-plain", model, None)
    step = peft_step if with_allocator else peft_plain_step
    variant.step_fn = lambda batch: step(variant, batch)
    return variant


def peft_step(v: Variant, batch: dict) -> None:
    v.model(**batch).loss.backward()  # PEFT adds orth_reg_weight * its penalty inside forward
    v.optimizer.step()
    t0 = time.perf_counter()
    v.model.base_model.update_and_allocate(v.step)
    v.allocator_s.append(time.perf_counter() - t0)
    v.optimizer.zero_grad(set_to_none=True)


def peft_plain_step(v: Variant, batch: dict) -> None:
    inputs = {k: t for k, t in batch.items() if k != "labels"}
    logits = v.model(**inputs).logits  # (B, 2); no labels, so PEFT adds no penalty
    torch.nn.functional.cross_entropy(logits, batch["labels"]).backward()
    v.optimizer.step()
    v.optimizer.zero_grad(set_to_none=True)


def time_ours_penalty(v: Variant) -> float:
    """Forward + backward of gamma * orth_penalty alone, as it adds to our step."""
    t0 = time.perf_counter()
    (GAMMA * v.model.orth_penalty()).backward()
    elapsed = time.perf_counter() - t0
    v.optimizer.zero_grad(set_to_none=True)
    return elapsed


def time_peft_penalty(v: Variant) -> float:
    """Forward + backward of PEFT's own penalty code alone: its AdaLoraModel.forward runs over an inner
    model whose forward is swapped, for this call only, for one returning a constant loss."""
    inner = v.model.base_model.model
    inner.forward = lambda *a, **k: SimpleNamespace(loss=torch.zeros((), requires_grad=True) * 1.0)
    try:
        t0 = time.perf_counter()
        v.model.base_model(input_ids=None).loss.backward()
        elapsed = time.perf_counter() - t0
    finally:
        del inner.forward
    v.optimizer.zero_grad(set_to_none=True)
    return elapsed


def make_batch(gen: torch.Generator, vocab: int) -> dict:
    # Compute cost does not depend on token values at a fixed length, so random ids stand in for text.
    return {
        "input_ids": torch.randint(1000, vocab, (BATCH, SEQ), generator=gen),  # (B, T)
        "attention_mask": torch.ones(BATCH, SEQ, dtype=torch.long),  # (B, T)
        "labels": torch.randint(0, 2, (BATCH,), generator=gen),  # (B,)
    }


def run_step(v: Variant, batch: dict, record: bool) -> None:
    v.step += 1
    t0 = time.perf_counter()
    v.step_fn(batch)
    if record:
        v.totals.append(time.perf_counter() - t0)
    elif v.allocator_s:
        v.allocator_s.pop()  # warm-up steps are not recorded


def rounds(variants: list[Variant], n_rounds: int, warmup: int, vocab: int) -> None:
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(0)
    for r in tqdm(range(warmup + n_rounds), desc="rounds"):
        batch = make_batch(gen, vocab)
        k = r % len(variants)
        order = variants[k:] + variants[:k]  # rotate so no variant always runs first
        for v in order:
            run_step(v, batch, record=r >= warmup)
        if r >= warmup:
            variants[0].penalty_s.append(time_ours_penalty(variants[0]))
            variants[1].penalty_s.append(time_peft_penalty(variants[1]))


def time_final_phase(ours: Variant, theirs: Variant, reps: int) -> dict:
    """Per-step cost of re-applying the fixed mask after T - tfinal (no training step needed)."""
    out = {}
    for name, call in (("ours", ours.allocator.update_and_allocate),
                       ("peft", theirs.model.base_model.update_and_allocate)):
        call(TOTAL_STEP - TFINAL)  # fixes the final mask
        times = []
        for k in range(reps):
            t0 = time.perf_counter()
            call(TOTAL_STEP - TFINAL + 1 + k)
            times.append(time.perf_counter() - t0)
        out[name] = summary(times)
    return out


def summary(xs: list[float]) -> dict:
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return {"median": statistics.median(xs), "p25": q[0], "p75": q[2], "min": min(xs), "max": max(xs), "n": len(xs)}


def paired_pct(v: Variant, ref: Variant) -> float:
    """Median over rounds of v / ref - 1, in %: each ratio compares steps run side by side."""
    return 100 * statistics.median(a / c - 1 for a, c in zip(v.totals, ref.totals, strict=True))


def analyse(ours: Variant, theirs: Variant, plain: Variant, peft_plain: Variant) -> dict:
    everyone = (ours, theirs, plain, peft_plain)
    med = {v.name: statistics.median(v.totals) for v in everyone}
    direct = {
        v.name: {"allocator": summary(v.allocator_s), "penalty_fwd_bwd": summary(v.penalty_s)}
        for v in (ours, theirs)
    }
    direct_pct = {
        name: 100 * (d["allocator"]["median"] + d["penalty_fwd_bwd"]["median"]) / med["plain"]
        for name, d in direct.items()
    }
    return {
        "step_s": {v.name: summary(v.totals) for v in everyone},
        "overhead_pct_from_medians": {n: 100 * (med[n] - med["plain"]) / med["plain"] for n in ("ours", "peft")},
        "overhead_pct_paired_median": {"ours": paired_pct(ours, plain), "peft": paired_pct(theirs, plain)},
        "peft_vs_peft_plain_pct_paired_median": paired_pct(theirs, peft_plain),
        "peft_plain_vs_plain_pct_paired_median": paired_pct(peft_plain, plain),
        "direct_s": direct,
        "overhead_pct_direct": direct_pct,
    }


def environment(threads: int, load_before: tuple) -> dict:
    import peft
    import transformers

    return {
        "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
        "python": platform.python_version(), "cpu_count": os.cpu_count(), "torch_threads": threads,
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
    }


def ms(x: float) -> str:
    return f"{1000 * x:.1f}"


def markdown(result: dict) -> str:
    a, env, cfg = result["analysis"], result["environment"], result["config"]
    lines = [
        "# Training-step overhead of the rank allocator + orthogonal penalty (CPU)", "",
        "Command:", "", "```", result["command"], "```", "",
        f"MiniLM (packaged), sequence classification, batch {BATCH}, sequence {SEQ}, "
        f"init_r {INIT_R}, target_r {TARGET_R}, gamma {GAMMA}, delta_t 1 (masking on every step), "
        f"{len(cfg['targets'])} target suffixes -> {cfg['n_adapted_modules']} adapted modules. "
        f"{cfg['rounds']} interleaved rounds after {cfg['warmup']} warm-up rounds; torch threads "
        f"{env['torch_threads']} on {env['cpu_count']} cores; load average before "
        f"{env['loadavg_before'][0]:.2f}, after {env['loadavg_after'][0]:.2f} "
        "(the cores are shared with other engineers' jobs, so absolute times are noisy; ratios "
        "within a round and the direct timings are the robust figures).", "",
        *[f"- `{name}`: {text}" for name, text in VARIANTS.items()], "",
        "## Step time (ms)", "",
        "| variant | median | p25 | p75 | min | max |", "|---|---|---|---|---|---|",
    ]
    for name, s in a["step_s"].items():
        lines.append(f"| {name} | {ms(s['median'])} | {ms(s['p25'])} | {ms(s['p75'])} | {ms(s['min'])} | {ms(s['max'])} |")
    lines += [
        "", "## Overhead of allocator + penalty, % of the plain step", "",
        "| | ours | PEFT |", "|---|---|---|",
        "| direct: (allocator call + penalty fwd/bwd) / plain median | "
        f"{a['overhead_pct_direct']['ours']:.2f} | {a['overhead_pct_direct']['peft']:.2f} |",
        "| difference of medians: (variant - plain) / plain | "
        f"{a['overhead_pct_from_medians']['ours']:.2f} | {a['overhead_pct_from_medians']['peft']:.2f} |",
        "| median of per-round ratios variant / plain - 1 | "
        f"{a['overhead_pct_paired_median']['ours']:.2f} | {a['overhead_pct_paired_median']['peft']:.2f} |",
        "| median of per-round ratios against the variant's own plain step "
        f"(ours / plain, peft / peft-plain) - 1 | {a['overhead_pct_paired_median']['ours']:.2f} | "
        f"{a['peft_vs_peft_plain_pct_paired_median']:.2f} |",
        "", "PEFT's adapter forward/backward alone (peft-plain / plain - 1, median of per-round ratios): "
        f"{a['peft_plain_vs_plain_pct_paired_median']:.2f}%.",
        "", verdict(a), "",
        "## Direct timings (ms, median [p25, p75])", "",
        "| part | ours | PEFT |", "|---|---|---|",
    ]
    labels = {"allocator": "allocator call, budgeting phase (masking every step)",
              "penalty_fwd_bwd": "orthogonal penalty, forward + backward alone"}
    for part, label in labels.items():
        cells = [f"{ms(a['direct_s'][n][part]['median'])} [{ms(a['direct_s'][n][part]['p25'])}, "
                 f"{ms(a['direct_s'][n][part]['p75'])}]" for n in ("ours", "peft")]
        lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
    fin = result["final_phase_s"]
    lines.append(f"| allocator, final phase (re-apply fixed mask) | {ms(fin['ours']['median'])} "
                 f"[{ms(fin['ours']['p25'])}, {ms(fin['ours']['p75'])}] | {ms(fin['peft']['median'])} "
                 f"[{ms(fin['peft']['p25'])}, {ms(fin['peft']['p75'])}] |")
    lines += ["", "Versions: " + ", ".join(f"{k} {env[k]}" for k in ("torch", "transformers", "peft", "python")), ""]
    return "\n".join(lines)


def verdict(a: dict) -> str:
    """The targets (ours <= PEFT, ours <= 3% of the step), judged on the direct measurement."""
    ours, theirs = a["overhead_pct_direct"]["ours"], a["overhead_pct_direct"]["peft"]
    at_most_peft = "met" if ours <= theirs else "MISSED"
    under_3 = "met" if ours <= 3.0 else "MISSED"
    return (f"Targets, on the direct measurement: ours <= PEFT's: {at_most_peft} ({ours:.2f}% vs {theirs:.2f}%); "
            f"ours <= 3% of the step: {under_3}.")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15, help="measured rounds (one step of each variant)")
    parser.add_argument("--warmup", type=int, default=2, help="unrecorded rounds first")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1: steady on shared cores, see the module docstring)")
    parser.add_argument("--final-reps", type=int, default=20, help="final-phase allocator calls timed")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/train_overhead"),
                        help="writes OUT.json and OUT.md")
    parser.add_argument("--render", action="store_true",
                        help="measure nothing: rewrite OUT.md from the results in OUT.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.render:
        args.out.with_suffix(".md").write_text(markdown(json.loads(args.out.with_suffix(".json").read_text())))
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    ours, theirs, plain, peft_plain = build_ours(True), build_peft(True), build_ours(False), build_peft(False)
    everyone = [ours, theirs, plain, peft_plain]
    for v in everyone:
        v.optimizer = torch.optim.AdamW([p for p in v.model.parameters() if p.requires_grad], lr=LR)
    n_ours = len(ours.model.adapters)
    n_peft = sum(1 for _, m in theirs.model.named_modules() if hasattr(m, "lora_E"))
    assert n_ours == n_peft, (n_ours, n_peft)
    vocab = ours.model.model.config.vocab_size
    rounds(everyone, args.rounds, args.warmup, vocab)
    result = {
        "command": " ".join([".venv/bin/python", "benchmarks/train_overhead.py", *(sys.argv[1:] if argv is None else argv)]),
        "config": {"targets": TARGETS, "n_adapted_modules": n_ours, "rounds": args.rounds, "warmup": args.warmup,
                   "batch": BATCH, "seq": SEQ, "init_r": INIT_R, "target_r": TARGET_R, "gamma": GAMMA,
                   "total_step": TOTAL_STEP, "tinit": TINIT, "tfinal": TFINAL, "delta_t": 1},
        "raw_s": {v.name: {"step": v.totals, "allocator": v.allocator_s, "penalty": v.penalty_s}
                  for v in everyone},
        "analysis": analyse(ours, theirs, plain, peft_plain),
    }
    result["final_phase_s"] = time_final_phase(ours, theirs, args.final_reps)
    result["environment"] = environment(args.threads, load_before)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
