"""Load test of `adalora-deploy serve` on loopback: throughput and latency at several concurrencies.

Starts the server as a subprocess on 127.0.0.1 (a free port), then for each concurrency level runs
that many client coroutines, each sending one request after another, until --requests requests
are done or --duration seconds have passed (bounded in count and in time). Texts are real Rotten
Tomatoes snippets. Reports requests/s, texts/s, p50/p90/p99 latency and errors per level, plus
the server's own batching counters and its resident memory (RSS) before the first level and after
the last; exits 1 if any request failed. With --predictor-baseline it then stops the server and
times the Predictor in this process on the same texts at each level's mean server batch size, so
that the server's throughput can be read as a ratio of what the model itself sustains.

    .venv/bin/python benchmarks/load_test.py EXPORT_DIR --concurrency 1,8,32 --requests 400 \
        --duration 60 --json benchmarks/load_test.json --markdown benchmarks/load_test.md
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

HOST = "127.0.0.1"  # loopback only, by design


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dir", help="export root or mode directory to serve")
    p.add_argument("--mode", default="merged", choices=("merged", "factored"))
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated client counts (default: 1,8,32)")
    p.add_argument("--requests", type=int, default=400, help="requests per level, at most (default: 400)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds per level, at most (default: 60)")
    p.add_argument("--texts-per-request", type=int, default=1, help="inputs in each request (default: 1)")
    p.add_argument("--warmup", type=int, default=10, help="untimed requests before each level (default: 10)")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=0, help="server's ONNX Runtime intra-op threads")
    p.add_argument("--provider", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--predictor-baseline", action="store_true",
                   help="after the levels, time the Predictor alone at each level's mean batch size")
    p.add_argument("--json", help="write the results as JSON")
    p.add_argument("--markdown", help="write the results as markdown")
    return p.parse_args(argv)


def snippets(n: int, seed: int) -> list[str]:
    """`n` Rotten Tomatoes snippets, shuffled with `seed`."""
    from adalora_deploy.data import load_rotten_tomatoes

    texts = list(load_rotten_tomatoes().texts)
    random.Random(seed).shuffle(texts)
    return texts[:n]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "adalora_deploy", "serve", args.dir, "--mode", args.mode, "--host", HOST,
           "--port", str(port), "--provider", args.provider, "--threads", str(args.threads),
           "--max-batch-size", str(args.max_batch_size), "--max-wait-ms", str(args.max_wait_ms),
           "--max-texts", str(max(64, args.texts_per_request)), "--log-level", "warning"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def rss_mb(pid: int) -> float:
    """Resident memory of process `pid` in MB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def predictor_texts_per_s(args: argparse.Namespace, texts: list[str], batch: int, calls: int = 60) -> float:
    """Texts/s of Predictor.predict alone on `batch` snippets per call (median call time), with the
    server's provider and threads."""
    from adalora_deploy.runtime.predictor import Predictor
    from adalora_deploy.runtime.session import SessionConfig

    predictor = Predictor.from_pretrained(
        args.dir, mode=args.mode, batch_size=batch,
        session_config=SessionConfig(provider=args.provider, intra_op_threads=args.threads),
    )
    for i in range(5):
        predictor.predict(texts[i * batch:(i + 1) * batch])
    seconds = []
    for i in range(calls):
        k = (i * batch) % (len(texts) - batch)
        t0 = time.perf_counter()
        predictor.predict(texts[k:k + batch])
        seconds.append(time.perf_counter() - t0)
    return batch / float(np.median(seconds))


def wait_ready(proc: subprocess.Popen, url: str, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}:\n{proc.stdout.read()}")
        try:
            return httpx.get(f"{url}/health", timeout=2).json()
        except httpx.TransportError:
            time.sleep(0.25)
    raise SystemExit(f"server not ready after {timeout:.0f} s")


async def run_level(url: str, concurrency: int, texts: list[str], args: argparse.Namespace) -> dict:
    """`concurrency` clients in a closed loop; returns latencies, errors and wall time."""
    latencies, errors, sent = [], [], 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        for i in range(args.warmup):
            await client.post("/v1/predict", json={"inputs": texts[i: i + args.texts_per_request]})
        before = (await client.get("/health")).json()
        start = time.perf_counter()
        deadline = start + args.duration

        async def worker() -> None:
            nonlocal sent
            while sent < args.requests and time.perf_counter() < deadline:
                k = (sent * args.texts_per_request) % (len(texts) - args.texts_per_request)
                sent += 1
                t0 = time.perf_counter()
                try:
                    r = await client.post("/v1/predict", json={"inputs": texts[k: k + args.texts_per_request]})
                except httpx.HTTPError as err:
                    errors.append(type(err).__name__)
                    continue
                if r.status_code == 200 and len(r.json()["predictions"]) == args.texts_per_request:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors.append(r.status_code)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
        after = (await client.get("/health")).json()
    level = summarize_level(concurrency, latencies, errors, wall, args.texts_per_request)
    batches = after["batches"] - before["batches"]
    level["batches"] = batches
    level["mean_batch"] = (after["inputs"] - before["inputs"]) / batches if batches else None
    return level


