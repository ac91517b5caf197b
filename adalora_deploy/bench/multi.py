"""`adalora-deploy bench CHECKPOINT --adapters N`: many adapters on one multi graph against one merged graph,
today's factored graph and PEFT eager with set_adapter per group of rows (docs/adapter_pack.md).

Adapters: the checkpoint's own pack, plus N-1 synthetic packs derived from it: every module gets a random
rank in [0, the checkpoint's largest rank] (so ranks differ by layer and by adapter, rank 0 included),
factors drawn with the trained factors' standard deviations, heads of 2 or 3 classes. They cost what a
trained adapter of those ranks costs; their predictions mean nothing.

Measured in one process, interleaved per cell (b1 and b32 at s128 by default, 1 thread): merged, factored,
multi with 1, 4 and N adapters loaded (rows assigned to adapters at random), PEFT eager with 1 adapter (one
group of rows: merged / PEFT eager bounds multi / PEFT eager), and PEFT eager with N adapters
(2-class heads, every module at the checkpoint's init_r: PEFT cannot hold per-layer ranks per adapter in
one model). Resident memory is read from fresh processes (session alone vs session + N packs); the load
time is a PUT /v1/adapters/NAME into a running server under concurrent requests.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from adalora_deploy.constants import (
    ADAPTER_INDEX_INPUT,
    ADAPTER_MANIFEST_FILE,
    ADAPTER_PACK_FILE,
    CHECKPOINT_CONFIG_FILE,
    DOWN_SUFFIX,
    MANIFEST_FILE,
    MODEL_CONFIG_FILE,
    UP_SUFFIX,
)
from adalora_deploy.errors import ConfigError
from adalora_deploy.io import write_json

from .run import make_feeds, summarize, time_cell, write_script_outputs
from .variants import Variant

TARGETS = {"latency_ratio": 1.3, "memory_ratio": 1.15, "load_ms": 200.0, "peft_speedup": 3.0}


def synthetic_packs(pack: Path, out: Path, count: int, seed: int = 0) -> list[Path]:
    """`count` packs derived from `pack` (see the module docstring); returns their directories."""
    from safetensors.numpy import load_file, save_file

    manifest = json.loads((pack / ADAPTER_MANIFEST_FILE).read_text())
    tensors = load_file(str(pack / ADAPTER_PACK_FILE))
    top = max(manifest["ranks"].values())
    downs = [v for k, v in tensors.items() if k.endswith(DOWN_SUFFIX)]
    ups = [v for k, v in tensors.items() if k.endswith(UP_SUFFIX)]
    down_std, up_std = float(np.concatenate([d.ravel() for d in downs]).std()), float(np.concatenate([u.ravel() for u in ups]).std())
    head = manifest["head"]
    paths = []
    for k in range(count):
        rng = np.random.default_rng(seed + k)
        labels = 2 + k % 2
        new = {f"{head['module']}.weight": rng.normal(0, 0.05, (labels, head["hidden"])).astype(np.float32),
               f"{head['module']}.bias": np.zeros(labels, np.float32)}
        ranks = {}
        for module, (d_out, d_in) in manifest["shapes"].items():
            r = ranks[module] = int(rng.integers(0, top + 1))
            if r:
                new[module + DOWN_SUFFIX] = rng.normal(0, down_std, (d_in, r)).astype(np.float32)
                new[module + UP_SUFFIX] = rng.normal(0, up_std, (r, d_out)).astype(np.float32)
        path = out / f"synthetic-{k}"
        path.mkdir(parents=True)
        save_file(new, str(path / ADAPTER_PACK_FILE))
        write_json(path / ADAPTER_MANIFEST_FILE, {
            **manifest, "ranks": ranks, "head": {**head, "num_labels": labels},
            "id2label": {str(i): f"class_{i}" for i in range(labels)},
            "source": {"kind": "synthetic", "derived_from": str(pack), "seed": seed + k},
        })
        paths.append(path)
    return paths


def _assignments(n_adapters: int, batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed + 1000 * n_adapters + batch).integers(0, n_adapters, batch)


def multi_variants(multi_dir: Path, packs: list[Path], counts: list[int], session_config) -> list[Variant]:
    """One shared multi session; per count, the stacked state of the first `count` packs."""
    from adalora_deploy.runtime.adapters import AdapterRegistry
    from adalora_deploy.runtime.session import open_session

    session = open_session(multi_dir, session_config)
    graph = json.loads((multi_dir / MANIFEST_FILE).read_text())
    variants = []
    for count in counts:
        registry = AdapterRegistry(graph)
        for i, p in enumerate(packs[:count]):
            registry.load(f"a{i}", p)
        state = registry.state

        def forward(feeds, state=state, count=count):
            index = _assignments(count, feeds["input_ids"].shape[0])
            return session.run({**feeds, ADAPTER_INDEX_INPUT: index}, resident=state.feeds)

        variants.append(Variant(f"multi_n{count}", forward, session.provider, str(multi_dir)))
    return variants


def peft_variant(checkpoint_model, count: int, threads: int) -> Variant:
    """PEFT eager: `count` AdaLoRA adapters (inference mode) in one PeftModel, set_adapter per group of rows."""
    import torch
    from peft import AdaLoraConfig, get_peft_model

    from adalora_deploy.exporters.adapter_pack import plain_model

    torch.set_num_threads(threads)
    base = plain_model(checkpoint_model.model)
    targets = list(checkpoint_model.adapters)  # full module paths: exactly the checkpoint's adapted layers
    config = AdaLoraConfig(task_type="SEQ_CLS", init_r=checkpoint_model.config.init_r, target_r=4, lora_alpha=8,
                           total_step=100, target_modules=targets, inference_mode=True)
    model = get_peft_model(base, config, adapter_name="a0")
    for i in range(1, count):
        model.add_adapter(f"a{i}", config)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.02)
    model.eval()

    @torch.no_grad()
    def forward(feeds):
        index = _assignments(count, feeds["input_ids"].shape[0])
        tensors = {k: torch.from_numpy(v) for k, v in feeds.items()}
        for a in np.unique(index):
            rows = torch.from_numpy(np.flatnonzero(index == a))
            model.set_adapter(f"a{a}")
            model(**{k: v[rows] for k, v in tensors.items()})

    return Variant(f"peft_eager_n{count}", forward, "torch-cpu")


RSS_PROBE = """
import json, sys, numpy as np
from adalora_deploy.runtime.session import SessionConfig, open_session
from adalora_deploy.runtime.adapters import AdapterRegistry
def mib():
    status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
    return {"rss_mib": int(status["VmRSS"].split()[0]) / 1024, "peak_mib": int(status["VmHWM"].split()[0]) / 1024}
