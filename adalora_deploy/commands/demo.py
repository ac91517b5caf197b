"""`adalora-deploy demo`: train, export, score, bench and summarise on the packaged MiniLM and the
builtin Rotten Tomatoes set, everything under one output directory (adalora_deploy/demo.py)."""

from __future__ import annotations

import argparse

from .bench import int_list  # "1,32" -> [1, 32], with a clear error


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "demo", help="the whole pipeline on real data: train, export, score, bench, summarise",
        description="Fine-tune the packaged MiniLM with AdaLoRA on the builtin Rotten Tomatoes set (fixed "
        "held-out 1,000), export pruned merged and factored ONNX graphs (validated), score them with ONNX "
        "Runtime, time them against PyTorch, draw the rank heatmap and print one summary. About 3 minutes "
        "on 2 CPU cores.",
    )
    p.add_argument("--out", default="demo-output", help="output directory, must be new or empty (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out once the demo succeeds")
    p.add_argument("--model", default=None, help="base model path or hub id (default: the packaged MiniLM)")
    p.add_argument("--data", default="rotten-tomatoes", help="training data as for `train --data` (default: %(default)s)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: 300; 8 with --fast)")
    p.add_argument("--batch-size", type=int, default=32, help="examples per step (default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-2, help="AdamW learning rate (default: %(default)s)")
    p.add_argument("--max-length", type=int, default=64, help="tokens per example (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="initialisation and shuffling seed (default: %(default)s)")
    p.add_argument("--init-r", type=int, default=12, help="initial rank of every module (default: %(default)s)")
    p.add_argument("--target-r", type=int, default=4, help="average final rank (default: %(default)s)")
    p.add_argument("--alpha", type=float, default=96.0, help="scaling numerator, s = alpha / init_r (default: %(default)s)")
    p.add_argument("--bench-batch-sizes", type=int_list, default=None, help="bench grid rows (default: 1,32; 1 with --fast)")
    p.add_argument("--bench-seq-lens", type=int_list, default=None, help="bench grid columns (default: 64; 16 with --fast)")
    p.add_argument("--bench-runs", type=int, default=None, help="timed runs per variant and cell (default: 20; 3 with --fast)")
    p.add_argument("--provider", choices=("auto", "cuda", "cpu"), default="auto",
                   help="ONNX Runtime provider for scoring and bench (default: auto)")
    p.add_argument("--fast", action="store_true", help="a few steps and a one-cell bench: a smoke run, not a result")
    return p


def run(args: argparse.Namespace) -> int:
    from ..extras import require

    require("all", "demo")
    from dataclasses import fields

    from ..demo import DemoConfig, demo, format_demo_summary

    flags = [f.name for f in fields(DemoConfig) if f.name != "progress"]
    summary = demo(**{name: getattr(args, name) for name in flags})
    print(format_demo_summary(summary))
    print(f"total time: {summary['seconds']['total']:.0f} s")
    print(f"everything is in {summary['out']}/ (checkpoint/, onnx/merged/, onnx/factored/, bench.json, bench.md, "
          "latency.png, ranks.png, demo_summary.json)")
    return 0