def summarize_level(concurrency: int, latencies: list[float], errors: list, wall: float, per_request: int) -> dict:
    ms = np.asarray(latencies) * 1000.0
    p50, p90, p99 = np.percentile(ms, [50, 90, 99]) if len(ms) else (np.nan,) * 3
    return {
        "concurrency": concurrency, "requests": len(latencies), "errors": len(errors),
        "error_kinds": sorted({str(e) for e in errors}), "seconds": wall,
        "requests_per_s": len(latencies) / wall, "texts_per_s": len(latencies) * per_request / wall,
        "p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99),
    }


def render_markdown(result: dict) -> str:
    h = result["header"]
    rows = [
        "| concurrency | requests | errors | seconds | requests/s | texts/s | p50 ms | p90 ms | p99 ms | inputs/batch |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    baseline = "predictor_texts_per_s" in result["levels"][0]
    if baseline:
        rows[0] += " Predictor texts/s at that batch | server / Predictor |"
        rows[1] += "---:|---:|"
    for r in result["levels"]:
        rows.append(
            f"| {r['concurrency']} | {r['requests']} | {r['errors']} | {r['seconds']:.1f} | {r['requests_per_s']:.1f} | "
            f"{r['texts_per_s']:.1f} | {r['p50_ms']:.1f} | {r['p90_ms']:.1f} | {r['p99_ms']:.1f} | {r['mean_batch']:.2f} |"
            + (f" {r['predictor_texts_per_s']:.1f} (batch {r['predictor_batch']}) | {r['ratio_to_predictor']:.2f} |"
               if baseline else "")
        )
    s = result["server_stats"]
    rss = result.get("server_rss_mb", {})
    return "\n".join([
        "# adalora-deploy serve: load test (loopback)", "",
        f"- command: `{h['command']}`", f"- date: {h['date']}", f"- machine: {h['machine']}",
        f"- served: {h['served']} on {h['provider']}; max batch {h['max_batch_size']}, max wait {h['max_wait_ms']} ms, "
        f"server threads {h['threads'] or 'ORT default'}",
        f"- each level: at most {h['requests']} requests or {h['duration_s']:.0f} s, {h['texts_per_request']} "
        f"Rotten Tomatoes snippet(s) per request, closed loop (a client sends its next request when the last "
        f"one returns); client and server share the machine", "",
        *rows, "",
        f"Server counters over the whole run (warm-up included): {s['requests']} requests in {s['batches']} "
        f"batches, {s['inputs'] / max(s['batches'], 1):.2f} inputs per batch on average, largest "
        f"{s['largest_batch']}.", "",
        f"Server RSS: {rss.get('before')} MB after start-up and warm-up, {rss.get('after')} MB after the last level.",
        "",
        f"Errors in total: {sum(r['errors'] for r in result['levels'])}.", "",
    ])


def main(argv: list[str] | None = None) -> int:
    from adalora_deploy.bench.run import device_name

    args = parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    texts = snippets(2000, args.seed)
    port = free_port()
    url = f"http://{HOST}:{port}"
    proc = start_server(args, port)
    try:
        health = wait_ready(proc, url)
        rss_before = rss_mb(proc.pid)
        results = []
        for c in levels:
            results.append(asyncio.run(run_level(url, c, texts, args)))
            r = results[-1]
            print(f"concurrency {c:>3}: {r['requests_per_s']:.1f} req/s, p50 {r['p50_ms']:.1f} ms, "
                  f"p99 {r['p99_ms']:.1f} ms, errors {r['errors']}", flush=True)
        stats = httpx.get(f"{url}/health", timeout=10).json()
        rss_after = rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    if args.predictor_baseline:  # the server is gone: the Predictor has the machine to itself
        for r in results:
            batch = max(1, round(r["mean_batch"] or 1))
            r["predictor_batch"] = batch
            r["predictor_texts_per_s"] = predictor_texts_per_s(args, texts, batch)
            r["ratio_to_predictor"] = r["texts_per_s"] / r["predictor_texts_per_s"]
    result = {
        "header": {
            "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "machine": device_name(health["provider"].startswith("CUDA")),
            "served": str(Path(args.dir) / args.mode) if (Path(args.dir) / args.mode).is_dir() else args.dir,
            "provider": health["provider"], "threads": args.threads, "max_batch_size": args.max_batch_size,
            "max_wait_ms": args.max_wait_ms, "requests": args.requests, "duration_s": args.duration,
            "texts_per_request": args.texts_per_request, "server_exit_code": proc.returncode,
        },
        "levels": results,
        "server_stats": {k: stats[k] for k in ("requests", "inputs", "batches", "largest_batch")},
        "server_rss_mb": {"before": round(rss_before, 1), "after": round(rss_after, 1)},
    }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(render_markdown(result))
    return 1 if any(r["errors"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