kind, model_dir, threads, packs = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
steps = {"imports": mib()}
session = open_session(model_dir, SessionConfig(provider="cpu", intra_op_threads=threads, inter_op_threads=1))
steps["session"] = mib()
resident = None
if packs:
    registry = AdapterRegistry(json.load(open(model_dir + "/adalora_manifest.json")))
    for i, p in enumerate(packs):
        registry.load(f"a{i}", p)
    resident = registry.state.feeds
    steps["adapters_loaded"] = mib()
for batch, runs in ((1, 1), (32, 3)):
    feeds = {"input_ids": np.full((batch, 128), 1000, np.int64), "attention_mask": np.ones((batch, 128), np.int64),
             "token_type_ids": np.zeros((batch, 128), np.int64)}
    if packs:
        feeds["adapter_index"] = np.arange(batch) % len(packs)
    for _ in range(runs):
        session.run(feeds, resident=resident)
    steps[f"after_b{batch}"] = mib()
print(json.dumps({**steps[f"after_b32"], "steps": steps}))
"""


def rss(model_dir: Path, threads: int, packs: list[Path] = (), repeats: int = 3) -> dict:
    """Resident memory of fresh processes holding one session (and `packs`) after b1 and three b32 s128
    runs: the median over `repeats` processes, with each step's figures (session opened, adapters loaded,
    after b1, after b32) from the median process."""
    probes = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", RSS_PROBE, "x", str(model_dir), str(threads), *map(str, packs)],
                             capture_output=True, text=True, check=True)
        probes.append(json.loads(out.stdout.strip().splitlines()[-1]))
    probes.sort(key=lambda p: p["rss_mib"])
    median = probes[len(probes) // 2]
    return {**median, "all_rss_mib": [round(p["rss_mib"], 1) for p in probes]}


def load_under_traffic(multi_dir: Path, packs: list[Path], root: Path, threads: int, repeats: int = 5) -> dict:
    """PUT the last pack into a running server (the others loaded) while 2 clients send requests; each
    repeat unloads it first. Returns the PUT times and the request counts."""
    import httpx
    import uvicorn

    from adalora_deploy.runtime.predictor import Predictor
    from adalora_deploy.runtime.server import ServerConfig, create_app
    from adalora_deploy.runtime.session import SessionConfig

    predictor = Predictor.from_pretrained(multi_dir, mode="multi", batch_size=32, max_length=128,
                                          session_config=SessionConfig(provider="cpu", intra_op_threads=threads))
    for i, p in enumerate(packs[:-1]):
        predictor.load_adapter(f"a{i}", p)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = ServerConfig(port=port, max_batch_size=32, max_wait_ms=5, adapter_root=str(root))
    server = uvicorn.Server(uvicorn.Config(create_app(predictor, config), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    stop, counts = threading.Event(), {"ok": 0, "failed": 0}
    text = "a long sentence about a film that is neither good nor bad but somewhere in between " * 2

    def client(k: int):
        rng = np.random.default_rng(k)
        with httpx.Client(base_url=url, timeout=120) as c:
            while not stop.is_set():
                name = f"a{int(rng.integers(0, len(packs) - 1))}"
                ok = c.post("/v1/predict", json={"adapter": name, "inputs": [text] * 4}).status_code == 200
                counts["ok" if ok else "failed"] += 1

    clients = [threading.Thread(target=client, args=(k,)) for k in range(2)]
    for c in clients:
        c.start()
    put_ms, server_ms = [], []
    try:
        with httpx.Client(base_url=url, timeout=120) as c:
            for _ in range(repeats):
                time.sleep(0.5)
                start = time.perf_counter()
                r = c.put("/v1/adapters/new", json={"path": str(packs[-1])})
                put_ms.append(1000 * (time.perf_counter() - start))
                if r.status_code != 200:
                    raise RuntimeError(f"PUT failed: {r.status_code} {r.text}")
                server_ms.append(r.json()["load_ms"])
                ok = c.post("/v1/predict", json={"adapter": "new", "inputs": [text]}).status_code == 200
                counts["ok" if ok else "failed"] += 1
                c.delete("/v1/adapters/new")
    finally:
        stop.set()
        for c in clients:
            c.join()
        server.should_exit = True
        thread.join(timeout=60)
    return {"put_ms": put_ms, "put_p50_ms": statistics.median(put_ms), "server_load_p50_ms": statistics.median(server_ms),
            "requests_ok": counts["ok"], "requests_failed": counts["failed"], "adapters_loaded_before": len(packs) - 1}


def _export_all(checkpoint: Path, work: Path, count: int) -> dict:
    from adalora_deploy.exporters import export

    dirs = {"merged": export(checkpoint, work / "onnx", mode="both", prune_ranks=True)}
    dirs["pack"] = export(checkpoint, work / "packs" / "trained", mode="adapter", prune_ranks=True)
    dirs["multi"] = export(checkpoint, work / "multi", mode="multi") / "multi"
    dirs["packs"] = [dirs["pack"], *synthetic_packs(dirs["pack"], work / "packs", count - 1)]
    return dirs


def run_multi_bench(checkpoint: str | os.PathLike, adapters: int, batch_sizes: list[int], seq_len: int,
                    runs: int, warmup: int, threads: int, json_path: str | None, markdown_path: str | None,
                    command: str | None = None) -> dict:
    """Run the whole comparison (see the module docstring); returns the results dict."""
    from adalora_deploy.model import AdaLoraModel

    from .run import BenchConfig, check_checkpoint

    if adapters < 1:
        raise ConfigError(f"--adapters ({adapters}) must be >= 1")
    if not (Path(checkpoint) / CHECKPOINT_CONFIG_FILE).is_file():
        raise ConfigError(f"bench --adapters needs a checkpoint of `adalora-deploy train`, not {checkpoint}")
    check_checkpoint(Path(checkpoint))
    counts = sorted({c for c in (1, 4, adapters) if c <= adapters})
    config = BenchConfig(batch_sizes=batch_sizes, seq_lens=[seq_len], runs=runs, warmup=warmup, provider="cpu",
                         threads=threads)
    with tempfile.TemporaryDirectory(prefix="adalora-multi-bench-") as tmp:
        work = Path(tmp)
        dirs = _export_all(Path(checkpoint), work, adapters)
        session = config.session_config()
        from .variants import onnx_variant

        variants = [onnx_variant("merged", dirs["merged"] / "merged", session),
                    onnx_variant("factored", dirs["merged"] / "factored", session),
                    *multi_variants(dirs["multi"], dirs["packs"], counts, session),
                    # PEFT injects into the model it wraps: a fresh load for each. N=1 (one group) bounds multi / PEFT
                    *(peft_variant(AdaLoraModel.from_pretrained(checkpoint).eval(), n, threads)
                      for n in sorted({1, adapters}))]
        vocab = json.loads((dirs["multi"] / MODEL_CONFIG_FILE).read_text())["vocab_size"]
        cells = []
        for batch in batch_sizes:
            feeds = make_feeds(batch, seq_len, vocab, 0)
            times = time_cell(variants, feeds, config)
            cells.append({"batch": batch, "seq_len": seq_len, **{n: summarize(t, batch) for n, t in times.items()}})
        memory = {"merged": rss(dirs["merged"] / "merged", threads),
                  f"multi_n{adapters}": rss(dirs["multi"], threads, dirs["packs"])}
        load = load_under_traffic(dirs["multi"], dirs["packs"], work / "packs", threads)
        pack_kib = [round((p / ADAPTER_PACK_FILE).stat().st_size / 1024, 1) for p in dirs["packs"]]
        ranks = [sum(json.loads((p / ADAPTER_MANIFEST_FILE).read_text())["ranks"].values()) for p in dirs["packs"]]
    result = {"command": command, "checkpoint": str(checkpoint), "adapters": adapters, "counts": counts,
              "threads": threads, "cells": cells, "memory": memory, "load": load, "pack_kib": pack_kib,
              "total_ranks": ranks, "adapters_kind": "1 trained + synthetic packs derived from it (module docstring)"}
    result["targets"] = check_targets(result)
    write_script_outputs(result, render(result), json_path, markdown_path)
    return result


def check_targets(result: dict) -> list[dict]:
    n = result["adapters"]
    big = max(result["cells"], key=lambda c: c["batch"])
    latency = big[f"multi_n{n}"]["p50_ms"] / big["merged"]["p50_ms"]
    memory = result["memory"][f"multi_n{n}"]["rss_mib"] / result["memory"]["merged"]["rss_mib"]
    speedup = big[f"multi_n{n}"]["throughput_seq_per_s"] / big[f"peft_eager_n{n}"]["throughput_seq_per_s"]
    load = result["load"]
    # multi is never faster than merged, so multi / PEFT eager (N groups) <= merged / PEFT eager (N groups)
    bound = big["merged"]["throughput_seq_per_s"] / big[f"peft_eager_n{n}"]["throughput_seq_per_s"]
    return [
        {"target": f"multi n={n} b{big['batch']} p50 <= {TARGETS['latency_ratio']} x merged", "value": round(latency, 3),
         "met": latency <= TARGETS["latency_ratio"]},
        {"target": f"RSS with {n} adapters <= {TARGETS['memory_ratio']} x one merged session", "value": round(memory, 3),
         "met": memory <= TARGETS["memory_ratio"]},
        {"target": f"load one adapter into a running server < {TARGETS['load_ms']:.0f} ms, no failed request",
         "value": round(load["put_p50_ms"], 1), "met": load["put_p50_ms"] < TARGETS["load_ms"] and load["requests_failed"] == 0},
        {"target": f"multi >= {TARGETS['peft_speedup']} x PEFT eager throughput at n={n} b{big['batch']}",
         "value": round(speedup, 2), "met": speedup >= TARGETS["peft_speedup"],
         "bound_merged_over_peft": round(bound, 2)},
    ]


def render(result: dict) -> str:
    names = [k for k in result["cells"][0] if k not in ("batch", "seq_len")]
    lines = ["# Many adapters on one multi graph (CPU)", "", f"Command: `{result['command']}`", "",
             f"Checkpoint {result['checkpoint']}; {result['threads']} thread(s); adapters: {result['adapters_kind']}; "
             f"total ranks {result['total_ranks']}; pack sizes KiB {result['pack_kib']}.", "",
             "| batch x seq | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for c in result["cells"]:
        lines.append(f"| {c['batch']}x{c['seq_len']} p50 ms | " + " | ".join(f"{c[n]['p50_ms']:.1f}" for n in names) + " |")
        lines.append(f"| {c['batch']}x{c['seq_len']} seq/s | "
                     + " | ".join(f"{c[n]['throughput_seq_per_s']:.1f}" for n in names) + " |")
        lines.append(f"| {c['batch']}x{c['seq_len']} / merged | "
                     + " | ".join(f"{c[n]['p50_ms'] / c['merged']['p50_ms']:.2f}" for n in names) + " |")
    m, load = result["memory"], result["load"]
    lines += ["", "Resident memory, MiB (fresh processes, median of "
              f"{len(next(iter(m.values()))['all_rss_mib'])}; each step of the median process):", "",
              "| graph | session opened | adapters loaded | after b1 | after 3 x b32 s128 (peak) | all processes |",
              "|---|---|---|---|---|---|"]
    for k, v in m.items():
        step = {name: f"{s['rss_mib']:.0f}" for name, s in v["steps"].items()}
        lines.append(f"| {k} | {step['session']} | {step.get('adapters_loaded', '-')} | {step['after_b1']} "
                     f"| {v['rss_mib']:.0f} ({v['peak_mib']:.0f}) | {v['all_rss_mib']} |")
    lines += ["",
              f"Load into a running server ({load['adapters_loaded_before']} adapters loaded, 2 clients sending): PUT "
              f"p50 {load['put_p50_ms']:.1f} ms (all: {', '.join(f'{x:.1f}' for x in load['put_ms'])}), server-side "
              f"p50 {load['server_load_p50_ms']:.1f} ms; requests ok {load['requests_ok']}, failed {load['requests_failed']}.",
              "", "| target | value | met |", "|---|---|---|"]
    lines += [f"| {t['target']} | {t['value']} | {'yes' if t['met'] else 'NO'} |" for t in result["targets"]]
    bound = result["targets"][-1]["bound_merged_over_peft"]
    lines += ["", f"Bound: merged (one adapter, no branch) / PEFT eager N={result['adapters']} throughput = {bound}; "
              "the multi graph is never faster than merged, so multi / PEFT eager cannot exceed it."]
    return "\n".join(lines) + "\n"
