"""`adalora-deploy serve DIR`: an HTTP JSON server with dynamic micro-batching (runtime/server.py)."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve", help="serve an export directory over HTTP (POST /v1/predict, GET /health, GET /metadata)",
        description="Serve an exported model with ONNX Runtime behind FastAPI/uvicorn. Concurrent requests are "
        "grouped into batches of at most --max-batch-size inputs, waiting at most --max-wait-ms.",
    )
    p.add_argument("dir", metavar="DIR", help="one mode's export directory, or an export root (see --mode)")
    p.add_argument("--mode", choices=("merged", "factored", "multi"), default=None,
                   help="which graph of an export root to serve (default: merged); given with a mode's own "
                   "directory, it must name that directory's mode; multi: the multi-adapter graph of "
                   "`export --mode multi`, serving the packs given with --adapters")
    p.add_argument("--adapters", nargs="+", default=None, metavar="NAME=PATH",
                   help="multi: adapter packs (`export --prune-ranks --mode adapter`) to serve, each under its NAME")
    p.add_argument("--adapter-root", default=None, metavar="DIR",
                   help="multi: turn on PUT/DELETE /v1/adapters/NAME for packs inside DIR (off by default)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1, local only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    p.add_argument("--provider", choices=("auto", "cuda", "cpu"), default="auto",
                   help="ONNX Runtime provider: auto takes CUDA when it really starts, else CPU (default: auto)")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (default: 0, one per core)")
    p.add_argument("--max-batch-size", type=int, default=32, help="most inputs per model call (default: 32)")
    p.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="longest a request waits for others to share its batch (default: 5)")
    p.add_argument("--max-texts", type=int, default=64, help="most inputs per request (default: 64)")
    p.add_argument("--max-chars", type=int, default=10_000, help="most characters per text (default: 10000)")
    p.add_argument("--max-queue-texts", type=int, default=1024,
                   help="most texts queued or running; more get 503 with Retry-After (default: %(default)s)")
    p.add_argument("--max-queue-tokens", type=int, default=131_072,
                   help="most tokens (upper-bound estimate) queued or running; more get 503 (default: %(default)s)")
    p.add_argument("--max-batch-tokens", type=int, default=8192,
                   help="most padded tokens in one model call, bounding activation memory (default: %(default)s)")
    p.add_argument("--request-timeout", type=float, default=30.0,
                   help="seconds a request may queue and run once its body arrived; then 504 (default: %(default)s)")
    p.add_argument("--body-timeout", type=float, default=10.0,
                   help="seconds a client has to send its whole request body; then 408 (default: %(default)s)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    return p


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
    config = ServerConfig(
        host=args.host, port=args.port, max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
        max_texts=args.max_texts, max_chars=args.max_chars, max_queue_texts=args.max_queue_texts,
        max_queue_tokens=args.max_queue_tokens, max_batch_tokens=args.max_batch_tokens,
        request_timeout=args.request_timeout, body_timeout=args.body_timeout, adapter_root=args.adapter_root,
    )
    serve(args.dir, mode=args.mode, provider=args.provider, threads=args.threads, config=config,
          log_level=args.log_level, adapters=adapters)
    return 0
