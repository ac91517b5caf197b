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

from adalora_deploy.bench.run import make_feeds
from adalora_deploy.constants import ADAPTER_FILE, CHECKPOINT_CONFIG_FILE, MANIFEST_FILE, MODEL_FILE
from adalora_deploy.exporters import export
from adalora_deploy.io import read_json
from adalora_deploy.ort import CPU_EP, inference_session
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
    p.add_argument("--checkpoint", help="checkpoint directory written by `adalora-deploy train` (required)")
    p.add_argument("--repeats", type=int, default=2, help="timed exports per configuration (interleaved)")
    p.add_argument("--threads", type=int, default=2, help="torch threads during export (the target is 2 cores)")
    p.add_argument("--latency-runs", type=int, default=20, help="timed runs per graph and shape (0: skip)")
    p.add_argument("--train-command", default=None, help="the command that made --checkpoint (recorded)")
    p.add_argument("--from-json", default=None, help="only re-render the markdown of an existing results JSON")
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
    m = read_json(mode_dir / MANIFEST_FILE)
    return {
        "onnx_bytes": (mode_dir / MODEL_FILE).stat().st_size,
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

    config = read_json(checkpoint / CHECKPOINT_CONFIG_FILE)
    pruned = prune(load_safetensors(checkpoint / ADAPTER_FILE))
    ranks = sorted(pruned.ranks_after.values())
    return {
        "base_model": config["base_model"], "init_r": config["adalora"]["init_r"],
        "target_r": config["adalora"]["target_r"], "steps_done": config["steps_done"], "modules": len(ranks),
        "budget": sum(ranks), "rank_min": ranks[0], "rank_max": ranks[-1], "rank_zero_modules": ranks.count(0),
        "adapter_params_before": pruned.params_before, "adapter_params_after": pruned.params_after,
    }


def naive_factored(checkpoint: Path, work: Path, config) -> tuple[Path, dict]:
    """The pruned factored graph fused as exported, branches left in place: what the fusions lose."""
    import onnx

    from adalora_deploy.architectures import ARCHITECTURES
    from adalora_deploy.exporters import graph as graphs

    raw = export(checkpoint, work / "raw", mode="factored", prune_ranks=True, optimize=False, validate=False)
    fused, counts = graphs.optimize(onnx.load(str(raw / "factored" / MODEL_FILE)), ARCHITECTURES["bert"].fusion, config,
                                    "MultiHeadAttention", has_branches=False)
    graphs.save(fused, work / "naive.onnx")
    return work / "naive.onnx", {k: v for k, v in counts.items() if v}


def latency_graphs(checkpoint: Path, work: Path, timed: dict[str, dict]) -> tuple[dict, dict]:
    """name -> (model.onnx, ORT optimizers disabled at session load), and the naive factored fused ops."""
    import onnx
    from transformers import AutoConfig

    from adalora_deploy.architectures import ARCHITECTURES
    from adalora_deploy.exporters import graph as graphs
    from adalora_deploy.exporters.specs import FusionSpec

    plain = export(checkpoint, work / "plain", mode="merged", prune_ranks=True, optimize=False, validate=False)
    plain_onnx, config = plain / "merged" / MODEL_FILE, AutoConfig.from_pretrained(plain / "merged")
    full, _ = graphs.optimize(onnx.load(str(plain_onnx)), ARCHITECTURES["bert"].fusion, config, "Attention", has_branches=False,
                              fusions=FusionSpec(raw_attention_mask=True, skip_layer_norm=True))
    graphs.save(full, work / "full.onnx")
    naive, naive_ops = naive_factored(checkpoint, work, config)
    cpu = ["SkipLayerNormFusion"]  # the CPU session setting recommended with our export (specs.FusionSpec)
    merged = timed["merged (pruned)"]["dir"] / "merged" / MODEL_FILE
    return {
        "optimum plain (merged, no fusion)": (plain_onnx, cpu),
        "merged, export default": (merged, cpu),
        "merged, export default, session SkipLN fusion on": (merged, []),
        "merged, SkipLN fused offline (ORT recipe)": (work / "full.onnx", cpu),
        "factored (pruned)": (timed["factored (pruned)"]["dir"] / "factored" / MODEL_FILE, cpu),
        "factored (pruned), fused with branches in place": (naive, cpu),
        "factored (unpruned baseline)": (timed["factored (unpruned baseline)"]["dir"] / "factored" / MODEL_FILE, cpu),
    }, naive_ops


def measure_latency(variants: dict[str, tuple[Path, list[str]]], vocab: int, runs: int) -> list[dict]:
    """Median process CPU ms per run on one thread, variants interleaved; ratio to the first variant."""
    import onnxruntime as ort

    sessions = {}
    for name, (path, disabled) in variants.items():
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = 1, 1, 3
        sessions[name] = inference_session(path, [CPU_EP], options, disabled)
    cells = []
    for batch, seq in SHAPES:
        feeds = make_feeds(batch, seq, vocab, 0)
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


def findings(results: dict) -> list[str]:
    """The figures that answer the issue's questions, read off the results."""
    ex, ck = results["exports"], results["checkpoint"]
    worst = max(row["per_mode_s"] if name != "both (pruned)" else row["median_s"] / 2 for name, row in ex.items())
    pruned_mb = ex["factored (pruned)"]["modes"]["factored"]["onnx_bytes"] / 1e6
    unpruned_mb = ex["factored (unpruned baseline)"]["modes"]["factored"]["onnx_bytes"] / 1e6
    merged_mb = ex["merged (pruned)"]["modes"]["merged"]["onnx_bytes"] / 1e6
    lines = [
        f"- Slowest single-mode export: {worst:.1f} s (target 60 s): {'met' if worst <= 60 else 'NOT met'}.",
        f"- Pruning keeps {ck['adapter_params_after']:,} of {ck['adapter_params_before']:,} adapter parameters; the "
        f"factored graph shrinks from {unpruned_mb:.1f} MB (all init_r triplets) to {pruned_mb:.1f} MB "
        f"(merged: {merged_mb:.1f} MB, the base model's size).",
    ]
    if results.get("naive_factored_fused_ops"):
        kept = ex["both (pruned)"]["modes"]["factored"]["fused_ops"]
        lines.append(f"- Fusions in the factored graph: {kept} with the branches set aside during fusion (the export), "
                     f"{results['naive_factored_fused_ops']} with the branches left between MatMul and bias Add.")
    for cell in results.get("latency", []):
        r = cell["results"]
        merged, factored = r["merged, export default"]["median_ms"], r["factored (pruned)"]["median_ms"]
        lines.append(
            f"- CPU {cell['batch']}x{cell['seq']}: merged (export default) {r['merged, export default']['ratio_to_plain']:.3f}"
            f" x Optimum plain, {r['merged, export default, session SkipLN fusion on']['ratio_to_plain']:.3f} when the "
            f"session fuses SkipLayerNormalization; factored pruned = {factored / merged:.3f} x merged "
            f"({r['factored (pruned), fused with branches in place']['median_ms'] / merged:.3f} x merged when fused "
            "with the branches in place)."
        )
    return lines


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
    if results.get("naive_factored_fused_ops"):
        lines.append(f"- factored fused with the branches left in place (not what the export does): "
                     f"{results['naive_factored_fused_ops']}")
    lines += ["", "## Findings", "", *findings(results)]
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
    if args.from_json:
        Path(args.out + ".md").write_text(render(json.loads(Path(args.from_json).read_text())))
        return 0
    if not args.checkpoint:
        raise SystemExit("export_bench.py: --checkpoint is required")
    torch.set_num_threads(args.threads)
    checkpoint = Path(args.checkpoint)
    meta = read_json(checkpoint / CHECKPOINT_CONFIG_FILE)
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
            variants, results["naive_factored_fused_ops"] = latency_graphs(checkpoint, Path(tmp), timed)
            results["latency"] = measure_latency(variants, int(meta.get("vocab_size") or 30522), args.latency_runs)
    Path(args.out + ".json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    Path(args.out + ".md").write_text(render(results))
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
