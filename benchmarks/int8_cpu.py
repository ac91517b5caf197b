"""int8 on CPU, as a user elsewhere would load it: the investigation behind benchmarks/int8_cpu_notes.md.

From a checkpoint, in a temporary directory: our fp32 export (residual Adds as Sum), the same graph
with the residual Sums written back as Add (the export's form before this change), our int8 export
(`export --quantize int8`), Optimum's plain export and Optimum's int8 path on it (ORTQuantizer,
AVX512-VNNI dynamic config, per-channel). Then:

1. latency through Optimum's ORTModelForSequenceClassification with ONNX Runtime's default session
   options (only the thread count set, to 1), all variants interleaved (bench.run.time_cell);
2. ORT's per-operator profile (kernel time by op type, ms per run and share) of the int8 graphs;
3. accuracy on the checkpoint's held-out split: fp32, our int8, Optimum's int8, each against the
   labels and against fp32's predictions, at evaluation batch 32 (as the export measures) and 1.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/int8_cpu.py CHECKPOINT --runs 30 \
        --markdown benchmarks/int8_cpu_investigation.md
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

from adalora_deploy.bench.profile import op_times
from adalora_deploy.bench.run import BenchConfig, make_feeds, summarize, time_cell
from adalora_deploy.bench.variants import Variant, optimum_int8_export, optimum_plain_export
from adalora_deploy.constants import MANIFEST_FILE, MODEL_CONFIG_FILE, MODEL_FILE
from adalora_deploy.exporters import export
from adalora_deploy.exporters.quantize import EVAL_BATCH, accuracy_figures, eval_set, predict
from adalora_deploy.exporters.validate import OrtRunner
from adalora_deploy.model import read_checkpoint_config

CELLS = ((1, 128), (32, 128))
PROFILED = ("merged", "merged_int8", "optimum_int8", "factored_int8")


def with_residual_add(src: Path, out: Path) -> Path:
    """A copy of an export directory whose residual Sums are Adds again (the previous export form)."""
    import shutil

    shutil.copytree(src, out)
    model = onnx.load(str(out / MODEL_FILE))
    for node in model.graph.node:
        if node.op_type == "Sum":
            node.op_type = "Add"
    onnx.save(model, str(out / MODEL_FILE))
    return out


def build(checkpoint: Path, tmp: Path) -> dict[str, Path]:
    fp32 = export(checkpoint, tmp / "fp32", prune_ranks=True)
    int8 = export(checkpoint, tmp / "int8", prune_ranks=True, quantize="int8")
    opset = json.loads((fp32 / "merged" / MANIFEST_FILE).read_text())["opset"]
    plain = optimum_plain_export(checkpoint, tmp / "optimum-plain", opset=opset)
    return {
        "optimum_plain": plain,
        "merged": fp32 / "merged",
        "merged_add": with_residual_add(fp32 / "merged", tmp / "merged-add"),
        "merged_int8": int8 / "merged",
        "factored_int8": int8 / "factored",
        "optimum_int8": optimum_int8_export(plain, tmp / "optimum-int8"),
    }


def default_options(threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()  # ONNX Runtime's defaults, as ORTModel uses them
    options.intra_op_num_threads = threads
    return options


def ortmodel_variant(name: str, model_dir: Path, threads: int) -> Variant:
    import torch
    from optimum.onnxruntime import ORTModelForSequenceClassification

    model = ORTModelForSequenceClassification.from_pretrained(
        model_dir, session_options=default_options(threads), provider="CPUExecutionProvider")

    def forward(feeds):
        with torch.inference_mode():
            return model(**{k: torch.from_numpy(v) for k, v in feeds.items()})

    return Variant(name, forward, "CPUExecutionProvider (ORTModel, default session options)", str(model_dir))


def latency_section(paths: dict[str, Path], args) -> list[str]:
    import torch

    torch.set_num_threads(args.threads)
    variants = [ortmodel_variant(n, p, args.threads) for n, p in paths.items()]
    config = BenchConfig(batch_sizes=[b for b, _ in CELLS], seq_lens=[128], runs=args.runs, warmup=3,
                         threads=args.threads)
    lines = ["| batch | seq | variant | p50 ms | p90 ms | p50 / optimum_plain | p50 / optimum_int8 |",
             "|---:|---:|---|---:|---:|---:|---:|"]
    for i, (b, s) in enumerate(CELLS):
        times = time_cell(variants, make_feeds(b, s, args.vocab, i), config)
        p50 = {n: summarize(t, b) for n, t in times.items()}
        for n, r in p50.items():
            lines.append(f"| {b} | {s} | {n} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | "
                         f"{r['p50_ms'] / p50['optimum_plain']['p50_ms']:.3f} | "
                         f"{r['p50_ms'] / p50['optimum_int8']['p50_ms']:.3f} |")
    return lines


def profile_section(paths: dict[str, Path], args) -> list[str]:
    lines = []
    for b, s in CELLS:
        lines += ["", f"Kernel time by op type, ms per run and share (batch {b}, seq {s}, 10 runs):", ""]
        for name in PROFILED:
            total, ops = op_times(paths[name] / MODEL_FILE, make_feeds(b, s, args.vocab, 0), default_options(args.threads),
                                  disabled=[])
            shares = ", ".join(f"{op} {ms:.2f} ({100 * ms / total:.0f}%)" for op, ms in ops.items() if ms >= 0.01 * total)
            lines.append(f"- {name}: total {total:.1f}; {shares}")
    return lines


def accuracy_section(paths: dict[str, Path], checkpoint: Path) -> list[str]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    meta = read_checkpoint_config(checkpoint)
    base = eval_set(meta.get("train"), None, {int(k): v for k, v in meta["id2label"].items()}, 512)
    labels = np.asarray(base.dataset.labels)
    lines = ["| evaluation batch | graph | accuracy | drop vs fp32 (points) | agreement with fp32 |",
             "|---:|---|---:|---:|---:|"]
    for batch in (EVAL_BATCH, 1):  # the export evaluates at EVAL_BATCH; 1 shows what the batch changes
        for fp32, int8 in (("merged", "merged_int8"), ("optimum_plain", "optimum_int8")):
            preds = {n: predict(OrtRunner(paths[n] / MODEL_FILE), tokenizer, base, batch) for n in (fp32, int8)}
            f = accuracy_figures(preds[fp32], preds[int8], labels)
            lines.append(f"| {batch} | {fp32} | {f['fp32_accuracy']:.4f} | — | — |")
            lines.append(f"| {batch} | {int8} | {f['int8_accuracy']:.4f} | {f['accuracy_drop_points']:+.2f} | "
                         f"{f['agreement']:.4f} |")
    lines += ["", f"Rows: {len(labels)} ({base.dataset.source}), truncated to {base.max_length} tokens."]
    return lines


def sizes_section(paths: dict[str, Path]) -> list[str]:
    size = {n: (p / MODEL_FILE).stat().st_size for n, p in paths.items()}
    return [f"- {n}: {size[n] / 1e6:.1f} MB ({size[n] / size['merged']:.3f} x merged fp32)" for n in size]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--markdown", type=Path, required=True)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="adalora-int8-") as tmp:
        paths = build(args.checkpoint, Path(tmp))
        args.vocab = json.loads((paths["merged"] / MODEL_CONFIG_FILE).read_text())["vocab_size"]
        lines = ["# int8 on CPU: loaded as users load it, profiles, accuracy", "",
                 f"Command: `{' '.join(['benchmarks/int8_cpu.py', *sys.argv[1:]])}`", "",
                 "## Latency through ORTModelForSequenceClassification, ONNX Runtime's default session options", "",
                 f"1 intra-op thread, {args.runs} interleaved rounds after 3 warm-up runs per variant.", "",
                 *latency_section(paths, args), "", "## Kernel time by op type (ORT profiler)",
                 *profile_section(paths, args), "", "## Accuracy on the held-out split", "",
                 *accuracy_section(paths, args.checkpoint), "", "## model.onnx sizes", "", *sizes_section(paths), ""]
    args.markdown.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
