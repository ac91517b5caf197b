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
    p.add_argument("--mode", choices=("merged", "factored"), default=None,
                   help="which graph of an export root to serve (default: merged); given with a mode's own "
                   "directory, it must name that directory's mode")
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


def run(args: argparse.Namespace) -> int:
    from adalora_deploy.runtime.server import ServerConfig, serve

    config = ServerConfig(
        host=args.host, port=args.port, max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
        max_texts=args.max_texts, max_chars=args.max_chars, max_queue_texts=args.max_queue_texts,
        max_queue_tokens=args.max_queue_tokens, max_batch_tokens=args.max_batch_tokens,
        request_timeout=args.request_timeout, body_timeout=args.body_timeout,
    )
    serve(args.dir, mode=args.mode, provider=args.provider, threads=args.threads, config=config,
          log_level=args.log_level)
    return 0
