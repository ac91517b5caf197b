"""Training steps on a busy machine: how OpenMP's wait policy and torch's thread count decide whether a
step slows down in proportion to the load or collapses.

The step is the demo's: the packaged MiniLM with AdaLoRA (init_r 12, target_r 4), batch 32, the
builtin Rotten Tomatoes rows at --max-length 64, through `adalora_deploy.training.fit` (forward, loss +
orthogonal penalty, backward, clipping, AdamW, the rank allocator). Beside it run k = 0, 1, 2 busy
processes: pure-Python spin loops, one core's worth of demand each, like another job's Python loop.

Variants, each a worker process that loads the model once (the wait policy is read when OpenMP
starts, so it cannot change inside a process):
    policy  default (OMP_WAIT_POLICY unset: libgomp spins ~300,000 times before sleeping), ACTIVE
            (waiting threads spin without end) and PASSIVE (they sleep at once: what the CLI sets)
    threads the CPU count (torch's default) and the cores the busy processes leave free (at least 1)

Everything is interleaved in one run: every round visits every k (the spinners start and stop around
it) and, within it, every variant, in rotated order. Idle workers are stopped with SIGSTOP, so that an
ACTIVE worker's spinning threads load only its own block. A step is timed between two consecutive
calls of the allocator (once per step, at its end); each block's first step is left out (warm-up).
Reported: median step per cell, and the slowdown against the same variant with k = 0, taken per
round (ratios of blocks measured minutes apart on a machine others share would drift) then the
median over rounds, beside the ideal proportional slowdown: with k spinners, t training threads and c
cores, a fair scheduler gives each runnable thread min(1, c / (k + t)) of a core, so the training gets
t * min(1, c / (k + t)) cores and, if its work scales with cores, its step slows by
min(1, c / t) / min(1, c / (k + t)). Also the CPU time the worker burnt per wall second ("cores
used"): spinning threads burn CPU without progress.

Usage:
    .venv/bin/python benchmarks/busy_machine.py --rounds 3 --steps 5 --out benchmarks/busy_machine
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

POLICIES = ("default", "ACTIVE", "PASSIVE")
SPIN = "while True: pass"


# -- the worker: one wait policy, the model loaded once, blocks of steps on request ---------------


def worker() -> None:
    from adalora_deploy.data import encode, load_splits
    from adalora_deploy.training import TrainConfig, _prepare

    answers = sys.stdout
    sys.stdout = sys.stderr  # the library's notes must not mix with the answers
    cfg = TrainConfig(steps=1000, batch_size=32, max_length=64)  # the demo's batch and length
    train_set, _ = load_splits(cfg.data)
    model, tokenizer = _prepare(cfg, train_set)
    encoded = encode(train_set, tokenizer, cfg.max_length)
    print(json.dumps({"ready": True, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}), file=answers, flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        answer = run_block(model, encoded, cfg, request["threads"], request["steps"])
        print(json.dumps(answer), file=answers, flush=True)


def run_block(model, encoded, cfg, threads: int, steps: int) -> dict:
    """`steps` training steps through fit(), timed between the allocator's calls (one per step)."""
    import torch

    from adalora_deploy.allocator import RankAllocator
    from adalora_deploy.training import TrainConfig, fit

    torch.set_num_threads(threads)
    stamps = []
    allocator = RankAllocator(model, model.config, cfg.steps)
    allocate = allocator.update_and_allocate

    def stamped(step):
        budget = allocate(step)
        stamps.append(time.perf_counter())
        return budget

    allocator.update_and_allocate = stamped
    block = TrainConfig(steps=steps, batch_size=cfg.batch_size, max_length=cfg.max_length, tinit=0, tfinal=0, delta_t=1)
    cpu0, wall0 = _cpu_seconds(), time.perf_counter()
    fit(model, allocator, encoded, block, progress=False)
    cpu, wall = _cpu_seconds() - cpu0, time.perf_counter() - wall0
    return {"steps": [b - a for a, b in zip(stamps, stamps[1:], strict=False)], "cores_used": cpu / wall}


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- the driver -------------------------------------------------------------------------------------


