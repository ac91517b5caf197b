"""Quality benchmark: our AdaLoRA against PEFT's LoRA and PEFT's AdaLoRA on Rotten Tomatoes, at
matched adapter-parameter budgets, plus the paper's ablations. Every run fine-tunes the packaged
MiniLM on the same training rows and is scored on the same fixed held-out 1,000.

Each run writes runs-main/<run_id>.json (or --runs-dir) as soon as it ends, so partial grids
survive; `report.py` turns them into results.json, quality.md and accuracy_vs_budget.png (it runs at
the end of this script).

CPU-sized run (what is committed; see quality.md), two workers of one thread each:
    .venv/bin/python benchmarks/quality/run_quality.py --shard 0/2 &
    .venv/bin/python benchmarks/quality/run_quality.py --shard 1/2
Full-size run on a GPU (the defaults are sized for 2 shared CPU cores; the learning rates and
scalings were picked for 150-step runs and should be re-checked for long ones):
    .venv/bin/python benchmarks/quality/run_quality.py --device cuda --steps 3000 --batch-size 32 \
        --max-length 64 --runs-dir benchmarks/quality/runs-gpu --out-dir benchmarks/quality/gpu
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

METHODS = ("ours", "lora", "peft-adalora")
# The paper's ablations (Zhang et al. 2023, Sec. 4.4), at one budget: our AdaLoRA with one part
# changed, and "prune LoRA" (the allocator on plain LoRA doublets, methods.build_prune_lora).
ABLATIONS = {
    "importance=sensitivity": {"importance": "sensitivity"},
    "importance=magnitude": {"importance": "magnitude"},
    "orth_reg=0": {"orth_reg": 0.0},
    "prune-lora": {"method": "prune-lora", "orth_reg": 0.0},
}


@dataclass(frozen=True)
class RunSpec:
    """One training run.

    Args:
        method: "ours", "lora" (PEFT), "peft-adalora" or "prune-lora".
        rank: LoRA's r, or AdaLoRA's target_r (init_r = ceil(1.5 * target_r)).
        seed: model-initialisation and batch-order seed.
        importance: our allocator's importance metric.
        orth_reg: gamma of the orth penalty (AdaLoRA methods).
        group: "main" or the ablation's name.
    """

    method: str
    rank: int
    seed: int
    importance: str = "sensitivity-uncertainty"
    orth_reg: float = 0.1
    group: str = "main"

    @property
    def run_id(self) -> str:
        group = "" if self.group in ("main", self.method) else "-" + self.group.replace("=", "-")
        return f"{self.method}-r{self.rank}{group}-s{self.seed}"


@dataclass(frozen=True)
class Settings:
    """What every run of one grid shares (recorded in each run's JSON)."""

    model: str | None
    steps: int
    batch_size: int
    lr: float
    scaling: float
    adalora_lr: float
    adalora_scaling: float
    max_length: int
    train_subset: int
    device: str
    tinit: int
    tfinal: int
    delta_t: int


def build_grid(methods, budgets, seeds, ablations, ablation_rank) -> list[RunSpec]:
    """Ordered so that a partial grid is useful: the first seed of everything, then the other
    seeds of the main comparison, then the other seeds of the ablations."""
    def main(seed):
        return [RunSpec(m, r, seed) for r in budgets for m in methods]

    def ablation(seed):
        return [RunSpec(**{"method": "ours", "rank": ablation_rank, "seed": seed, "group": n, **ABLATIONS[n]})
                for n in ablations]

    first, rest = seeds[:1], seeds[1:]
    return [*(x for s in first for x in main(s) + ablation(s)), *(x for s in rest for x in main(s)),
            *(x for s in rest for x in ablation(s))]


def load_data(settings: Settings):
    """(train, held-out) tokenised: the library's fixed Rotten Tomatoes split, optionally a subset
    of the training rows drawn with a fixed seed (the same subset for every run)."""
    from adalora_deploy.data import encode, rotten_tomatoes_splits
    from adalora_deploy.training import load_base_tokenizer

    train, heldout = rotten_tomatoes_splits()
    if 0 < settings.train_subset < len(train):
        rows = sorted(random.Random(0).sample(range(len(train)), settings.train_subset))
        train = train.subset(rows)
    tokenizer = load_base_tokenizer(settings.model)
    return train.id2label, encode(train, tokenizer, settings.max_length), encode(heldout, tokenizer, settings.max_length)


def build_method(spec: RunSpec, settings: Settings, id2label):
    """The method of `spec`, on a fresh classifier seeded with spec.seed."""
    import methods
    import torch

    from adalora_deploy.model import resolve_model_path

    torch.manual_seed(spec.seed)
    base = methods.load_classifier(resolve_model_path(settings.model), id2label).to(settings.device)
    schedule = (settings.tinit, settings.tfinal, settings.delta_t)
    s = settings.adalora_scaling
    if spec.method == "lora":
        return methods.build_peft_lora(base, spec.rank, settings.scaling)
    if spec.method == "prune-lora":
        return methods.build_prune_lora(base, spec.rank, settings.steps, schedule, s)
    if spec.method == "peft-adalora":
        return methods.build_peft_adalora(base, spec.rank, settings.steps, spec.orth_reg, schedule, s)
    return methods.build_ours(base, spec.rank, settings.steps, spec.orth_reg, spec.importance, schedule, s)


def run_one(spec: RunSpec, settings: Settings, data, bar) -> dict:
    import methods
    import torch

    id2label, train, heldout = data
    start = time.perf_counter()
    method = build_method(spec, settings, id2label)
    lr = settings.lr if spec.method == "lora" else settings.adalora_lr
    schedule = methods.Schedule(settings.steps, settings.batch_size, lr, settings.device)
    outcome = methods.run_method(method, train, heldout, schedule, spec.seed, bar)
    return {
        "run_id": spec.run_id, "spec": dataclasses.asdict(spec), "settings": dataclasses.asdict(settings),
        **dataclasses.asdict(outcome), "wall_s": round(time.perf_counter() - start, 2),
        "torch_threads": torch.get_num_threads(), "command": " ".join(["python", *sys.argv]), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def pending(grid: list[RunSpec], settings: Settings, runs_dir: Path, rerun: bool) -> list[RunSpec]:
    """The runs without a result yet; refuses results made with other settings (unless rerun)."""
    todo = []
    for spec in grid:
        path = runs_dir / f"{spec.run_id}.json"
        if path.exists() and not rerun:
            done = json.loads(path.read_text())
            if done["settings"] != dataclasses.asdict(settings):
                raise SystemExit(f"{path} was made with other settings: use another --runs-dir or --rerun")
            continue
        todo.append(spec)
    return todo


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="base model (default: the packaged MiniLM)")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW lr of LoRA (adapters and head)")
    p.add_argument("--scaling", type=float, default=2.0, help="LoRA's s = alpha / r")
    p.add_argument("--adalora-lr", type=float, default=1e-2, help="AdamW lr of both AdaLoRAs (adapters and head)")
    p.add_argument("--adalora-scaling", type=float, default=8.0, help="AdaLoRA's s = alpha / init_r (ours and PEFT)")
    p.add_argument("--max-length", type=int, default=40)
    p.add_argument("--train-subset", type=int, default=0, help="training rows (0 = all 11,808)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per worker")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--budgets", default="2,8", help="LoRA ranks / AdaLoRA target ranks")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--ablations", default=",".join(ABLATIONS), help="comma list, or 'none'")
    p.add_argument("--ablation-rank", type=int, default=2)
    p.add_argument("--runs-dir", type=Path, default=HERE / "runs-main")
    p.add_argument("--out-dir", type=Path, default=HERE, help="where report.py writes its outputs")
    p.add_argument("--rerun", action="store_true", help="redo runs that already have a JSON")
    p.add_argument("--shard", default="0/1", help="I/N: run only grid entries I, I+N, I+2N... (parallel workers)")
    p.add_argument("--report-only", action="store_true")
    return p.parse_args(argv)


