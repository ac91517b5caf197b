"""`adalora-deploy bench CHECKPOINT_OR_EXPORT_DIR`: merged against factored graphs and their
references, timed interleaved in one process (adalora_deploy/bench/run.py)."""

from __future__ import annotations

import argparse
import sys

from adalora_deploy.errors import ConfigError
from adalora_deploy.flags import add_config_flags, add_flags_later, config_kwargs

from .json_output import add_json_flag, json_file, json_to_stdout, print_json, stdout_for_json


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench", help="latency of merged vs factored graphs, PyTorch, the base model and Optimum's plain export",
        description="Given a checkpoint, export every variant into a temporary directory and time them; given an "
        "export directory, time what is there (plus PyTorch when the manifest's source checkpoint exists). "
        "Variants run interleaved in one process; reports p50/p90/p99, throughput and ratios to merged, and "
        "checks the targets.",
    )
    return add_flags_later(p, add_flags)


def add_flags(p: argparse.ArgumentParser) -> None:
    from adalora_deploy.bench.run import BenchConfig

    p.add_argument("source", metavar="CHECKPOINT_OR_EXPORT_DIR", help="a checkpoint, an export root or a mode dir")
    add_config_flags(p, BenchConfig)
    p.add_argument("--adapters", type=int, default=None, metavar="N",
                   help="many adapters on one multi graph: merged, factored, multi with 1, 4 and N adapter packs "
                   "(the checkpoint's + synthetic ones derived from it), PEFT eager with N adapters; also resident "
                   "memory and the time to load an adapter into a running server (docs/adapter_pack.md)")
    add_json_flag(p, "the results")
    p.add_argument("--markdown", metavar="PATH", help="write the results as a markdown page")
    p.add_argument("--plot", metavar="PATH", help="write a PNG plot")
    p.add_argument("--overwrite", action="store_true", help="replace existing --json/--markdown/--plot files")


def _require_extras(args: argparse.Namespace) -> None:
    """An export directory is timed with the base install; a checkpoint or --int8 exports first."""
    from pathlib import Path

    from adalora_deploy.constants import CHECKPOINT_CONFIG_FILE
    from adalora_deploy.extras import require

    if (Path(args.source) / CHECKPOINT_CONFIG_FILE).is_file():
        require("export", "bench on a checkpoint (it exports every variant first)")
    if args.int8:
        require("export", "bench --int8")
    if args.plot:
        require("all", "bench --plot", ("matplotlib",))


def run_adapters(args: argparse.Namespace, command: str | None) -> dict:
    from adalora_deploy.bench.multi import run_multi_bench
    from adalora_deploy.bench.run import check_output_files

    check_output_files([json_file(args), args.markdown, None], args.overwrite)
    result = run_multi_bench(
        args.source, args.adapters, args.batch_sizes or [1, 32], max(args.seq_lens or [128]), args.runs, args.warmup,
        args.threads or 1, json_file(args), args.markdown, command=command,
    )
    for t in result["targets"]:
        print(f"{'met   ' if t['met'] else 'MISSED'} {t['target']}: {t['value']}")
    return result


def run_grid(args: argparse.Namespace, command: str | None) -> dict:
    from adalora_deploy.bench.markdown import console_summary
    from adalora_deploy.bench.run import BenchConfig, run_bench

    config = BenchConfig(**config_kwargs(args, BenchConfig))
    result = run_bench(args.source, config, json_file(args), args.markdown, args.plot, command=command,
                       overwrite=args.overwrite)
    print(console_summary(result))
    return result


def run(args: argparse.Namespace) -> int:
    _require_extras(args)
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads ({args.threads}) must be >= 1")
    command = "adalora-deploy " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else None
    with stdout_for_json(args):  # bare --json: the results alone on stdout
        result = (run_grid if args.adapters is None else run_adapters)(args, command)
    if json_to_stdout(args):
        print_json(result)
    return 0
