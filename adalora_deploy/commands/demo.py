"""`adalora-deploy demo`: train, export, score, bench and summarise on the packaged MiniLM and the
builtin Rotten Tomatoes set, everything under one output directory (adalora_deploy/demo.py)."""

from __future__ import annotations

import argparse

from ..flags import add_config_flags, add_flags_later, config_kwargs


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "demo", help="the whole pipeline on real data: train, export, score, bench, summarise",
        description="Fine-tune the packaged MiniLM with AdaLoRA on the builtin Rotten Tomatoes set (fixed "
        "held-out 1,000), export pruned merged and factored ONNX graphs (validated), score them with ONNX "
        "Runtime, time them against PyTorch, draw the rank heatmap and print one summary. About 3 minutes "
        "on 2 CPU cores.",
    )
    return add_flags_later(p, add_flags)


def add_flags(p: argparse.ArgumentParser) -> None:
    from ..demo import DemoConfig

    add_config_flags(p, DemoConfig)


def run(args: argparse.Namespace) -> int:
    from ..extras import require

    require("all", "demo")
    from ..demo import DemoConfig, demo, format_demo_summary

    summary = demo(**config_kwargs(args, DemoConfig))
    print(format_demo_summary(summary))
    print(f"total time: {summary['seconds']['total']:.0f} s")
    print(f"everything is in {summary['out']}/ (checkpoint/, onnx/merged/, onnx/factored/, bench.json, bench.md, "
          "latency.png, ranks.png, demo_summary.json)")
    return 0