def settings_from(args) -> Settings:
    from adalora_deploy.training import TrainConfig

    # The schedule defaults of `adalora-deploy train` for this many steps (10% / 30% / 1%).
    t = TrainConfig(steps=args.steps, init_r=12, target_r=4)
    return Settings(args.model, args.steps, args.batch_size, args.lr, args.scaling, args.adalora_lr,
                    args.adalora_scaling, args.max_length, args.train_subset, args.device, t.tinit, t.tfinal, t.delta_t)


def split_list(text: str, kind=str) -> list:
    return [] if text in ("", "none") else [kind(x) for x in text.split(",")]


def main(argv=None) -> int:
    import report

    args = parse_args(argv)
    if not args.report_only:
        run_grid(args)
    report.write_report(args.runs_dir, args.out_dir)
    return 0


def run_grid(args) -> None:
    import torch
    from tqdm.auto import tqdm

    torch.set_num_threads(args.threads)
    settings = settings_from(args)
    unknown = set(split_list(args.methods)) - set(METHODS) | set(split_list(args.ablations)) - set(ABLATIONS)
    if unknown:
        raise SystemExit(f"unknown method/ablation: {', '.join(sorted(unknown))}")
    grid = build_grid(split_list(args.methods), split_list(args.budgets, int), split_list(args.seeds, int),
                      split_list(args.ablations), args.ablation_rank)
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    index, count = (int(x) for x in args.shard.split("/"))
    todo = pending(grid[index::count], settings, args.runs_dir, args.rerun)
    print(f"{len(grid)} runs in the grid, {len(todo)} to do; results in {args.runs_dir}", flush=True)
    data = load_data(settings)
    for i, spec in enumerate(todo, 1):
        with tqdm(total=settings.steps, desc=f"[{i}/{len(todo)}] {spec.run_id}", dynamic_ncols=True) as bar:
            result = run_one(spec, settings, data, bar)
        write_json_atomic(args.runs_dir / f"{spec.run_id}.json", result)
        print(f"{spec.run_id}: accuracy {result['accuracy']:.4f}, adapter params {result['adapter_params']:,}, "
              f"{result['wall_s']:.0f} s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
