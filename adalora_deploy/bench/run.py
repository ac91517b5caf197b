"""`adalora-deploy bench`: latency of merged against factored graphs, and their references.

All variants live in one process and are timed interleaved: for each grid cell, every variant
is warmed up, then each of N rounds runs every variant once, in an order rotated per round, so
that the machine's drift and noise fall on all of them alike. Reported per cell and variant:
p50, p90, p99 latency, throughput (sequences/s at the median latency) and p50 ratio to merged.

Targets (checked on every measured cell, printed as pass/fail):
- merged_vs_base: |p50(merged) / p50(onnx_base) - 1| <= 3%.
- factored_flop_overhead: (p50(factored_pruned) - p50(merged)) / p50(merged) <= 1.5 x FLOP share,
  the share being the branch's FLOPs over the merged graph's (adalora_deploy/bench/flops.py).
- pruned_faster_than_unpruned: p50(factored_pruned) < p50(factored_unpruned).
- merged_vs_optimum_plain: p50(merged) <= 0.90 x p50(optimum_plain) at batch 1 and 32, seq 128.
- merged_int8_vs_optimum_plain: p50(merged_int8) <= 0.55 x p50(optimum_plain) at batch 1 and 32, seq 128.
- merged_int8_vs_optimum_int8: p50(merged_int8) <= 0.90 x p50(optimum_int8) at batch 1 and 32, seq 128.
"""

from __future__ import annotations

import gc
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from adalora_deploy.config import check_token_lengths
from adalora_deploy.errors import ConfigError
from adalora_deploy.flags import int_list
from adalora_deploy.ort import PROVIDERS, ExportDirError, disabled_optimizers, token_inputs
from adalora_deploy.runtime.session import SessionConfig
from adalora_deploy.threads import usable_cores

from .variants import VARIANTS, Variant

MERGED_TOLERANCE = 0.03
FLOP_SHARE_FACTOR = 1.5
OPTIMUM_SPEEDUP = 0.10
OPTIMUM_CELLS = ((1, 128), (32, 128))
INT8_VS_PLAIN = 0.55
INT8_VS_OPTIMUM_INT8 = 0.90
DTYPES = ("fp32", "fp16")


@dataclass
class BenchConfig:
    """What `bench` measures, one field per `adalora-deploy bench` flag (each field's help is its flag's).
    batch_sizes, seq_lens and threads are resolved when None."""

    batch_sizes: list[int] | None = field(default=None, metadata={
        "help": "grid rows (default: 1,8,32; with --adapters: 1,32)", "type": int_list})
    seq_lens: list[int] | None = field(default=None, metadata={
        "help": "grid columns, tokens per sequence, no padding (default: 32,128; with --adapters: 128)",
        "type": int_list})
    runs: int = field(default=30, metadata={"help": "timed runs per variant and cell (default: %(default)s)"})
    warmup: int = field(default=3, metadata={"help": "untimed runs per variant and cell, first (default: %(default)s)"})
    provider: str = field(default="auto", metadata={
        "help": "ONNX Runtime provider, PyTorch follows it; auto takes CUDA when it really starts (default: "
        "%(default)s)", "choices": PROVIDERS})
    threads: int | None = field(default=None, metadata={
        "help": "intra-op threads for ONNX Runtime and PyTorch alike (default: the cores this process may use, "
        "its CPU affinity and cgroup CPU quota; with --adapters: 1)"})
    dtype: str = field(default="fp32", metadata={"help": "graph precision; fp16 needs CUDA", "choices": DTYPES})
    # Python only: the command line always draws its token ids with seed 0.
    seed: int = field(default=0, metadata={"help": "seed of the random token ids", "flag": False})
    int8: bool = field(default=False, metadata={
        "help": "also time int8 exports (export --quantize int8, merged and factored) and Optimum's own int8 path "
        "(ORTQuantizer, AVX512-VNNI dynamic config); they run on the CPU: needs --provider cpu"})
    eval_data: str | None = field(default=None, metadata={
        "help": "labelled rows for the int8 export's evaluation (default: the checkpoint's held-out split)",
        "metavar": "FILE"})

    def __post_init__(self) -> None:
        self.batch_sizes = [1, 8, 32] if self.batch_sizes is None else self.batch_sizes
        self.seq_lens = [32, 128] if self.seq_lens is None else self.seq_lens
        self.threads = usable_cores() if self.threads is None else self.threads
        if not self.batch_sizes or not self.seq_lens or min(self.batch_sizes + self.seq_lens) < 1:
            raise ConfigError("batch sizes and sequence lengths must be non-empty lists of integers >= 1")
        if self.runs < 1 or self.warmup < 0 or self.threads < 1:
            raise ConfigError(f"runs ({self.runs}) and threads ({self.threads}) must be >= 1, warmup >= 0")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype {self.dtype!r} must be fp32 or fp16")
        if self.dtype == "fp16" and self.provider != "cuda":
            raise ConfigError("fp16 graphs are benchmarked on CUDA only: pass --provider cuda")
        if self.int8 and (self.provider != "cpu" or self.dtype != "fp32"):
            raise ConfigError("int8 graphs run on ONNX Runtime's CPU kernels: pass --provider cpu with --int8")

    def session_config(self) -> SessionConfig:
        # One thread pool per session, sized like PyTorch's, so that neither side gets more cores.
        return SessionConfig(provider=self.provider, intra_op_threads=self.threads, inter_op_threads=1, spinning=False)


