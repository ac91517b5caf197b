"""Which of ONNX Runtime's transformer fusions pay off on this CPU? An investigation behind
benchmarks/latency_cpu_notes.md, not part of the product.

From a checkpoint: Optimum's plain export of the merged model, then ORT's transformer optimizer
on it with some fusions switched off, all timed interleaved (bench.run.time_cell) against the
plain graph, plus ORT's per-operator profile of the plain and fused graphs. Every session is opened
by runtime.session.open_session, so all variants get the same session options (on CPU: ORT's
session-time SkipLayerNormFusion off).

Then graph rewrites that are candidates for the export, checked for parity and timed the same way:
- merged: Q/K/V projections packed into one MatMul + Add + Split (unfused attention);
- factored (our export, pruned) against merged: one shared down-projection for the branches that
  read the same input (query/key/value), and the up-projection folded into a widened base GEMM,
  [x, x Q'^T] @ [W0^T; P'^T] (K = d_in + r), which drops the up MatMul and the join Add.

    .venv/bin/python benchmarks/fusion_variants.py runs/bench-minilm-r12-r4 --cells 1x128,8x32 \
        --runs 25 --threads 1 --markdown benchmarks/fusion_variants_cpu.md
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from adalora_deploy.bench.profile import op_times
from adalora_deploy.bench.run import BenchConfig, make_feeds, summarize, time_cell
from adalora_deploy.bench.variants import Variant, optimum_plain_export
from adalora_deploy.constants import MODEL_CONFIG_FILE, MODEL_FILE
from adalora_deploy.exporters.graph import consumers
from adalora_deploy.runtime.session import SessionConfig, open_session, session_options

NO_SKIP = {"enable_skip_layer_norm": False, "enable_bias_skip_layer_norm": False}
# Fusion option overrides per variant; every variant uses the raw 2-D attention mask, as our exporter does.
FUSIONS = {
    "all_fusions": {},
    "no_skip_layernorm": NO_SKIP,
    "no_attention": {"enable_attention": False},
    "no_attention_no_skip": {"enable_attention": False, **NO_SKIP},
    "multi_head_attention": {"use_multi_head_attention": True},
}


def fused(plain: Path, out: Path, config, overrides: dict) -> Path:
    """ORT's transformer optimizer (opt_level 1, as the exporter runs it) with `overrides`."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    options.use_raw_attention_mask(True)
    for name, value in overrides.items():
        setattr(options, name, value)
    model = optimize_model(str(plain / MODEL_FILE), model_type="bert", num_heads=config["num_attention_heads"],
                           hidden_size=config["hidden_size"], optimization_options=options, opt_level=1, use_gpu=False)
    model.save_model_to_file(str(out))
    return out


def profile_lines(paths: dict[str, Path], names: tuple[str, ...], feeds: dict, threads: int) -> list[str]:
    """One line per graph: its 8 op types with the most kernel time, ms per run (ORT's profiler), in
    sessions like open_session's CPU ones; total is their sum."""
    lines = []
    for name in names:
        options = session_options(SessionConfig(provider="cpu", intra_op_threads=threads, spinning=False))
        profile = dict(list(op_times(paths[name], feeds, options)[1].items())[:8])
        lines.append(f"- {name}: total {sum(profile.values()):.1f}; "
                     + ", ".join(f"{op} {ms:.2f}" for op, ms in profile.items()))
    return lines


BRANCH = "adalora_branch:"  # exporters.graph labels branch nodes "adalora_branch:<module>/down|up|add"


def _save_sorted(model: onnx.ModelProto, out: Path) -> Path:
    from onnxruntime.transformers.onnx_model import OnnxModel

    wrapped = OnnxModel(model)
    wrapped.prune_graph()  # drops the initializers the rewrite left unread
    wrapped.topological_sort()
    onnx.save(wrapped.model, str(out))
    return out


