"""`adalora-deploy serve DIR`: an HTTP JSON server with dynamic micro-batching (runtime/server.py)."""

from __future__ import annotations

import argparse

from adalora_deploy.constants import SERVE_MODES
from adalora_deploy.flags import add_config_flags, add_flags_later, config_kwargs


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve", help="serve an export directory over HTTP (POST /v1/predict, GET /health, GET /metadata)",
        description="Serve an exported model with ONNX Runtime behind FastAPI/uvicorn. Concurrent requests are "
        "grouped into batches of at most --max-batch-size inputs, waiting at most --max-wait-ms.",
    )
    return add_flags_later(p, add_flags)


def add_flags(p: argparse.ArgumentParser) -> None:
    from adalora_deploy.runtime.server import ServerConfig
    from adalora_deploy.runtime.session import PROVIDERS

    p.add_argument("dir", metavar="DIR", help="one mode's export directory, or an export root (see --mode)")
    p.add_argument("--mode", choices=SERVE_MODES, default=None,
                   help="which graph of an export root to serve (default: merged); given with a mode's own "
                   "directory, it must name that directory's mode; multi: the multi-adapter graph of "
                   "`export --mode multi`, serving the packs given with --adapters")
    p.add_argument("--adapters", nargs="+", default=None, metavar="NAME=PATH",
                   help="multi: adapter packs (`export --prune-ranks --mode adapter`) to serve, each under its NAME")
    add_config_flags(p, ServerConfig)
    p.add_argument("--provider", choices=PROVIDERS, default="auto",
                   help="ONNX Runtime provider: auto takes CUDA when it really starts, else CPU (default: auto)")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (default: 0, one per core)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="uvicorn's log level (default: %(default)s)")


def parse_adapters(items: list[str] | None, mode: str) -> dict[str, str]:
    """NAME=PATH items -> {name: path}; refused outside --mode multi or when malformed."""
    from adalora_deploy.errors import ConfigError

    if not items:
        return {}
    if mode != "multi":
        raise ConfigError("--adapters and --adapter-root serve a multi graph: add --mode multi")
    adapters = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path or name in adapters:
            raise ConfigError(f"--adapters {item!r}: expected NAME=PATH with a new NAME each, e.g. tweets=packs/tweets")
        adapters[name] = path
    return adapters


def run(args: argparse.Namespace) -> int:
    from adalora_deploy.errors import ConfigError
    from adalora_deploy.runtime.server import ServerConfig, serve

    adapters = parse_adapters(args.adapters, args.mode)
    if args.adapter_root is not None and args.mode != "multi":
        raise ConfigError("--adapter-root serves a multi graph: add --mode multi")
    config = ServerConfig(**config_kwargs(args, ServerConfig))
    serve(args.dir, mode=args.mode, provider=args.provider, threads=args.threads, config=config,
          log_level=args.log_level, adapters=adapters)
    return 0
