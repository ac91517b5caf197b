"""Aggregate the quality runs (runs-main/*.json by default) into results.json, quality.md and
accuracy_vs_budget.png.

    .venv/bin/python benchmarks/quality/report.py [--runs-dir DIR] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
LABELS = {"ours": "AdaLoRA (ours)", "lora": "LoRA (PEFT)", "peft-adalora": "AdaLoRA (PEFT)"}


def load_runs(runs_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(runs_dir.glob("*.json"))]


def summarise(runs: list[dict]) -> dict:
    """Mean and sample std (n - 1) of accuracy, mean adapter params, over the seeds of one cell."""
    acc = [r["accuracy"] for r in runs]
    params = [r["adapter_params"] for r in runs]
    return {
        "n": len(runs), "seeds": sorted(r["spec"]["seed"] for r in runs),
        "accuracy_mean": statistics.fmean(acc), "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
        "accuracies": acc, "adapter_params_each": params, "adapter_params_mean": statistics.fmean(params),
        "adapter_params_min": min(params), "adapter_params_max": max(params),
        "trainable_params_during_training": runs[0]["trainable_params"],
        "train_s_mean": statistics.fmean(r["train_s"] for r in runs),
    }


def group_cells(runs: list[dict]) -> dict[tuple, dict]:
    """(group, method, rank) -> summary."""
    cells = defaultdict(list)
    for r in runs:
        s = r["spec"]
        cells[(s["group"], s["method"], s["rank"])].append(r)
    return {key: summarise(rs) for key, rs in sorted(cells.items())}


def majority_share() -> float:
    """Share of the majority class in the fixed held-out 1,000 (what always guessing it scores)."""
    from collections import Counter

    from adalora_deploy.data import rotten_tomatoes_splits

    labels = rotten_tomatoes_splits()[1].labels
    return Counter(labels).most_common(1)[0][1] / len(labels)


def fmt_acc(cell: dict) -> str:
    return f"{100 * cell['accuracy_mean']:.2f} ± {100 * cell['accuracy_std']:.2f}"


def main_table(cells: dict) -> list[str]:
    rows = ["| budget | method | held-out accuracy % (mean ± std) | seeds | final adapter params | "
            "trainable params while training | train s/run (shared CPU: noisy, not a speed test) |", "|---|---|---|---|---|---|---|"]
    for (group, method, rank), c in cells.items():
        if group != "main":
            continue
        budget = f"r={rank}" if method == "lora" else f"target_r={rank} (init_r={_init_r(rank)})"
        rows.append(
            f"| ~r={rank} | {LABELS[method]}: {budget} | {fmt_acc(c)} | {c['n']} | {_params(c)} | "
            f"{c['trainable_params_during_training']:,} | {c['train_s_mean']:.0f} |"
        )
    return rows


def ablation_table(cells: dict, rank: int) -> list[str]:
    rows = ["| variant | held-out accuracy % (mean ± std) | seeds | final adapter params |", "|---|---|---|---|"]
    ref = cells.get(("main", "ours", rank))
    if ref:
        rows.append(f"| sensitivity-uncertainty, gamma=0.1 (ours, as in the main table) | {fmt_acc(ref)} | "
                    f"{ref['n']} | {_params(ref)} |")
    for (group, _method, r), c in cells.items():
        if group != "main" and r == rank:
            rows.append(f"| {group} | {fmt_acc(c)} | {c['n']} | {_params(c)} |")
    return rows


def _init_r(rank: int) -> int:
    import math

    return math.ceil(1.5 * rank)


def _params(c: dict) -> str:
    if c["adapter_params_min"] == c["adapter_params_max"]:
        return f"{c['adapter_params_min']:,}"
    return f"{c['adapter_params_mean']:,.0f} ({c['adapter_params_min']:,}-{c['adapter_params_max']:,})"


def plot(cells: dict, majority: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (method, label) in enumerate(LABELS.items()):
        color = f"C{i}"
        cells_m = sorted((c for (g, m, _), c in cells.items() if g == "main" and m == method),
                         key=lambda c: c["adapter_params_mean"])
        if not cells_m:
            continue
        x = [c["adapter_params_mean"] for c in cells_m]
        ax.errorbar(x, [100 * c["accuracy_mean"] for c in cells_m], yerr=[100 * c["accuracy_std"] for c in cells_m],
                    marker="o", capsize=4, color=color, label=f"{label}, mean ± std")
        # Every seed as a faint dot: with 3 seeds, one collapsed run moves the mean a lot.
        for c in cells_m:
            ax.scatter(c["adapter_params_each"], [100 * a for a in c["accuracies"]], color=color, alpha=0.35, s=14)
    ax.axhline(100 * majority, color="grey", ls=":", label=f"majority class ({100 * majority:.1f}%)")
    ax.set_xscale("log")
    ax.set_xlabel("final adapter parameters (log scale)")
    ax.set_ylabel("held-out accuracy % (mean ± std over seeds)")
    ax.set_title("MiniLM on Rotten Tomatoes: accuracy against adapter budget")
    ax.legend(fontsize=8, loc="lower center")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(cells: dict, settings: dict, majority: float, command: str, ablation_rank: int | None, notes: Path) -> str:
    lines = [
        "# Quality: AdaLoRA (ours) against LoRA and PEFT's AdaLoRA on Rotten Tomatoes", "",
        "Produced by (from the repository root, `python` being `.venv/bin/python`; runs-main/*.json hold "
        "each run's command and settings):", "", "```", command, "```", "",
        "## What was run", "",
        f"- Base model: the packaged MiniLM (all-MiniLM-L6-v2, 6 layers, hidden 384) with a fresh 2-way head "
        f"(BertForSequenceClassification); model = `{settings['model'] or 'packaged MiniLM'}`.",
        "- Data: the builtin Rotten Tomatoes snippets (`adalora_deploy.data.rotten_tomatoes_splits`): "
        f"11,808 training rows{_subset(settings)} and the fixed held-out 1,000 (split seed independent of the run seed). "
        f"Majority class on the held-out set: {100 * majority:.1f}%.",
        f"- Every run: {settings['steps']} optimizer steps, batch {settings['batch_size']}, max_length "
        f"{settings['max_length']}, AdamW (weight decay 0, one lr for adapters and head), "
        "linear warm-up over 6% then linear decay, gradient clipping 1.0, device "
        f"`{settings['device']}`; one loop for every method (benchmarks/quality/methods.py, following "
        "`adalora_deploy.training.fit`), so every method sees the same shuffled batches at a given seed.",
        "- Adapted modules for every method: query, key, value, attention.output.dense, intermediate.dense, "
        "output.dense (36 on MiniLM); the classifier head is trained in full; nothing else.",
        f"- Learning rate and scaling per method: LoRA lr {settings['lr']:g}, s = alpha / r = {settings['scaling']:g}; "
        f"AdaLoRA (ours and PEFT alike) lr {settings['adalora_lr']:g}, s = alpha / init_r = "
        f"{settings['adalora_scaling']:g}. AdaLoRA starts with lam = 0 and P, Q ~ N(0, 0.02), so its update "
        "grows far more slowly than LoRA's at equal lr and s (see the notes at the end of benchmarks/quality/quality.md). Dropout 0.",
        f"- AdaLoRA (ours and PEFT): init_r = ceil(1.5 target_r) (the paper's b(0) = 1.5 b(T)), tinit "
        f"{settings['tinit']}, tfinal {settings['tfinal']}, deltaT {settings['delta_t']} (the `train` defaults: "
        "10% / 30% / 1% of the steps), betas 0.85, gamma 0.1 for ours and orth_reg_weight 0.2 for PEFT "
        "(PEFT averages over P and Q separately, so 2 gamma is the same penalty).",
        "- Budget matching: LoRA at rank r has r x 41,472 adapter parameters on MiniLM; AdaLoRA's final budget "
        "is target_r x 36 triplets, and a triplet costs d_in + d_out + 1 (769 for attention, 1,921 for FFN "
        "modules), so target_r = r gives about r x 41,508 parameters if ranks were spread evenly; the table "
        "gives the measured count after pruning (it depends on where the allocator puts the ranks). "
        "AdaLoRA trains more parameters than its final budget (init_r triplets), as in the paper.",
        "- Accuracy is the share of the held-out 1,000 classified right; mean ± sample std over seeds.",
        "", "## AdaLoRA against LoRA at matched budgets", "", *main_table(cells), "",
    ]
    if ablation_rank is not None:
        lines += [f"## Ablations (ours, target_r={ablation_rank})", "", *ablation_table(cells, ablation_rank), ""]
    lines += ["![accuracy against budget](accuracy_vs_budget.png)", ""]
    if notes.exists():
        lines += [notes.read_text().rstrip(), ""]
    return "\n".join(lines)


def _subset(settings: dict) -> str:
    n = settings["train_subset"]
    return f" (a fixed subset of {n:,} of them)" if n else ""


def write_report(runs_dir: Path, out_dir: Path) -> None:
    """Write results.json, quality.md and accuracy_vs_budget.png from the runs in `runs_dir`."""
    runs = load_runs(runs_dir)
    if not runs:
        print(f"no runs in {runs_dir}")
        return
    # Every distinct command line that produced runs of this grid (a grid may be resumed).
    command = "\n".join(dict.fromkeys(r["command"] for r in runs))
    settings = runs[0]["settings"]
    if any(r["settings"] != settings for r in runs):
        raise SystemExit(f"runs in {runs_dir} were made with different settings: keep one grid per directory")
    cells = group_cells(runs)
    ablation_ranks = sorted({r for (g, _, r) in cells if g != "main"})
    ablation_rank = ablation_ranks[0] if ablation_ranks else None
    majority = majority_share()
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {
        "command": command, "settings": settings, "majority_class_accuracy": majority,
        "cells": [{"group": g, "method": m, "rank": r, **c} for (g, m, r), c in cells.items()],
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / "quality.md").write_text(markdown(cells, settings, majority, command, ablation_rank, out_dir / "notes.md"))
    plot(cells, majority, out_dir / "accuracy_vs_budget.png")
    print(f"wrote {out_dir / 'quality.md'}, results.json and accuracy_vs_budget.png ({len(runs)} runs)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs-dir", type=Path, default=HERE / "runs-main")
    p.add_argument("--out-dir", type=Path, default=HERE)
    args = p.parse_args(argv)
    write_report(args.runs_dir, args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
