"""Load test of `adalora-deploy serve` on loopback: throughput and latency at several concurrencies.

Starts the server as a subprocess on 127.0.0.1 (a free port), then for each concurrency level runs
that many clients, one keep-alive connection each, each sending one request after another, until
--requests requests are done or --duration seconds have passed (bounded in count and in time), split
into --rounds windows. Texts are real Rotten Tomatoes snippets. Reports requests/s, texts/s,
p50/p90/p99 latency and errors per level, the server's batching counters, the share of the time its
model thread was busy, the load generator's own CPU use, and the server's resident memory (RSS) before
the first level and after the last; exits 1 if any request failed.

With --predictor-baseline, each window is followed (the server idle) by the Predictor alone, in a
thread of this process on the server's CPUs, at the mean batch size the server formed in that window
and for as long: the server's throughput is read as a ratio of what the model itself sustains, with
both measured minutes apart at most, so that load from other processes falls on both alike. With
--server-cpus/--client-cpus the server (and the baseline) and the load generator run on separate CPUs.

    .venv/bin/python benchmarks/load_test.py EXPORT_DIR --concurrency 1,8,32,64 --requests 1200 \
        --duration 30 --threads 1 --server-cpus 0 --client-cpus 1 --predictor-baseline \
        --json benchmarks/load_test.json --markdown benchmarks/load_test.md
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
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
    p.add_argument("--warmup", type=int, default=10, help="untimed requests before each window (default: 10)")
    p.add_argument("--rounds", type=int, default=3,
                   help="windows per level, each followed by its Predictor baseline (default: 3)")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=0, help="server's ONNX Runtime intra-op threads")
    p.add_argument("--provider", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--predictor-baseline", action="store_true",
                   help="after each window, time the Predictor alone at the window's mean batch size")
    p.add_argument("--server-cpus", default=None,
                   help="pin the server (and the Predictor baseline) to these CPUs, e.g. 0 (default: no pinning)")
    p.add_argument("--client-cpus", default=None,
                   help="pin this load generator to these CPUs, e.g. 1, so that it does not take the server's")
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


def cpu_set(spec: str | None) -> set[int] | None:
    """"0,2-3" -> {0, 2, 3}; None stays None (no pinning)."""
    if spec is None:
        return None
    cpus = set()
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def start_server(args: argparse.Namespace, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "adalora_deploy", "serve", args.dir, "--mode", args.mode, "--host", HOST,
           "--port", str(port), "--provider", args.provider, "--threads", str(args.threads),
           "--max-batch-size", str(args.max_batch_size), "--max-wait-ms", str(args.max_wait_ms),
           "--max-texts", str(max(64, args.texts_per_request)), "--log-level", "warning"]
    cpus = cpu_set(args.server_cpus)
    # Pinned before exec, so that every thread the server starts (event loop, model thread) inherits it.
    pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=pin)


def rss_mb(pid: int, key: str = "VmRSS") -> float:
    """Resident memory of process `pid` in MB (Linux /proc), now (VmRSS) or at its peak (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class PredictorBaseline:
    """The Predictor alone, on one thread of this process pinned to the server's CPUs (threads ONNX
    Runtime starts from it inherit the mask), with the server's provider and intra-op threads.
    Predictor.predict tokenizes, pads and runs, as each server batch does."""

    def __init__(self, args: argparse.Namespace, texts: list[str]):
        self.args, self.texts = args, texts
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="baseline", initializer=self._open)
        self.pool.submit(lambda: None).result()  # load now, not inside the first timing

    def _open(self) -> None:
        from adalora_deploy.runtime.predictor import Predictor
        from adalora_deploy.runtime.session import SessionConfig

        cpus = cpu_set(self.args.server_cpus)
        if cpus:
            os.sched_setaffinity(0, cpus)  # 0: the calling thread on Linux
        self.predictor = Predictor.from_pretrained(
            self.args.dir, mode=self.args.mode, batch_size=self.args.max_batch_size,
            session_config=SessionConfig(provider=self.args.provider, intra_op_threads=self.args.threads),
        )

    def texts_per_s(self, batch: int, seconds: float) -> float:
        """`batch` / the median time of predict on `batch` snippets, over about `seconds` (5 calls at least)."""
        return self.pool.submit(self._time, batch, seconds).result()

    def _time(self, batch: int, seconds: float) -> float:
        texts = self.texts
        self.predictor.predict(texts[:batch])
        times, end = [], time.perf_counter() + seconds
        while len(times) < 5 or time.perf_counter() < end:
            k = (len(times) * batch) % (len(texts) - batch)
            t0 = time.perf_counter()
            self.predictor.predict(texts[k:k + batch])
            times.append(time.perf_counter() - t0)
        return batch / float(np.median(times))

    def close(self) -> None:
        self.pool.shutdown()


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