def make_feeds(batch: int, seq: int, vocab_size: int, seed: int) -> dict[str, np.ndarray]:
    """Random token ids from [min(1000, vocab_size - 1), vocab_size) (past BERT's special and unused ids),
    full attention, segment 0: int64 (batch, seq) input_ids, attention_mask, token_type_ids."""
    return token_inputs(batch, seq, np.arange(min(1000, vocab_size - 1), vocab_size), seed=seed)


def time_cell(variants: list[Variant], feeds: dict, config: BenchConfig, progress=None) -> dict[str, list[float]]:
    """Seconds per run for each variant: warm-up first, then rounds in rotating order."""
    for v in variants:
        for _ in range(config.warmup):
            v.forward(feeds)
        if progress is not None:
            progress.update(config.warmup)
    times = {v.name: [] for v in variants}
    gc.collect()
    gc.disable()  # a collection inside a timed call would be charged to one variant
    try:
        for i in range(config.runs):
            k = i % len(variants)
            for v in variants[k:] + variants[:k]:
                start = time.perf_counter()
                v.forward(feeds)
                times[v.name].append(time.perf_counter() - start)
            if progress is not None:
                progress.update(len(variants))
    finally:
        gc.enable()
    return times


def summarize(seconds: list[float], batch: int) -> dict:
    """p50/p90/p99/mean/min in ms and throughput in sequences/s at the median."""
    ms = np.asarray(seconds) * 1000.0
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {
        "p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99), "mean_ms": float(ms.mean()),
        "min_ms": float(ms.min()), "throughput_seq_per_s": float(batch / (p50 / 1000.0)), "runs": len(ms),
    }


def measure_grid(variants: list[Variant], config: BenchConfig, vocab_size: int) -> list[dict]:
    """One dict per (batch size, sequence length) cell with every variant's summary."""
    from tqdm import tqdm

    grid = [(b, s) for b in config.batch_sizes for s in config.seq_lens]
    total = len(grid) * len(variants) * (config.warmup + config.runs)
    cells = []
    with tqdm(total=total, desc="bench", unit="run", leave=False) as bar:
        for i, (b, s) in enumerate(grid):
            bar.set_postfix_str(f"batch {b} seq {s}")
            times = time_cell(variants, make_feeds(b, s, vocab_size, config.seed + i), config, bar)
            results = {name: summarize(t, b) for name, t in times.items()}
            add_ratios(results)
            cells.append({"batch_size": b, "seq_len": s, "results": results})
    return cells


def add_ratios(results: dict) -> None:
    """p50 of each variant over p50 of merged (None without a merged variant)."""
    merged = results.get("merged", {}).get("p50_ms")
    for r in results.values():
        r["ratio_to_merged"] = r["p50_ms"] / merged if merged else None


def _p50(cell: dict, name: str) -> float | None:
    return cell["results"].get(name, {}).get("p50_ms")


