"""`adalora-deploy bench CHECKPOINT_OR_EXPORT_DIR`: merged against factored graphs and their
references, timed interleaved in one process (adalora_deploy/bench/run.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from adalora_deploy.errors import ConfigError


def int_list(text: str) -> list[int]:
    """"1,8,32" -> [1, 8, 32]."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, e.g. 1,8,32") from err
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give integers >= 1, e.g. 1,8,32")
    return values


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench", help="latency of merged vs factored graphs, PyTorch, the base model and Optimum's plain export",
        description="Given a checkpoint, export every variant into a temporary directory and time them; given an "
        "export directory, time what is there (plus PyTorch when the manifest's source checkpoint exists). "
        "Variants run interleaved in one process; reports p50/p90/p99, throughput and ratios to merged, and "
        "checks the targets.",
    )
    p.add_argument("source", metavar="CHECKPOINT_OR_EXPORT_DIR", help="a checkpoint, an export root or a mode dir")
    p.add_argument("--batch-sizes", type=int_list, default=None,
                   help="grid rows (default: 1,8,32; with --adapters: 1,32)")
    p.add_argument("--seq-lens", type=int_list, default=None,
                   help="grid columns, tokens (default: 32,128; with --adapters: 128)")
    p.add_argument("--adapters", type=int, default=None, metavar="N",
                   help="many adapters on one multi graph: merged, factored, multi with 1, 4 and N adapter packs "
                   "(the checkpoint's + synthetic ones derived from it), PEFT eager with N adapters; also resident "
                   "memory and the time to load an adapter into a running server (docs/adapter_pack.md; "
                   "--threads defaults to 1)")
    p.add_argument("--runs", type=int, default=30, help="timed runs per variant and cell (default: 30)")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs per variant and cell (default: 3)")
    p.add_argument("--provider", choices=("auto", "cuda", "cpu"), default="auto",
                   help="ONNX Runtime provider; auto takes CUDA when it really starts (default: auto)")
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads for ONNX Runtime and PyTorch alike (default: all logical CPUs)")
    p.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32", help="graph precision; fp16 needs CUDA")
    p.add_argument("--int8", action="store_true",
                   help="also time int8 exports (export --quantize int8, merged and factored) and Optimum's own int8 "
                   "path (ORTQuantizer, AVX512-VNNI dynamic config); needs --provider cpu")
    p.add_argument("--eval-data", default=None, metavar="FILE",
                   help="labelled rows for the int8 export's evaluation (default: the checkpoint's held-out split)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--markdown", metavar="PATH", help="write the results as a markdown page")
    p.add_argument("--plot", metavar="PATH", help="write a PNG plot")
    p.add_argument("--overwrite", action="store_true", help="replace existing --json/--markdown/--plot files")
    return p


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


def run_adapters(args: argparse.Namespace, command: str | None) -> int:
    from adalora_deploy.bench.multi import run_multi_bench

    for path in (args.json, args.markdown):
        if path and Path(path).exists() and not args.overwrite:
            raise ConfigError(f"{path} exists: choose another path or pass --overwrite")
    result = run_multi_bench(
        args.source, args.adapters, args.batch_sizes or [1, 32], max(args.seq_lens or [128]), args.runs, args.warmup,
        args.threads or 1, args.json, args.markdown, command=command,
    )
    for t in result["targets"]:
        print(f"{'met   ' if t['met'] else 'MISSED'} {t['target']}: {t['value']}")
    return 0


def run(args: argparse.Namespace) -> int:
    from adalora_deploy.bench.markdown import console_summary
    from adalora_deploy.bench.run import BenchConfig, run_bench

    _require_extras(args)
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads ({args.threads}) must be >= 1")
    command = "adalora-deploy " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else None
    if args.adapters is not None:
        return run_adapters(args, command)
    kwargs = {"threads": args.threads} if args.threads else {}
    config = BenchConfig(
        batch_sizes=args.batch_sizes or [1, 8, 32], seq_lens=args.seq_lens or [32, 128], runs=args.runs, warmup=args.warmup,
        provider=args.provider, dtype=args.dtype, int8=args.int8, eval_data=args.eval_data, **kwargs,
    )
    result = run_bench(args.source, config, args.json, args.markdown, args.plot, command=command,
                       overwrite=args.overwrite)
    print(console_summary(result))
    return 0
