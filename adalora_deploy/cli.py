"""`adalora-deploy`: one subcommand per stage. Each parses its flags, imports lazily and calls one
library function whose keyword arguments mirror the flags (see adalora_deploy/commands/)."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys

from . import __version__
from .flags import LazyParser

# Subcommand name -> module in adalora_deploy.commands defining `add_parser(sub)` and `run(args)`;
# a command's flags are added when its parser is first used (flags.LazyParser).
COMMANDS = ("train", "inspect", "export", "bench", "serve", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adalora-deploy",
        description="Train with AdaLoRA, export pruned ONNX graphs (merged or factored), serve them.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=LazyParser)
    for name in COMMANDS:
        module = importlib.import_module(f"adalora_deploy.commands.{name}")
        module.add_parser(sub).set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .errors import AdaLoraDeployError
    from .io import signals_as_exit

    args = build_parser().parse_args(argv)
    # Before torch loads OpenMP (every command imports it lazily): with OpenMP's default
    # busy-waiting, threads that wait for a core taken by another process spin away the time
    # slices the working threads need, and training steps collapsed (13x slower beside two busy
    # processes on 2 cores); passive waiting makes them degrade with the load. A user's own
    # setting wins (README, "Threads").
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # SIGTERM/SIGHUP unwind like an error, so temporary outputs are removed; the server handles
    # its own signals (uvicorn drains in-flight requests).
    handle_signals = signals_as_exit() if args.command != "serve" else contextlib.nullcontext()
    try:
        with handle_signals:
            result = args._run(args)
    except AdaLoraDeployError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
