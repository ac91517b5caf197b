"""Memory after a burst, and small-request latency, with and without handing large batches' memory back.

Starts two `serve` processes on the same export, pinned to the same CPU(s): "release" (as shipped: a
model call over RELEASE_MEMORY_TOKENS padded tokens shrinks ONNX Runtime's CPU arena and trims the C
heap when it ends) and "keep" (the threshold raised out of reach: every buffer is kept, as before).
The load generator, pinned to other CPU(s), sends one small request at a time to each in turn (c1,
interleaved request by request), then a burst of maximal requests (64 texts of 10,000 characters) to
each, then small requests again. Reports each server's p50 before and after the burst and its RSS
before, at its peak (VmHWM) and one second after the burst.

    .venv/bin/python benchmarks/memory_release.py EXPORT_DIR --server-cpus 0 --client-cpus 1 \
        --markdown benchmarks/memory_release.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_test import HOST, cpu_set, free_port, rss_mb  # noqa: E402

HEAVY = {"inputs": ["lorem ipsum dolor sit amet " * 370] * 64}
VARIANTS = ("release", "keep")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dir", help="export root or mode directory")
    p.add_argument("--small", type=int, default=200, help="small requests per server in each phase (default: 200)")
    p.add_argument("--burst", type=int, default=2, help="maximal requests per server in the burst (default: 2)")
    p.add_argument("--threads", type=int, default=1, help="servers' ONNX Runtime intra-op threads (default: 1)")
    p.add_argument("--server-cpus", default=None, help="pin both servers to these CPUs, e.g. 0")
    p.add_argument("--client-cpus", default=None, help="pin the load generator to these CPUs, e.g. 1")
    p.add_argument("--markdown", help="write the results as markdown")
    p.add_argument("--serve", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: run one server
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def serve_variant(args: argparse.Namespace) -> None:
    from adalora_deploy.runtime import predictor
    from adalora_deploy.runtime.server import ServerConfig, serve

    if args.serve == "keep":
        predictor.RELEASE_MEMORY_TOKENS = 1 << 62
    serve(args.dir, provider="cpu", threads=args.threads, config=ServerConfig(port=args.port), log_level="warning")


def small_p50_ms(clients: dict, n: int) -> dict:
    times = {v: [] for v in clients}
    for i in range(n):
        for v, client in clients.items():
            t0 = time.perf_counter()
            r = client.post("/v1/predict", json={"inputs": [f"a warm, funny film that never drags ({i})"]})
            times[v].append(time.perf_counter() - t0)
            r.raise_for_status()
    return {v: round(statistics.median(t) * 1000, 2) for v, t in times.items()}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.serve:
        serve_variant(args)
        return 0
    cpus = cpu_set(args.server_cpus)
    pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    ports = {v: free_port() for v in VARIANTS}
    procs = {v: subprocess.Popen([sys.executable, __file__, args.dir, "--serve", v, "--port", str(ports[v]),
                                  "--threads", str(args.threads)], preexec_fn=pin) for v in VARIANTS}
    if cpu_set(args.client_cpus):
        os.sched_setaffinity(0, cpu_set(args.client_cpus))
    clients = {v: httpx.Client(base_url=f"http://{HOST}:{ports[v]}", timeout=300) for v in VARIANTS}
    try:
        for client in clients.values():
            for _ in range(480):
                try:
                    client.get("/health")
                    break
                except httpx.TransportError:
                    time.sleep(0.25)
            client.post("/v1/predict", json={"inputs": [f"warm-up {i}" for i in range(32)]}).raise_for_status()
        before = small_p50_ms(clients, args.small)
        rss_before = {v: round(rss_mb(procs[v].pid)) for v in VARIANTS}
        for client in clients.values():
            for _ in range(args.burst):
                client.post("/v1/predict", json=HEAVY).raise_for_status()
        time.sleep(1.0)
        rss_after = {v: round(rss_mb(procs[v].pid)) for v in VARIANTS}
        peak = {v: round(rss_mb(procs[v].pid, "VmHWM")) for v in VARIANTS}
        after = small_p50_ms(clients, args.small)
    finally:
        for proc in procs.values():
            proc.terminate()
            proc.wait(timeout=60)
    result = {"p50_ms_before": before, "p50_ms_after": after, "rss_mb_before": rss_before, "rss_mb_peak": peak,
              "rss_mb_after": rss_after}
    print(json.dumps(result))
    if args.markdown:
        from adalora_deploy.io import write_text_atomic

        write_text_atomic(args.markdown, render(result, args))
    return 0


def render(r: dict, args: argparse.Namespace) -> str:
    rows = [f"| {v} | {r['rss_mb_before'][v]} | {r['rss_mb_peak'][v]} | {r['rss_mb_after'][v]} | "
            f"{r['p50_ms_before'][v]} | {r['p50_ms_after'][v]} |" for v in VARIANTS]
    return "\n".join([
        "# Memory after a burst: large batches hand their memory back", "",
        f"- command: `python {' '.join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])}`",
        f"- date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        f"- two servers on the same export, CPU provider, {args.threads} thread(s), pinned to CPU(s) "
        f"{args.server_cpus}; load generator on CPU(s) {args.client_cpus}",
        f"- small requests: one text, c1, {args.small} per server per phase, the two servers interleaved "
        f"request by request; burst: {args.burst} requests of 64 texts of 10,000 characters per server", "",
        "| variant | RSS before MB | RSS peak MB | RSS 1 s after the burst MB | small p50 before ms | small p50 after ms |",
        "|---|---:|---:|---:|---:|---:|", *rows, "",
        "release: a model call over RELEASE_MEMORY_TOKENS padded tokens shrinks ONNX Runtime's CPU arena and "
        "trims the C heap as it ends (as shipped); keep: the same server with the threshold out of reach.", "",
    ])


if __name__ == "__main__":
    sys.exit(main())
