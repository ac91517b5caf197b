"""`--json [PATH]`, the same in every command that has it (inspect, bench).

Bare `--json` (or `--json -`) prints the JSON document to stdout and nothing else there: while the
command works, and for its human summary, stdout is sent to stderr. `--json PATH` writes the document
atomically, refusing an existing file unless --overwrite (checked before any work).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator

STDOUT = "-"


def add_json_flag(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--json", nargs="?", const=STDOUT, default=None, metavar="PATH",
        help=f"{what} as JSON: with no PATH (or -) to stdout, alone (the usual output goes to stderr); with PATH "
        "written to that file (refused if it exists, unless --overwrite)",
    )


def json_file(args: argparse.Namespace) -> str | None:
    """The file `--json` names; None without --json or when the JSON goes to stdout."""
    return None if args.json in (None, STDOUT) else args.json


def json_to_stdout(args: argparse.Namespace) -> bool:
    return args.json == STDOUT


@contextlib.contextmanager
def stdout_for_json(args: argparse.Namespace) -> Iterator[None]:
    """With bare --json, send everything else written to stdout to stderr: Python's prints and,
    at the file-descriptor level, libraries' and child processes' output."""
    if not json_to_stdout(args):
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def print_json(document: dict) -> None:
    print(json.dumps(document, indent=2))


def write_json_file(path: str | os.PathLike, document: dict):
    """Write `document` to `path` atomically; returns the path."""
    from adalora_deploy.io import write_text_atomic

    return write_text_atomic(path, json.dumps(document, indent=2) + "\n")