def _target(name: str, description: str, checks: list[dict]) -> dict:
    passed = all(c["passed"] for c in checks) if checks else None  # None: variants not measured
    return {"name": name, "description": description, "passed": passed, "cells": checks}


def _check(cell: dict, value: float, limit: float, passed: bool) -> dict:
    return {"batch_size": cell["batch_size"], "seq_len": cell["seq_len"], "value": value, "limit": limit,
            "passed": bool(passed)}


def _ratio_checks(cells: list[dict], name: str, reference: str, limit: float) -> list[dict]:
    """p50(name) / p50(reference) <= limit on the Optimum cells where both were measured."""
    checks = []
    for cell in cells:
        a, b = _p50(cell, name), _p50(cell, reference)
        if a and b and (cell["batch_size"], cell["seq_len"]) in OPTIMUM_CELLS:
            checks.append(_check(cell, a / b, limit, a / b <= limit))
    return checks


def check_targets(cells: list[dict], flops: dict[int, dict] | None) -> list[dict]:
    """Evaluate the targets on every cell where their variants were measured."""
    merged_base, overhead, pruned, plain = [], [], [], []
    for cell in cells:
        m, base = _p50(cell, "merged"), _p50(cell, "onnx_base")
        fp, fu, op = _p50(cell, "factored_pruned"), _p50(cell, "factored_unpruned"), _p50(cell, "optimum_plain")
        if m and base:
            dev = m / base - 1.0
            merged_base.append(_check(cell, dev, MERGED_TOLERANCE, abs(dev) <= MERGED_TOLERANCE))
        if m and fp and flops:
            limit = FLOP_SHARE_FACTOR * flops[cell["seq_len"]]["share"]
            overhead.append(_check(cell, fp / m - 1.0, limit, fp / m - 1.0 <= limit))
        if fp and fu:
            pruned.append(_check(cell, fp / fu, 1.0, fp < fu))
        if m and op and (cell["batch_size"], cell["seq_len"]) in OPTIMUM_CELLS:
            plain.append(_check(cell, m / op, 1.0 - OPTIMUM_SPEEDUP, m / op <= 1.0 - OPTIMUM_SPEEDUP))
    return [
        _target("merged_vs_base", "merged p50 within 3% of the ONNX base model's p50 (value: p50 ratio - 1)",
                merged_base),
        _target("factored_flop_overhead", "(factored_pruned - merged) / merged p50 <= 1.5 x FLOP share "
                "(value: overhead; limit: 1.5 x share)", overhead),
        _target("pruned_faster_than_unpruned", "factored_pruned p50 < factored_unpruned p50 (value: ratio)",
                pruned),
        _target("merged_vs_optimum_plain", "merged p50 <= 0.90 x Optimum plain export p50 at batch 1 and 32, "
                "seq 128 (value: ratio)", plain),
        _target("merged_int8_vs_optimum_plain", f"merged_int8 p50 <= {INT8_VS_PLAIN} x Optimum plain export p50 at "
                "batch 1 and 32, seq 128 (value: ratio)",
                _ratio_checks(cells, "merged_int8", "optimum_plain", INT8_VS_PLAIN)),
        _target("merged_int8_vs_optimum_int8", f"merged_int8 p50 <= {INT8_VS_OPTIMUM_INT8} x Optimum's own int8 "
                "export p50 at batch 1 and 32, seq 128 (value: ratio)",
                _ratio_checks(cells, "merged_int8", "optimum_int8", INT8_VS_OPTIMUM_INT8)),
    ]