def _concat_split(graph, x: str, weights: list[np.ndarray], outputs: list[str], tag: str, bias=None) -> list:
    """Nodes for one MatMul of `x` with the column-stacked `weights` (+ stacked bias), split back."""
    graph.initializer.append(numpy_helper.from_array(np.concatenate(weights, axis=1), f"{tag}/w"))
    sizes = np.array([w.shape[1] for w in weights], dtype=np.int64)
    graph.initializer.append(numpy_helper.from_array(sizes, f"{tag}/sizes"))
    nodes = [helper.make_node("MatMul", [x, f"{tag}/w"], [f"{tag}/mm"], name=f"{tag}/mm")]
    last = f"{tag}/mm"
    if bias is not None:
        graph.initializer.append(numpy_helper.from_array(np.concatenate(bias), f"{tag}/b"))
        nodes.append(helper.make_node("Add", [last, f"{tag}/b"], [f"{tag}/add"], name=f"{tag}/add"))
        last = f"{tag}/add"
    return nodes + [helper.make_node("Split", [last, f"{tag}/sizes"], outputs, axis=-1, name=f"{tag}/split")]


def _replace(graph: onnx.GraphProto, old: list, new: list) -> None:
    at = min(list(graph.node).index(n) for n in old)
    for node in old:
        graph.node.remove(node)
    for offset, node in enumerate(new):
        graph.node.insert(at + offset, node)


def pack_qkv(src: Path, out: Path) -> Path:
    """Every group of three MatMul(x, W) + Add(bias) on the same x becomes one MatMul + Add + Split."""
    model = onnx.load(str(src))
    graph, users = model.graph, consumers(model.graph)
    inits = {t.name: t for t in graph.initializer}
    groups: dict[str, list] = collections.defaultdict(list)
    for node in graph.node:
        after = users.get(node.output[0], [])
        if node.op_type == "MatMul" and node.input[1] in inits and len(after) == 1 and after[0].op_type == "Add":
            bias = [name for name in after[0].input if name in inits]
            if bias:
                groups[node.input[0]].append((node, after[0], bias[0]))
    for k, trio in enumerate(g for g in groups.values() if len(g) == 3):
        weights = [numpy_helper.to_array(inits[mm.input[1]]) for mm, _, _ in trio]  # (d_in, d_out) each
        biases = [numpy_helper.to_array(inits[b]) for _, _, b in trio]
        new = _concat_split(graph, trio[0][0].input[0], weights, [a.output[0] for _, a, _ in trio], f"qkv{k}", biases)
        _replace(graph, [n for mm, a, _ in trio for n in (mm, a)], new)
    return _save_sorted(model, out)