class Worker:
    """A worker process for one wait policy, stopped (SIGSTOP) between its blocks."""

    def __init__(self, policy: str):
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
        if policy != "default":
            env["OMP_WAIT_POLICY"] = policy
        self.policy = policy
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        ready = json.loads(self.proc.stdout.readline())
        assert ready["omp_wait_policy"] == (None if policy == "default" else policy), ready
        self.proc.send_signal(signal.SIGSTOP)

    def block(self, threads: int, steps: int) -> dict:
        self.proc.send_signal(signal.SIGCONT)
        self.proc.stdin.write(json.dumps({"threads": threads, "steps": steps}) + "\n")
        self.proc.stdin.flush()
        answer = json.loads(self.proc.stdout.readline())
        self.proc.send_signal(signal.SIGSTOP)
        return answer

    def close(self) -> None:
        self.proc.send_signal(signal.SIGCONT)
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


class Background:
    """Samples, every 0.2 s in a thread, how many runnable tasks are not ours: /proc/loadavg's runnable
    count less the running threads of our worker and spinners and the sampler itself. Other people's
    jobs share this machine; the figure says how much of it they took during a block."""

    def __init__(self, pids: list[int]):
        import threading

        self.pids, self.samples, self.done = pids, [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.wait(0.2):
            runnable = int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
            self.samples.append(max(0, runnable - 1 - sum(_running_threads(p) for p in self.pids)))

    def stop(self) -> float:
        self.done.set()
        self.thread.join()
        return statistics.mean(self.samples) if self.samples else 0.0


def _running_threads(pid: int) -> int:
    count = 0
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        try:
            count += stat.read_text().rsplit(")", 1)[1].split()[0] == "R"
        except (OSError, IndexError):
            pass  # the thread ended meanwhile
    return count


def spinners(k: int) -> list[subprocess.Popen]:
    procs = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(k)]
    time.sleep(0.5)  # started and spinning before the block
    return procs


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
        p.wait()


def thread_settings(cores: int, k: int) -> list[int]:
    """The CPU count (torch's default), the cores k spinners leave free, and 1 as a reference."""
    return sorted({cores, max(1, cores - k), 1}, reverse=True)


def share(cores: int, threads: int, k: int, background: float = 0.0) -> float:
    """Cores a fair scheduler gives `threads` busy threads beside k spinners and `background` other tasks."""
    return threads * min(1.0, cores / (k + threads + background))


def ideal_slowdown(cores: int, threads: int, k: int) -> float:
    return share(cores, threads, 0) / share(cores, threads, k)


def measure(cores: int, loads: list[int], rounds: int, steps: int) -> list[dict]:
    from tqdm.auto import tqdm

    workers = [Worker(p) for p in POLICIES]
    blocks = []
    total = rounds * sum(len(thread_settings(cores, k)) * len(workers) for k in loads)
    bar = tqdm(total=total, desc="blocks")
    try:
        for r in range(rounds):
            for i, k in enumerate(loads[r % len(loads):] + loads[:r % len(loads)]):
                variants = [(w, t) for w in workers for t in thread_settings(cores, k)]
                shift = (r + i) % len(variants)
                busy = spinners(k)
                try:
                    for w, t in variants[shift:] + variants[:shift]:
                        background = Background([w.proc.pid, *(p.pid for p in busy)])
                        answer = w.block(t, steps)
                        blocks.append({"round": r, "k": k, "policy": w.policy, "threads": t, **answer,
                                       "background": background.stop(), "loadavg_1m": os.getloadavg()[0]})
                        bar.update()
                finally:
                    stop(busy)
    finally:
        bar.close()
        for w in workers:
            w.close()
    return blocks