def header(config: BenchConfig, variants: list[Variant], source: Path, command: str | None) -> dict:
    """Device, providers actually used, thread counts and versions."""
    import platform

    import onnxruntime

    from adalora_deploy import __version__

    torch = sys.modules.get("torch")  # loaded only when the PyTorch variant runs; the base install has none
    ort_providers = sorted({v.provider for v in variants if v.name != "pytorch"})
    return {
        "source": str(source), "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "device": device_name(any(p.startswith("CUDA") for p in ort_providers)),
        "provider": ", ".join(ort_providers), "providers": {v.name: v.provider for v in variants},
        "threads": {"ort_intra_op": config.threads, "ort_inter_op": 1, "ort_spinning": False,
                    "torch": torch.get_num_threads() if torch else None, "cpu_count": os.cpu_count()},
        # every ONNX variant, Optimum's plain export included, gets the same session options
        "ort_session": {"graph_optimization": "all", "disabled_optimizers": disabled_optimizers(ort_providers)},
        "dtype": config.dtype, "runs": config.runs, "warmup": config.warmup,
        "batch_sizes": config.batch_sizes, "seq_lens": config.seq_lens,
        "versions": {
            "adalora_deploy": __version__, "python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
            "torch": _dist_version("torch"), "transformers": _dist_version("transformers"),
            "optimum": _dist_version("optimum"), "optimum-onnx": _dist_version("optimum-onnx"),
            "onnx": _dist_version("onnx"), "numpy": np.__version__,
        },
    }


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def device_name(cuda: bool) -> str:
    """The GPU's name on CUDA, else the CPU model from /proc/cpuinfo (or platform)."""
    import platform

    if cuda:
        from adalora_deploy.extras import missing

        if missing(("torch",)):
            return "CUDA GPU"
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CUDA GPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} logical CPUs)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_variants(dirs: dict, checkpoint: Path | None, config: BenchConfig) -> tuple[list[Variant], object]:
    """Open every ONNX variant, plus PyTorch when the checkpoint is known; returns (variants, model)."""
    from .variants import onnx_variant, pytorch_variant

    session_config = config.session_config()
    variants = [onnx_variant(name, Path(d), session_config) for name, d in dirs.items()]
    model = None
    if checkpoint is not None:
        import torch

        from adalora_deploy.model import AdaLoraModel

        torch.set_num_threads(config.threads)
        model = AdaLoraModel.from_pretrained(checkpoint)
        on_cuda = any(v.provider.startswith("CUDA") for v in variants) and torch.cuda.is_available()
        variants.append(pytorch_variant(model, checkpoint, "cuda" if on_cuda else "cpu", config.dtype == "fp16"))
    variants.sort(key=lambda v: VARIANTS.index(v.name))
    return variants, model


def locate(source: Path, workdir: Path, config: BenchConfig, export_fn=None) -> tuple[dict, Path | None]:
    """{variant: model dir} and the checkpoint (or None), exporting first when given a checkpoint."""
    from .variants import dirs_in_export, export_all, is_checkpoint, source_checkpoint

    if is_checkpoint(source):
        return export_all(source, workdir, config.dtype, export_fn, config.int8, config.eval_data), source
    from adalora_deploy.extras import EXTRAS, missing

    dirs = dirs_in_export(source)
    checkpoint = source_checkpoint(dirs)
    if checkpoint is not None and missing(EXTRAS["train"]):
        print(f"bench: the PyTorch variant ({checkpoint}) is left out: it needs pip install 'adalora-deploy[train]'",
              file=sys.stderr)
        checkpoint = None
    return dirs, checkpoint


def check_checkpoint(source: Path) -> None:
    """A checkpoint's config gets the validation that export and inspect apply (types and values,
    one `error:` line), before any export or timing."""
    from .variants import is_checkpoint

    if is_checkpoint(source):
        from adalora_deploy.model import read_checkpoint_config

        read_checkpoint_config(source)


def refuse_generation(source: Path) -> None:
    """bench times single forward passes; a causal LM is measured by tokens/s in
    benchmarks/generate_bench.py instead. Refused before any work."""
    from adalora_deploy.constants import CAUSAL_LM, CHECKPOINT_CONFIG_FILE, MANIFEST_FILE, MODES
    from adalora_deploy.io import read_json

    for meta in (CHECKPOINT_CONFIG_FILE, MANIFEST_FILE, *(f"{mode}/{MANIFEST_FILE}" for mode in MODES)):
        path = source / meta
        if path.is_file() and read_json(path, "config").get("task") == CAUSAL_LM:
            raise ConfigError(
                f"{source} is a causal LM: bench times single forward passes; measure generation with "
                "benchmarks/generate_bench.py (tokens/s, KV cache vs recompute)"
            )