def widen_base(src: Path, out: Path) -> Path:
    """Each branch's up-projection joins its base GEMM: Concat(x, h) @ [W0^T; P'^T] replaces
    x @ W0^T, h @ P'^T and their Add (the down-projection h = x @ Q'^T stays a labelled MatMul)."""
    model = onnx.load(str(src))
    graph, users = model.graph, consumers(model.graph)
    inits = {t.name: t for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    downs = [n for n in graph.node if n.name.startswith(BRANCH) and n.name.endswith("/down")]
    for k, down in enumerate(downs):
        (up,) = users[down.output[0]]
        (join,) = users[up.output[0]]
        base = producers[next(name for name in join.input if name != up.output[0])]
        stacked = np.concatenate([numpy_helper.to_array(inits[base.input[1]]),  # (d_in, d_out)
                                  numpy_helper.to_array(inits[up.input[1]])])  # (r, d_out)
        graph.initializer.append(numpy_helper.from_array(stacked, f"wide{k}/w"))  # (d_in + r, d_out)
        new = [helper.make_node("Concat", [base.input[0], down.output[0]], [f"wide{k}/x"], axis=-1),
               helper.make_node("MatMul", [f"wide{k}/x", f"wide{k}/w"], [join.output[0]], name=f"wide{k}/mm")]
        _replace(graph, [base, up, join], new)
    return _save_sorted(model, out)


def shared_down(src: Path, out: Path) -> Path:
    """Branches reading the same input (query, key, value) share one down MatMul, then Split."""
    model = onnx.load(str(src))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    groups: dict[str, list] = collections.defaultdict(list)
    for node in graph.node:
        if node.name.startswith(BRANCH) and node.name.endswith("/down"):
            groups[node.input[0]].append(node)
    for k, downs in enumerate(g for g in groups.values() if len(g) > 1):
        weights = [numpy_helper.to_array(inits[d.input[1]]) for d in downs]  # Q'^T: (d_in, r) each
        _replace(graph, downs, _concat_split(graph, downs[0].input[0], weights, [d.output[0] for d in downs],
                                             f"down{k}"))
    return _save_sorted(model, out)


def timed_table(paths: dict[str, Path], reference: str, cells, vocab: int, args) -> list[str]:
    """Markdown rows of p50 ms (p50 / reference p50), all variants interleaved per cell, after a
    parity check of every variant's first output against the reference (max abs diff <= 1e-4)."""
    config = SessionConfig(provider="cpu", intra_op_threads=args.threads, inter_op_threads=1, spinning=False)
    sessions = {name: open_session(p, config) for name, p in paths.items()}
    variants = [Variant(name, s.run, "cpu") for name, s in sessions.items()]
    bench = BenchConfig(batch_sizes=[1], seq_lens=[1], runs=args.runs, warmup=2, threads=args.threads)
    lines = ["| batch | seq | " + " | ".join(paths) + " |", "|---:|---:|" + "---:|" * len(paths)]
    for b, s in cells:
        feeds = make_feeds(b, s, vocab, 0)
        want = next(iter(sessions[reference].run(feeds).values()))
        for name, session in sessions.items():
            diff = float(np.abs(next(iter(session.run(feeds).values())) - want).max())
            if diff > 1e-4:
                raise SystemExit(f"{name} differs from {reference} by {diff:.2e}")
        p50 = {n: summarize(t, b)["p50_ms"] for n, t in time_cell(variants, feeds, bench).items()}
        lines.append(f"| {b} | {s} | " + " | ".join(f"{p50[n]:.1f} ({p50[n] / p50[reference]:.3f})" for n in paths)
                     + " |")
        print(lines[-1], flush=True)
    return lines


def factored_section(checkpoint: Path, tmp: Path, cells, vocab: int, args) -> list[str]:
    """Our pruned export (merged and factored) and the factored graph's rewrites, timed against merged."""
    from adalora_deploy.exporters import export

    root = export(checkpoint, tmp / "ours", mode="both", prune_ranks=True)
    factored = root / "factored" / MODEL_FILE
    paths = {"merged": root / "merged" / MODEL_FILE, "factored": factored,
             "factored_shared_down": shared_down(factored, tmp / "shared_down.onnx")}
    paths["factored_widened"] = widen_base(factored, tmp / "widened.onnx")
    paths["factored_widened_shared_down"] = shared_down(paths["factored_widened"], tmp / "widened_shared.onnx")
    lines = ["", "Factored graph (our pruned export) and candidate rewrites; p50 ms (p50 / merged):", ""]
    lines += timed_table(paths, "merged", cells, vocab, args)
    b, s = cells[-1]
    lines += ["", f"Per-operator kernel time, ms per run (batch {b}, seq {s}):", ""]
    return lines + profile_lines(paths, ("merged", "factored", "factored_widened_shared_down"),
                                 make_feeds(b, s, vocab, 0), args.threads)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--cells", default="1x128,8x32", help="BATCHxSEQ list (default: 1x128,8x32)")
    p.add_argument("--runs", type=int, default=25)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--markdown", help="write the results here")
    args = p.parse_args(argv)
    cells = [tuple(int(v) for v in c.split("x")) for c in args.cells.split(",")]
    lines = ["# ORT transformer fusions on CPU: variants of the merged graph against Optimum's plain export", "",
             f"- command: `python {' '.join(sys.argv)}`", f"- intra-op threads {args.threads}, spinning off; "
             f"{args.runs} interleaved runs per variant and cell; p50 ms and p50 / plain", ""]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        plain = optimum_plain_export(Path(args.checkpoint), tmp / "plain")
        config = json.loads((plain / MODEL_CONFIG_FILE).read_text())
        vocab = config["vocab_size"]
        paths = {"optimum_plain": plain / MODEL_FILE}
        paths.update({n: fused(plain, tmp / f"{n}.onnx", config, o) for n, o in FUSIONS.items()})
        paths["no_attention_packed_qkv"] = pack_qkv(paths["no_attention_no_skip"], tmp / "packed_qkv.onnx")
        lines += timed_table(paths, "optimum_plain", cells, vocab, args)
        b, s = cells[-1]
        lines += ["", f"Per-operator kernel time, ms per run (batch {b}, seq {s}, ORT profiler, sessions as "
                  "above):", ""]
        lines += profile_lines(paths, ("optimum_plain", "no_skip_layernorm", "all_fusions"),
                               make_feeds(b, s, vocab, 0), args.threads)
        lines += factored_section(Path(args.checkpoint), tmp, cells, vocab, args)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
