"""`adalora-deploy inspect CKPT`: final ranks per layer and module type, budget and parameter counts."""

from __future__ import annotations

import argparse
import json
import sys


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "inspect", help="show a checkpoint's ranks per layer and module type",
        description="Print the final rank of every adapted module as a table of layers against module types, "
        "with the total budget and parameter counts.",
    )
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint directory written by `adalora-deploy train`")
    p.add_argument("--json", action="store_true",
                   help='print {"modules": {name: rank}, "budget", "init_r", "target_r", "trainable_params"}')
    p.add_argument("--plot", metavar="PNG", default=None, help="also draw the heatmap of final ranks to this file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --plot file")
    return p


def run(args: argparse.Namespace) -> int:
    from ..extras import require

    require("train", "inspect")
    if args.plot:
        require("train", "inspect --plot", ("matplotlib",))
    from ..io import IMAGE_SUFFIXES, check_output_file
    from ..rank_report import format_rank_summary, format_table, plot_heatmap, rank_report

    if args.plot:  # before anything is printed
        check_output_file(args.plot, args.overwrite, IMAGE_SUFFIXES)
    report = rank_report(args.checkpoint)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(f"ranks of {args.checkpoint} (init_r {report.init_r}, target_r {report.target_r})")
        print(format_table(report))
        print(format_rank_summary(report))
    if args.plot:
        path = plot_heatmap(report, args.plot, overwrite=args.overwrite)
        print(f"plot: {path}", file=sys.stderr if args.json else sys.stdout)
    return 0