def run_bench(
    source: str | os.PathLike, config: BenchConfig | None = None, json_path: str | None = None,
    markdown_path: str | None = None, plot_path: str | None = None, command: str | None = None,
    export_fn=None, overwrite: bool = False, extra_dirs: dict | None = None,
) -> dict:
    """Benchmark a checkpoint (exports everything into a temporary directory) or an export directory.

    Args:
        source: an AdaLoRA checkpoint, an export root, or one mode's directory.
        config: grid, runs, provider and threads.
        json_path, markdown_path, plot_path: where to write the results (skipped when None).
        command: the command line, recorded in the header.
        export_fn: the exporter (adalora_deploy.exporters.export by default).
        overwrite: replace existing output files; without it they are refused before any work.
        extra_dirs: more exported model directories to time beside those of `source`, by variant
            name (e.g. {"merged_int8": ...} for the demo's int8 export).

    Returns:
        The results: header, variants, flops, cells, targets.
    """
    from adalora_deploy.runtime.session import choose_providers

    from .flops import count_flops
    from .variants import model_config

    config = config or BenchConfig()
    source = Path(source)
    check_output_files([json_path, markdown_path, plot_path], overwrite)
    check_checkpoint(source)
    refuse_generation(source)
    choose_providers(config.session_config())  # --provider cuda without CUDA: fail before exporting
    with tempfile.TemporaryDirectory(prefix="adalora-bench-") as tmp:
        dirs, checkpoint = locate(source, Path(tmp), config, export_fn)
        dirs.update(extra_dirs or {})
        variants, model = load_variants(dirs, checkpoint, config)
        vocab = model_config(dirs).get("vocab_size") or (model.model.config.vocab_size if model else None)
        if not vocab:
            raise ExportDirError(f"{source}: config.json has no vocab_size to draw token ids from; re-export it")
        check_token_lengths({"--seq-lens": max(config.seq_lens)}, model_config(dirs), str(source))  # before timing
        cells = measure_grid(variants, config, int(vocab))
        int8_figures = int8_evaluation(dirs)  # read before the temporary exports go
    flops = {s: count_flops(model, s).to_dict() for s in config.seq_lens} if model is not None else None
    result = {
        "header": header(config, variants, source, command),
        "variants": {v.name: {"description": v.description, "provider": v.provider} for v in variants},
        "flops": {str(s): f for s, f in flops.items()} if flops else None,
        "cells": cells,
        "targets": check_targets(cells, flops),
        "int8_evaluation": int8_figures,
        "config": asdict(config),
    }
    write_outputs(result, json_path, markdown_path, plot_path)
    return result


def int8_evaluation(dirs: dict) -> dict:
    """The accuracy figures our int8 exports recorded at export time, by variant."""
    from adalora_deploy.runtime.session import read_manifest

    figures = {}
    for name, model_dir in dirs.items():
        quantization = (read_manifest(model_dir) or {}).get("quantization")
        if quantization:
            figures[name] = quantization["evaluation"] | {"size_ratio": quantization["size_ratio"]}
    return figures


def check_output_files(paths: list[str | None], overwrite: bool) -> None:
    """Refuse output files that exist (unless `overwrite`), before minutes of timing are spent."""
    from adalora_deploy.io import IMAGE_SUFFIXES, check_output_file

    for path, suffixes in zip(paths, ((), (), IMAGE_SUFFIXES), strict=True):
        if path:
            check_output_file(path, overwrite, suffixes)


def write_script_outputs(result: dict, markdown: str, json_path, markdown_path) -> None:
    """`result` as JSON and its `markdown`, each written atomically where a path was given (bench and the
    benchmarks/ scripts)."""
    import json

    from adalora_deploy.io import write_text_atomic

    if json_path:
        write_text_atomic(json_path, json.dumps(result, indent=2) + "\n")
    if markdown_path:
        write_text_atomic(markdown_path, markdown)


def write_outputs(result: dict, json_path: str | None, markdown_path: str | None, plot_path: str | None) -> None:
    """Write whichever of the JSON, markdown and PNG outputs were asked for, each atomically."""
    from .markdown import render_markdown

    write_script_outputs(result, render_markdown(result) if markdown_path else "", json_path, markdown_path)
    if plot_path:
        from .plots import plot_bench

        plot_bench(result, plot_path)