class Connection:
    """One keep-alive HTTP/1.1 connection on asyncio streams: the load generator's client.

    httpx's AsyncClient cost about a millisecond of client CPU per request and became the bottleneck at
    32 connections (the server's event loop sat idle in epoll while batches stayed small); this client
    writes each request in one segment and reads the Content-Length body the server always sends.
    """

    def __init__(self, port: int):
        self.port = port
        self.reader = self.writer = None

    async def post(self, path: str, payload: dict) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(HOST, self.port)
        body = json.dumps(payload).encode()
        head = (f"POST {path} HTTP/1.1\r\nhost: {HOST}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\n\r\n").encode()
        try:
            self.writer.write(head + body)
            status = int((await self.reader.readline()).split()[1])
            headers = {}
            while (line := await self.reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            content = await self.reader.readexactly(int(headers["content-length"]))
        except (OSError, asyncio.IncompleteReadError, IndexError, KeyError, ValueError):
            self.close()
            raise
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, content

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def run_window(port: int, concurrency: int, texts: list[str], args: argparse.Namespace, first: int) -> dict:
    """One window of `concurrency` clients in a closed loop, one connection each, from snippet `first` on;
    returns the raw latencies and errors, wall time, the server's counters over it and this process's CPU."""
    url = f"http://{HOST}:{port}"
    per = args.texts_per_request
    latencies, errors, sent = [], [], 0
    requests, duration = args.requests / args.rounds, args.duration / args.rounds
    connections = [Connection(port) for _ in range(concurrency)]
    for i in range(args.warmup):
        await connections[i % concurrency].post("/v1/predict", {"inputs": texts[i: i + per]})
    before = httpx.get(f"{url}/health", timeout=10).json()
    cpu0 = time.process_time()
    start = time.perf_counter()
    deadline = start + duration

    async def worker(conn: Connection) -> None:
        nonlocal sent
        while sent < requests and time.perf_counter() < deadline:
            k = ((first + sent) * per) % (len(texts) - per)
            sent += 1
            t0 = time.perf_counter()
            try:
                status, content = await conn.post("/v1/predict", {"inputs": texts[k: k + per]})
            except (OSError, asyncio.IncompleteReadError, IndexError, KeyError, ValueError) as err:
                errors.append(type(err).__name__)
                continue
            if status == 200 and len(json.loads(content)["predictions"]) == per:
                latencies.append(time.perf_counter() - t0)
            else:
                errors.append(status)

    await asyncio.gather(*(worker(conn) for conn in connections))
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu0
    for conn in connections:
        conn.close()
    after = httpx.get(f"{url}/health", timeout=10).json()
    counters = {k: after[k] - before[k] for k in ("inputs", "batches", "model_seconds")}
    return {"latencies": latencies, "errors": errors, "wall": wall, "client_cpu_seconds": cpu, **counters}


def combine_windows(concurrency: int, windows: list[dict], per_request: int) -> dict:
    """A level's summary over its windows; with a baseline, the median of the windows' ratios."""
    wall = sum(w["wall"] for w in windows)
    level = summarize_level(concurrency, [x for w in windows for x in w["latencies"]],
                            [e for w in windows for e in w["errors"]], wall, per_request)
    batches = sum(w["batches"] for w in windows)
    level["batches"] = batches
    level["mean_batch"] = sum(w["inputs"] for w in windows) / batches if batches else None
    # The share of the wall time the server's model thread spent in Predictor.predict: below 1, the model
    # waited for requests (the HTTP side, the clients or the batching window).
    level["model_busy"] = sum(w["model_seconds"] for w in windows) / wall
    # The load generator's CPU seconds per second: near 1 (one pinned CPU), it is the bottleneck.
    level["client_cpu"] = sum(w["client_cpu_seconds"] for w in windows) / wall
    level["windows"] = [{k: v for k, v in w.items() if k not in ("latencies", "errors")} for w in windows]
    if "predictor_texts_per_s" in windows[0]:
        ratios = [w["ratio_to_predictor"] for w in windows]
        level["ratio_to_predictor"] = float(np.median(ratios))
        level["ratio_range"] = [min(ratios), max(ratios)]
        level["predictor_batch"] = max(1, round(level["mean_batch"] or 1))
        level["predictor_texts_per_s"] = float(np.median([w["predictor_texts_per_s"] for w in windows]))
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
        "| concurrency | requests | errors | seconds | requests/s | texts/s | p50 ms | p90 ms | p99 ms | inputs/batch "
        "| model busy | client CPU |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    baseline = "predictor_texts_per_s" in result["levels"][0]
    if baseline:
        rows[0] += " Predictor texts/s at that batch | server / Predictor (median, range over windows) |"
        rows[1] += "---:|---:|"
    for r in result["levels"]:
        rows.append(
            f"| {r['concurrency']} | {r['requests']} | {r['errors']} | {r['seconds']:.1f} | {r['requests_per_s']:.1f} | "
            f"{r['texts_per_s']:.1f} | {r['p50_ms']:.1f} | {r['p90_ms']:.1f} | {r['p99_ms']:.1f} | {r['mean_batch']:.2f} "
            f"| {r['model_busy']:.0%} | {r['client_cpu']:.0%} |"
            + (f" {r['predictor_texts_per_s']:.1f} (batch {r['predictor_batch']}) | {r['ratio_to_predictor']:.2f} "
               f"({r['ratio_range'][0]:.2f}-{r['ratio_range'][1]:.2f}) |"
               if baseline else "")
        )
    s = result["server_stats"]
    rss = result.get("server_rss_mb", {})
    return "\n".join([
        "# adalora-deploy serve: load test (loopback)", "",
        f"- command: `{h['command']}`", f"- date: {h['date']}", f"- machine: {h['machine']}",
        f"- served: {h['served']} on {h['provider']}; max batch {h['max_batch_size']}, max wait {h['max_wait_ms']} ms, "
        f"server threads {h['threads'] or 'ORT default'}",
        f"- each level: at most {h['requests']} requests or {h['duration_s']:.0f} s in {h['rounds']} windows, "
        f"{h['texts_per_request']} "
        f"Rotten Tomatoes snippet(s) per request, closed loop (a client sends its next request when the last "
        f"one returns); {placement(h)}", "",
        "inputs/batch: the mean batch the server formed; model busy: the share of the wall time its model thread "
        "spent in Predictor.predict; client CPU: the load generator's CPU seconds per second. After each window, "
        "with the server idle, the Predictor alone runs in a thread of the load generator pinned to the server's "
        "CPUs, at the mean batch the server formed in that window (rounded), for as long as the window; the "
        "ratio is the window's served texts/s over the Predictor's, and the table gives the median over windows.",
        "",
        *rows, "",
        f"Server counters over the whole run (warm-up included): {s['requests']} requests in {s['batches']} "
        f"batches, {s['inputs'] / max(s['batches'], 1):.2f} inputs per batch on average, largest "
        f"{s['largest_batch']}.", "",
        f"Server RSS: {rss.get('before')} MB after start-up and warm-up, {rss.get('after')} MB after the last level.",
        "",
        f"Errors in total: {sum(r['errors'] for r in result['levels'])}.", "",
    ])


def placement(h: dict) -> str:
    if h.get("server_cpus") is None:
        return "client and server share all the machine's CPUs"
    return (f"the server runs on CPU(s) {h['server_cpus']} and the load generator on CPU(s) {h['client_cpus']} "
            "(sched_setaffinity)")


def main(argv: list[str] | None = None) -> int:
    from adalora_deploy.bench.run import device_name

    args = parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    texts = snippets(2000, args.seed)
    client_cpus = cpu_set(args.client_cpus)
    if client_cpus:
        os.sched_setaffinity(0, client_cpus)
    port = free_port()
    url = f"http://{HOST}:{port}"
    proc = start_server(args, port)
    baseline = None
    try:
        health = wait_ready(proc, url)
        baseline = PredictorBaseline(args, texts) if args.predictor_baseline else None
        rss_before = rss_mb(proc.pid)
        results = []
        for c in levels:
            windows = []
            for i in range(args.rounds):
                window = asyncio.run(run_window(port, c, texts, args, first=len(levels) * i * args.requests))
                if baseline is not None:  # the server idles meanwhile: the Predictor has its CPUs
                    batch = max(1, round(window["inputs"] / max(window["batches"], 1)))
                    window["predictor_batch"] = batch
                    window["predictor_texts_per_s"] = baseline.texts_per_s(batch, min(window["wall"], 10.0))
                    served = (len(window["latencies"]) * args.texts_per_request) / window["wall"]
                    window["ratio_to_predictor"] = served / window["predictor_texts_per_s"]
                windows.append(window)
            results.append(combine_windows(c, windows, args.texts_per_request))
            r = results[-1]
            print(f"concurrency {c:>3}: {r['requests_per_s']:.1f} req/s, p50 {r['p50_ms']:.1f} ms, "
                  f"p99 {r['p99_ms']:.1f} ms, errors {r['errors']}, batch {r['mean_batch']:.1f}"
                  + (f", server/Predictor {r['ratio_to_predictor']:.2f}" if baseline else ""), flush=True)
        stats = httpx.get(f"{url}/health", timeout=10).json()
        rss_after = rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        if baseline is not None:
            baseline.close()
    result = {
        "header": {
            "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "machine": device_name(health["provider"].startswith("CUDA")),
            "served": str(Path(args.dir) / args.mode) if (Path(args.dir) / args.mode).is_dir() else args.dir,
            "provider": health["provider"], "threads": args.threads, "max_batch_size": args.max_batch_size,
            "max_wait_ms": args.max_wait_ms, "requests": args.requests, "duration_s": args.duration,
            "texts_per_request": args.texts_per_request, "rounds": args.rounds,
            "server_exit_code": proc.returncode,
            "server_cpus": args.server_cpus, "client_cpus": args.client_cpus,
        },
        "levels": results,
        "server_stats": {k: stats[k] for k in ("requests", "inputs", "batches", "largest_batch", "model_seconds")},
        "server_rss_mb": {"before": round(rss_before, 1), "after": round(rss_after, 1)},
    }
    from adalora_deploy.bench.run import write_script_outputs

    write_script_outputs(result, render_markdown(result), args.json, args.markdown)
    return 1 if any(r["errors"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
