"""Which of ONNX Runtime's transformer fusions pay off on this CPU? An investigation behind
benchmarks/latency_cpu_notes.md, not part of the product.

From a checkpoint: Optimum's plain export of the merged model, then ORT's transformer optimizer
on it with some fusions switched off, all timed interleaved (runtime.bench.time_cell) against the
plain graph, plus ORT's per-operator profile of the plain and fully fused graphs.

    .venv/bin/python benchmarks/fusion_variants.py runs/bench-minilm-r12-r4 --cells 1x128,8x32 \
        --runs 25 --threads 1 --markdown benchmarks/fusion_variants_cpu.md
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
from pathlib import Path

from adalora_deploy.runtime.bench import BenchConfig, make_feeds, summarize, time_cell
from adalora_deploy.runtime.session import SessionConfig, open_session
from adalora_deploy.runtime.variants import Variant, optimum_plain_export

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
    model = optimize_model(str(plain / "model.onnx"), model_type="bert", num_heads=config["num_attention_heads"],
                           hidden_size=config["hidden_size"], optimization_options=options, opt_level=1, use_gpu=False)
    model.save_model_to_file(str(out))
    return out


def op_profile(path: Path, feeds: dict, threads: int, runs: int = 10) -> dict[str, float]:
    """ms per run spent in each operator type, from ORT's profiler."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.enable_profiling = threads, True
    so.profile_file_prefix = str(path.with_suffix(""))
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    for _ in range(runs):
        session.run(None, {k: v for k, v in feeds.items() if k in names})
    trace = session.end_profiling()
    per_op = collections.Counter()
    for event in json.loads(Path(trace).read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            per_op[event["args"]["op_name"]] += event["dur"] / 1000 / runs
    os.remove(trace)
    return dict(per_op.most_common(8))


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
        plain = optimum_plain_export(Path(args.checkpoint), Path(tmp) / "plain")
        config = json.loads((plain / "config.json").read_text())
        paths = {"optimum_plain": plain / "model.onnx"}
        paths.update({n: fused(plain, Path(tmp) / f"{n}.onnx", config, o) for n, o in FUSIONS.items()})
        session_config = SessionConfig(provider="cpu", intra_op_threads=args.threads, inter_op_threads=1,
                                       spinning=False)
        variants = [Variant(name, open_session(p, session_config).run, "cpu") for name, p in paths.items()]
        bench = BenchConfig(batch_sizes=[1], seq_lens=[1], runs=args.runs, warmup=2, threads=args.threads)
        lines += ["| batch | seq | " + " | ".join(paths) + " |", "|---:|---:|" + "---:|" * len(paths)]
        for b, s in cells:
            times = time_cell(variants, make_feeds(b, s, config["vocab_size"], 0), bench)
            p50 = {n: summarize(t, b)["p50_ms"] for n, t in times.items()}
            row = " | ".join(f"{p50[n]:.1f} ({p50[n] / p50['optimum_plain']:.3f})" for n in paths)
            lines.append(f"| {b} | {s} | {row} |")
            print(lines[-1], flush=True)
        b, s = cells[-1]
        lines += ["", f"Per-operator kernel time, ms per run (batch {b}, seq {s}, ORT profiler):", ""]
        for name in ("optimum_plain", "all_fusions"):
            profile = op_profile(paths[name], make_feeds(b, s, config["vocab_size"], 0), args.threads)
            lines.append(f"- {name}: total {sum(profile.values()):.1f}; "
                         + ", ".join(f"{op} {ms:.2f}" for op, ms in profile.items()))
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
