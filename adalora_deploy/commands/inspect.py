"""`adalora-deploy inspect CKPT`: final ranks per layer and module type, budget and parameter counts."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .json_output import STDOUT, add_json_flag, json_file, json_to_stdout, print_json, write_json_file


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "inspect", help="show a checkpoint's ranks per layer and module type",
        description="Print the final rank of every adapted module as a table of layers against module types, "
        "with the total budget and parameter counts.",
    )
    # Optional only so that the older `inspect --json CKPT` (when --json was a switch) still works.
    p.add_argument("checkpoint", metavar="CKPT", nargs="?", help="checkpoint directory written by `adalora-deploy train`")
    add_json_flag(p, '{"modules": {name: rank}, "budget", "init_r", "target_r", "trainable_params"}')
    p.add_argument("--plot", metavar="PNG", default=None, help="also draw the heatmap of final ranks to this file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json or --plot file")
    return p


def _checkpoint_argument(args: argparse.Namespace) -> None:
    """`inspect --json CKPT` read CKPT as the JSON file; a directory cannot be one, so it is the checkpoint."""
    from ..errors import ConfigError

    if args.checkpoint is None and args.json not in (None, STDOUT) and Path(args.json).is_dir():
        args.checkpoint, args.json = args.json, STDOUT
    if args.checkpoint is None:
        raise ConfigError("no checkpoint given: adalora-deploy inspect CKPT [--json [PATH]] [--plot PNG]")


def run(args: argparse.Namespace) -> int:
    from ..extras import require

    _checkpoint_argument(args)
    require("train", "inspect")
    if args.plot:
        require("train", "inspect --plot", ("matplotlib",))
    from ..io import IMAGE_SUFFIXES, check_output_file
    from ..rank_report import format_rank_summary, format_table, plot_heatmap, rank_report

    if json_file(args):  # before anything is written
        check_output_file(json_file(args), args.overwrite)
    if args.plot:
        check_output_file(args.plot, args.overwrite, IMAGE_SUFFIXES)
    report = rank_report(args.checkpoint)
    if json_to_stdout(args):
        print_json(report.to_json())
    else:
        print(f"ranks of {args.checkpoint} (init_r {report.init_r}, target_r {report.target_r})")
        print(format_table(report))
        print(format_rank_summary(report))
        _note_stopped_early(report.stopped_early)
    if json_file(args):
        print(f"json: {write_json_file(json_file(args), report.to_json())}")
    if args.plot:
        path = plot_heatmap(report, args.plot, overwrite=args.overwrite)
        print(f"plot: {path}", file=sys.stderr if json_to_stdout(args) else sys.stdout)
    return 0


def _note_stopped_early(stop: dict | None) -> None:
    if stop:
        print(f"stopped early: the last good state of a run that diverged ({stop.get('reason')}), after "
              f"{stop.get('steps_done')} of {stop.get('steps_planned')} steps")
