"""Export benchmark: time per mode, file sizes and adapter parameters before/after pruning, for the
packaged MiniLM with a checkpoint from `adalora-deploy train --init-r 12 --target-r 4`.

Each configuration is one full `export(...)` call as a user runs it (load, trace, fuse, validate
against PyTorch, write), repeated and interleaved; medians and spreads are reported. A second part
measures ONNX Runtime CPU latency of the graphs, to back the fusion choice declared in
exporters/specs.py (FusionSpec): variants interleaved in one process, process CPU time on one thread
(the machine is shared, so wall time is noisy), ratios to Optimum's plain export.

    .venv/bin/python benchmarks/export_bench.py --checkpoint CKPT   # CKPT from adalora-deploy train
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from adalora_deploy.exporters import export
from adalora_deploy.io import read_json
from adalora_deploy.prune import prune

HERE = Path(__file__).resolve().parent
# (name, export keyword arguments): one `adalora-deploy export` invocation each
CONFIGS = {
    "merged (pruned)": {"mode": "merged", "prune_ranks": True},
    "factored (pruned)": {"mode": "factored", "prune_ranks": True},
    "factored (unpruned baseline)": {"mode": "factored", "prune_ranks": False},
    "both (pruned)": {"mode": "both", "prune_ranks": True},
}
SHAPES = ((1, 128), (32, 128))  # (batch, seq) cells of the latency check


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint directory written by `adalora-deploy train`")
    p.add_argument("--repeats", type=int, default=2, help="timed exports per configuration (interleaved)")
    p.add_argument("--threads", type=int, default=2, help="torch threads during export (the target is 2 cores)")
    p.add_argument("--latency-runs", type=int, default=20, help="timed runs per graph and shape (0: skip)")
    p.add_argument("--train-command", default=None, help="the command that made --checkpoint (recorded)")
    p.add_argument("--out", default=str(HERE / "export"), help="results prefix: writes PREFIX.md and PREFIX.json")
    return p.parse_args(argv)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def time_exports(checkpoint: Path, work: Path, repeats: int) -> dict[str, dict]:
    """Every configuration `repeats` times, interleaved; keeps the last export directory of each."""
    from tqdm import tqdm

    seconds: dict[str, list[float]] = {name: [] for name in CONFIGS}
    dirs: dict[str, Path] = {}
    with tqdm(total=repeats * len(CONFIGS), desc="exports", file=sys.stderr) as bar:
        for i in range(repeats):
            for name, kwargs in CONFIGS.items():
                out = work / f"{name.split()[0]}-{kwargs['prune_ranks']}-{i}"
                start = time.perf_counter()
                export(checkpoint, out, **kwargs)
                seconds[name].append(time.perf_counter() - start)
                dirs[name] = out
                bar.update()
    return {name: {"seconds": s, "dir": dirs[name]} for name, s in seconds.items()}


def mode_figures(mode_dir: Path) -> dict:
    m = read_json(mode_dir / "adalora_manifest.json")
    return {
        "onnx_bytes": (mode_dir / "model.onnx").stat().st_size,
        "dir_bytes": dir_bytes(mode_dir),
        "trace_and_fuse_seconds": m["export_seconds"],
        "adapter_params_before": m["adapter_params_before"],
        "adapter_params_after": m["adapter_params_after"],
        "branch_params_in_graph": m["graph"]["branch_params"],
        "branches": m["graph"]["branches"],
        "fused_ops": {k: v for k, v in (m["graph"]["fused_ops"] or {}).items() if v},
        "onnx_vs_pytorch_max_abs_diff": m["validation"]["parity"]["onnx_vs_pytorch"]["max_abs_diff"],
    }


def summarize(timed: dict[str, dict]) -> dict[str, dict]:
    rows = {}
    for name, t in timed.items():
        s = t["seconds"]
        modes = sorted(p.name for p in t["dir"].iterdir())
        rows[name] = {
            "median_s": statistics.median(s), "min_s": min(s), "max_s": max(s), "runs": len(s),
            "per_mode_s": statistics.median(s) / len(modes),
            "modes": {mode: mode_figures(t["dir"] / mode) for mode in modes},
        }
    return rows


def checkpoint_figures(checkpoint: Path) -> dict:
    from adalora_deploy.io import load_safetensors

    config = read_json(checkpoint / "adalora_config.json")
    pruned = prune(load_safetensors(checkpoint / "adapter.safetensors"))
    ranks = sorted(pruned.ranks_after.values())
    return {
        "base_model": config["base_model"], "init_r": config["adalora"]["init_r"],
        "target_r": config["adalora"]["target_r"], "steps_done": config["steps_done"], "modules": len(ranks),
        "budget": sum(ranks), "rank_min": ranks[0], "rank_max": ranks[-1], "rank_zero_modules": ranks.count(0),
        "adapter_params_before": pruned.params_before, "adapter_params_after": pruned.params_after,
    }


def latency_graphs(checkpoint: Path, work: Path, timed: dict[str, dict]) -> dict[str, tuple[Path, list[str]]]:
    """name -> (model.onnx, ORT optimizers disabled at session load)."""
    import onnx
    from transformers import AutoConfig

    from adalora_deploy.exporters import graph as graphs
    from adalora_deploy.exporters.specs import ARCHITECTURES, FusionSpec

    plain = export(checkpoint, work / "plain", mode="merged", prune_ranks=True, optimize=False, validate=False)
    plain_onnx = plain / "merged" / "model.onnx"
    full, _ = graphs.optimize(onnx.load(str(plain_onnx)), ARCHITECTURES["bert"], AutoConfig.from_pretrained(plain / "merged"),
                              "Attention", has_branches=False, fusions=FusionSpec(raw_attention_mask=True, skip_layer_norm=True))
    graphs.save(full, work / "full.onnx")
    cpu = ["SkipLayerNormFusion"]  # the CPU session setting recommended with our export (specs.FusionSpec)
    return {
        "optimum plain (merged, no fusion)": (plain_onnx, cpu),
        "merged, export default": (timed["merged (pruned)"]["dir"] / "merged" / "model.onnx", cpu),
        "merged, export default, session SkipLN fusion on": (timed["merged (pruned)"]["dir"] / "merged" / "model.onnx", []),
        "merged, SkipLN fused offline (ORT recipe)": (work / "full.onnx", cpu),
        "factored (pruned)": (timed["factored (pruned)"]["dir"] / "factored" / "model.onnx", cpu),
        "factored (unpruned baseline)": (timed["factored (unpruned baseline)"]["dir"] / "factored" / "model.onnx", cpu),
    }


def measure_latency(variants: dict[str, tuple[Path, list[str]]], vocab: int, runs: int) -> list[dict]:
    """Median process CPU ms per run on one thread, variants interleaved; ratio to the first variant."""
    import onnxruntime as ort

    sessions = {}
    for name, (path, disabled) in variants.items():
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = 1, 1, 3
        sessions[name] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                                              disabled_optimizers=disabled)
    cells = []
    for batch, seq in SHAPES:
        rng = np.random.default_rng(0)
        feeds = {"input_ids": rng.integers(1000, vocab, (batch, seq)), "attention_mask": np.ones((batch, seq), np.int64),
                 "token_type_ids": np.zeros((batch, seq), np.int64)}
        for s in sessions.values():  # warm-up
            s.run(None, feeds)
        times: dict[str, list[float]] = {name: [] for name in sessions}
        for _ in range(runs):
            for name, s in sessions.items():
                start = time.process_time()
                s.run(None, feeds)
                times[name].append(time.process_time() - start)
        ref = statistics.median(next(iter(times.values())))
        cells.append({"batch": batch, "seq": seq, "results": {
            name: {"median_ms": 1e3 * statistics.median(t), "ratio_to_plain": statistics.median(t) / ref,
                   "p10_ms": 1e3 * float(np.percentile(t, 10)), "p90_ms": 1e3 * float(np.percentile(t, 90))}
            for name, t in times.items()}})
    return cells


def render(results: dict) -> str:
    ck, lines = results["checkpoint"], []
    lines += [
        "# Export benchmark", "",
        f"Command: `{results['command']}`", "",
        f"Checkpoint: `{results['checkpoint_path']}`, made by `{results['train_command']}`" if results["train_command"]
        else f"Checkpoint: `{results['checkpoint_path']}`", "",
        f"Machine: {results['machine']}; torch threads {results['threads']}; {results['repeats']} interleaved repeats "
        "per configuration. The machine is shared with other jobs, so wall times are upper bounds.", "",
        f"Base {ck['base_model']['name_or_path']}, {ck['modules']} adapted modules, init_r {ck['init_r']}, "
        f"target_r {ck['target_r']}, {ck['steps_done']} steps: budget {ck['budget']} triplets, ranks "
        f"{ck['rank_min']}..{ck['rank_max']}, {ck['rank_zero_modules']} modules at rank 0.", "",
        f"Adapter parameters (P, lam, Q): **{ck['adapter_params_before']:,} before pruning, "
        f"{ck['adapter_params_after']:,} after** ({ck['adapter_params_after'] / ck['adapter_params_before']:.1%}).", "",
        "## Export time per mode (target: <= 60 s per mode on 2 CPU cores)", "",
        "One `export(...)` call each: load, trace (Optimum/TorchScript), fuse, validate against PyTorch on 4 "
        "batches, write. `both` exports two modes in one call (one load, one validation).", "",
        "| configuration | median s | min..max s | s per mode | model.onnx MB | dir MB | branch params in graph |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in results["exports"].items():
        onnx_mb = " / ".join(f"{m['onnx_bytes'] / 1e6:.1f}" for m in row["modes"].values())
        dir_mb = " / ".join(f"{m['dir_bytes'] / 1e6:.1f}" for m in row["modes"].values())
        branch = " / ".join(f"{m['branch_params_in_graph']:,}" for m in row["modes"].values())
        lines.append(f"| {name} | {row['median_s']:.1f} | {row['min_s']:.1f}..{row['max_s']:.1f} | "
                     f"{row['per_mode_s']:.1f} | {onnx_mb} | {dir_mb} | {branch} |")
    lines += ["", "Fused ops (offline) and parity in the `both (pruned)` export:", ""]
    for mode, m in results["exports"]["both (pruned)"]["modes"].items():
        lines.append(f"- {mode}: {m['fused_ops']}; ONNX Runtime vs PyTorch max abs diff {m['onnx_vs_pytorch_max_abs_diff']:.2e}; "
                     f"trace+fuse {m['trace_and_fuse_seconds']:.1f} s")
    if results.get("latency"):
        lines += ["", "## ONNX Runtime CPU latency of the graphs (why SkipLayerNormalization is not fused offline)", "",
                  "One thread, process CPU time per run, variants interleaved, median of "
                  f"{results['latency_runs']} runs; ratio to Optimum's plain export. Sessions disable ORT's "
                  "SkipLayerNormFusion unless the row says otherwise.", ""]
        names = list(results["latency"][0]["results"])
        lines += ["| graph | " + " | ".join(f"{c['batch']}x{c['seq']} ms (ratio)" for c in results["latency"]) + " |",
                  "|---|" + "---:|" * len(results["latency"])]
        for name in names:
            cells = [c["results"][name] for c in results["latency"]]
            lines.append(f"| {name} | " + " | ".join(f"{r['median_ms']:.1f} ({r['ratio_to_plain']:.3f})" for r in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    checkpoint = Path(args.checkpoint)
    meta = read_json(checkpoint / "adalora_config.json")
    with tempfile.TemporaryDirectory(prefix="export-bench-") as tmp:
        timed = time_exports(checkpoint, Path(tmp), args.repeats)
        results = {
            "command": "python benchmarks/export_bench.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
            "train_command": args.train_command,
            "checkpoint_path": str(checkpoint), "checkpoint": checkpoint_figures(checkpoint),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "threads": args.threads, "repeats": args.repeats,
            "exports": summarize(timed), "latency_runs": args.latency_runs,
        }
        if args.latency_runs > 0:
            variants = latency_graphs(checkpoint, Path(tmp), timed)
            results["latency"] = measure_latency(variants, int(meta.get("vocab_size") or 30522), args.latency_runs)
    Path(args.out + ".json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    Path(args.out + ".md").write_text(render(results))
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