def summarize(blocks: list[dict], cores: int) -> list[dict]:
    rows = []
    cells = sorted({(b["policy"], b["threads"], b["k"]) for b in blocks}, key=lambda c: (c[2], POLICIES.index(c[0]), -c[1]))
    for policy, threads, k in cells:
        mine = [b for b in blocks if (b["policy"], b["threads"], b["k"]) == (policy, threads, k)]
        base = {b["round"]: statistics.median(b["steps"]) for b in blocks
                if (b["policy"], b["threads"], b["k"]) == (policy, threads, 0)}
        best = {r: min(statistics.median(b["steps"]) for b in blocks if b["k"] == 0 and b["round"] == r)
                for r in base}
        ratios = [statistics.median(b["steps"]) / base[b["round"]] for b in mine if b["round"] in base]
        to_best = [statistics.median(b["steps"]) / best[b["round"]] for b in mine if b["round"] in best]
        all_steps = [s for b in mine for s in b["steps"]]
        ideal = ideal_slowdown(cores, threads, k)
        slowdown = statistics.median(ratios) if ratios else None
        base_bg = {b["round"]: b["background"] for b in blocks
                   if (b["policy"], b["threads"], b["k"]) == (policy, threads, 0)}
        ideal_bg = [share(cores, threads, 0, base_bg[b["round"]]) / share(cores, threads, k, b["background"])
                    for b in mine if b["round"] in base_bg]
        rows.append({
            "k": k, "policy": policy, "threads": threads,
            "median_step_s": statistics.median(all_steps),
            "p90_step_s": statistics.quantiles(all_steps, n=10)[-1] if len(all_steps) > 1 else all_steps[0],
            "slowdown": slowdown, "ideal_slowdown": ideal,
            "excess": slowdown / ideal if slowdown else None,
            "background": statistics.median(b["background"] for b in mine),
            "ideal_given_background": statistics.median(ideal_bg) if ideal_bg else None,
            "vs_best_unloaded": statistics.median(to_best) if to_best else None,
            "cores_used": statistics.median(b["cores_used"] for b in mine),
            "steps_timed": len(all_steps),
        })
    return rows


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def markdown(result: dict) -> str:
    h = result["header"]
    lines = [
        "# Training steps on a busy machine", "",
        f"Command: `{h['command']}`", "",
        f"{h['cpu']}; {h['cores']} cores usable (affinity and CPU quota); torch {h['torch']}; {h['date']}.",
        f"Machine load (uptime) before: `{h['uptime_before']}`; after: `{h['uptime_after']}`.",
        f"{h['rounds']} rounds x {h['steps'] - 1} timed steps per block; the demo's step (MiniLM + AdaLoRA, batch 32, "
        "Rotten Tomatoes at --max-length 64).", "",
        "Slowdown: the step's median over the same variant's median with no spinner, per round, median over rounds. "
        "Ideal: the fair-share slowdown min(1, c/t) / min(1, c/(k+t)). Excess: slowdown / ideal (1.0 = in proportion "
        "to the load). vs best unloaded: against the fastest variant with no spinner in the same round.", "",
        "| busy processes k | OMP_WAIT_POLICY | threads | median step | p90 | slowdown | ideal | excess | vs best unloaded "
        "| cores used | others' runnable tasks | ideal given them |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        def f(x, fmt="{:.2f}"):
            return "-" if x is None else fmt.format(x)
        lines.append(
            f"| {r['k']} | {r['policy']} | {r['threads']} | {r['median_step_s']:.3f} s | {r['p90_step_s']:.3f} s | "
            f"{f(r['slowdown'])}x | {f(r['ideal_slowdown'])}x | {f(r['excess'])} | {f(r['vs_best_unloaded'])}x | "
            f"{r['cores_used']:.2f} | {r['background']:.1f} | {f(r['ideal_given_background'])}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="steps per block; the first is not timed")
    parser.add_argument("--loads", default="0,1,2", help="numbers of busy processes")
    parser.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = parser.parse_args()
    if args.worker:
        return worker()
    import torch

    from adalora_deploy.bench.run import device_name
    from adalora_deploy.threads import usable_cores

    cores = usable_cores()
    loads = [int(k) for k in args.loads.split(",")]
    before = uptime()
    started = time.time()
    blocks = measure(cores, loads, args.rounds, args.steps)
    cpu = device_name(cuda=False)
    result = {
        "header": {"command": "python benchmarks/busy_machine.py " + " ".join(sys.argv[1:]), "cpu": cpu,
                   "cores": cores, "torch": torch.__version__, "rounds": args.rounds, "steps": args.steps,
                   "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)), "uptime_before": before,
                   "uptime_after": uptime(), "seconds": round(time.time() - started)},
        "rows": summarize(blocks, cores),
        "blocks": blocks,
    }
    page = markdown(result)
    print(page)
    if args.out:
        from adalora_deploy.bench.run import write_script_outputs

        write_script_outputs(result, page, args.out + ".json", args.out + ".md")


if __name__ == "__main__":
    main()
