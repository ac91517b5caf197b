"""`adalora-deploy demo`: the whole product on real material in one command.

The packaged MiniLM is fine-tuned with AdaLoRA on the builtin Rotten Tomatoes set (scored on its
fixed held-out 1,000), exported to pruned merged and factored ONNX graphs (validated against
PyTorch), scored again through ONNX Runtime, benchmarked against PyTorch, and summarised. Every
figure of the summary is read back from the artifacts the stages wrote:

    OUT/checkpoint/         the AdaLoRA checkpoint (train)
    OUT/onnx/merged/        pruned adapter folded into W0 (export --prune-ranks)
    OUT/onnx/factored/      pruned low-rank branch beside W0
    OUT/onnx-int8/merged/   the merged graph in int8 for CPU serving (export --quantize int8), judged
                            on the held-out split (fp32 vs int8 accuracy and agreement)
    OUT/bench.json, .md     p50/p90/p99 latency of merged, merged int8, factored and PyTorch (bench)
    OUT/latency.png
    OUT/ranks.png           the paper's heatmap of final ranks
    OUT/demo_summary.json   the summary below, as JSON
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import MISSING, asdict, dataclass, field, make_dataclass
from pathlib import Path

from .bench.run import BenchConfig
from .constants import CHECKPOINT_CONFIG_FILE, MANIFEST_FILE
from .constants import DEMO_SUMMARY_FILE as SUMMARY_FILE
from .errors import ConfigError
from .flags import borrow
from .io import INCOMPLETE_MARKER, check_output_dir, read_json, signals_as_exit, write_json
from .runtime.session import PROVIDERS
from .train_config import TrainConfig

STAGES = 6
# --fast: a few steps and a one-cell benchmark, for tests and smoke runs (the figures mean little).
FAST = {"steps": 8, "bench_batch_sizes": [1], "bench_seq_lens": [16], "bench_runs": 3}
FULL = {"steps": TrainConfig.steps, "bench_batch_sizes": [1, 32], "bench_seq_lens": [64], "bench_runs": 20}
VARIANT_KEYS = {"merged": "merged", "merged_int8": "merged_int8", "factored": "factored_pruned", "pytorch": "pytorch"}

# DemoConfig's fields taken from TrainConfig (same names) and BenchConfig (demo name -> bench name).
TRAIN_FIELDS = ("model", "data", "steps", "batch_size", "lr", "max_length", "seed", "init_r", "target_r", "alpha",
                "threads")
BENCH_FIELDS = {"bench_batch_sizes": "batch_sizes", "bench_seq_lens": "seq_lens", "bench_runs": "runs",
                "provider": "provider"}
# Where the demo's defaults differ from train's and bench's. None: FAST or FULL above, by --fast.
# lr and alpha (s = alpha / init_r = 8): lam starts at 0, and with a smaller lr and s (3e-3, s = 2)
# AdaLoRA had not left the majority class after 150 steps on this data (benchmarks/quality/quality.md).
DEMO_DEFAULTS = {"steps": None, "lr": 1e-2, "alpha": 96.0, "bench_runs": None}


def _fast_or_full(name: str, what: str) -> str:
    def show(value):
        return ",".join(map(str, value)) if isinstance(value, list) else value

    return f"{what} (default: {show(FULL[name])}; {show(FAST[name])} with --fast)"


DEMO_HELP = {
    "steps": _fast_or_full("steps", "optimizer steps"),
    "bench_batch_sizes": _fast_or_full("bench_batch_sizes", "bench grid rows"),
    "bench_seq_lens": _fast_or_full("bench_seq_lens", "bench grid columns, tokens"),
    "bench_runs": _fast_or_full("bench_runs", "timed runs per variant and cell"),
    "provider": "ONNX Runtime provider for scoring and bench (default: %(default)s)",
    "threads": "intra-op threads for training (PyTorch) and the bench (ONNX Runtime and PyTorch) (default: the "
               "cores this process may use, its CPU affinity and cgroup CPU quota); README, Threads",
}


def _borrowed(config_cls, names: dict[str, str]) -> list[tuple]:
    return [borrow(config_cls, source, demo_name, DEMO_DEFAULTS.get(demo_name, MISSING), DEMO_HELP.get(demo_name))
            for demo_name, source in names.items()]


def _check_demo_config(self) -> None:
    defaults = FAST if self.fast else FULL
    for name, value in defaults.items():
        if getattr(self, name) is None:
            setattr(self, name, value.copy() if isinstance(value, list) else value)
    if self.bench_runs < 1:
        raise ConfigError(f"bench_runs ({self.bench_runs}) must be >= 1")
    for name in ("lr", "alpha"):
        if not math.isfinite(getattr(self, name)):
            raise ConfigError(f"{name} ({getattr(self, name)}) must be a finite number")
    if self.provider not in PROVIDERS:
        raise ConfigError(f"provider {self.provider!r} must be one of {', '.join(PROVIDERS)}")
    if self.threads is not None and self.threads < 1:
        raise ConfigError(f"threads ({self.threads}) must be >= 1, or left out for the usable cores")


DemoConfig = make_dataclass("DemoConfig", [
    ("out", str, field(default="demo-output", metadata={
        "help": "output directory, must be new or empty (default: %(default)s)"})),
    ("overwrite", bool, field(default=False, metadata={"help": "replace a non-empty --out once the demo succeeds"})),
    *_borrowed(TrainConfig, {name: name for name in TRAIN_FIELDS}),
    *_borrowed(BenchConfig, BENCH_FIELDS),
    ("fast", bool, field(default=False, metadata={
        "help": "a few steps and a one-cell bench: a smoke run, not a result; explicit values still win"})),
    ("progress", bool, field(default=True, metadata={"help": "show stage headers and progress bars", "flag": False})),
], namespace={"__post_init__": _check_demo_config, "__module__": __name__, "__doc__": (
    "The settings of `demo()`, one field per `adalora-deploy demo` flag (progress aside): TrainConfig's fields "
    "TRAIN_FIELDS and BenchConfig's BENCH_FIELDS, with the demo's own defaults DEMO_DEFAULTS, plus out, "
    "overwrite, fast and progress.")})


@dataclass
class DemoPaths:
    """Where each stage writes, under one root."""

    root: Path

    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoint"

    @property
    def onnx(self) -> Path:
        return self.root / "onnx"

    @property
    def onnx_int8(self) -> Path:
        return self.root / "onnx-int8"

    def file(self, name: str) -> Path:
        return self.root / name


# -- output directory ----------------------------------------------------------------------------


@contextlib.contextmanager
def staged_output_dir(
    out: str | os.PathLike, overwrite: bool = False, sources: tuple = (),
) -> Iterator[Path]:
    """Yield `out` itself (the stages record absolute paths to each other's artifacts, so they must
    be written where they will stay); on any error remove it and put back what was there before.

    A non-empty `out` is refused unless `overwrite`; then it is moved aside to `.OUT.old-PID` and
    deleted only once the demo has succeeded. While the demo runs, `out` holds INCOMPLETE_MARKER:
    after a SIGKILL the next run removes the partial output and restores the old one
    (io.recover_output_dir).
    """
    out = check_output_dir(out, overwrite, sources).absolute()
    old, existed = None, out.is_dir()
    if existed and any(out.iterdir()):
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    out.mkdir(parents=True, exist_ok=True)
    (out / INCOMPLETE_MARKER).write_text(f"{os.getpid()}\n")
    try:
        yield out
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        if old is not None:
            old.rename(out)
        elif existed:
            out.mkdir()  # the user's empty directory stays as it was
        raise
    (out / INCOMPLETE_MARKER).unlink()
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class Stages:
    """Numbered stage headers with the seconds each stage took."""

    def __init__(self, show: bool):
        self.show = show
        self.seconds: dict[str, float] = {}
        self.count = 0

    @contextlib.contextmanager
    def stage(self, key: str, title: str) -> Iterator[None]:
        self.count += 1
        if self.show:
            print(f"\n[{self.count}/{STAGES}] {title}", flush=True)
        start = time.perf_counter()
        yield
        self.seconds[key] = round(time.perf_counter() - start, 2)
        if self.show:
            print(f"[{self.count}/{STAGES}] done in {self.seconds[key]:.1f} s", flush=True)


@contextlib.contextmanager
def export_logging(show: bool) -> Iterator[None]:
    """Print the exporter's step messages (its `adalora_deploy.export` logger) while exporting."""
    import logging

    logger = logging.getLogger("adalora_deploy.export")
    if not show or logger.handlers:
        yield
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("  [export] %(message)s"))
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


# -- the stages ----------------------------------------------------------------------------------


def train_stage(cfg: DemoConfig, paths: DemoPaths):
    """Train AdaLoRA and write the checkpoint; returns the TrainResult."""
    from .training import train

    settings = {name: getattr(cfg, name) for name in TRAIN_FIELDS}
    # save_stopped=False: a diverged run fails the demo, whose output directory is then removed.
    return train(progress=cfg.progress, save_stopped=False, out=str(paths.checkpoint), **settings)


def export_stage(cfg: DemoConfig, paths: DemoPaths) -> Path:
    """Export pruned merged and factored graphs, validated against PyTorch."""
    from .exporters import export

    with export_logging(cfg.progress):
        return export(paths.checkpoint, paths.onnx, mode="both", prune_ranks=True, validate=True)


def int8_stage(cfg: DemoConfig, paths: DemoPaths) -> dict:
    """The merged graph in int8 (export --quantize int8, judged on the held-out split by the export).

    Returns:
        The manifest's evaluation figures, or {"refused": message} when the export's accuracy gate
        (or a missing held-out split) refused it: the demo reports that instead of failing.
    """
    from .exporters import ExportError, export

    with export_logging(cfg.progress):
        try:
            export(paths.checkpoint, paths.onnx_int8, mode="merged", prune_ranks=True, quantize="int8")
        except ExportError as err:
            if cfg.progress:
                print(f"  int8 export refused: {err}")
            return {"refused": str(err)}
    return read_json(paths.onnx_int8 / "merged" / MANIFEST_FILE, "export manifest")["quantization"]


def score_stage(cfg: DemoConfig, paths: DemoPaths, heldout) -> dict[str, float]:
    """Held-out accuracy of each exported graph, through the runtime's Predictor (text in, label out)."""
    from .runtime.predictor import Predictor

    inputs = list(zip(heldout.texts, heldout.text_pairs, strict=True)) if heldout.text_pairs else heldout.texts
    scores = {}
    for mode in ("merged", "factored"):
        predictor = Predictor.from_pretrained(paths.onnx, provider=cfg.provider, mode=mode, max_length=cfg.max_length)
        label_ids = predictor.predict(inputs, batch_size=128).label_ids  # (N,)
        scores[mode] = sum(int(p) == y for p, y in zip(label_ids, heldout.labels, strict=True)) / len(heldout)
        if cfg.progress:
            print(f"  ONNX {mode} ({predictor.provider}): {scores[mode]:.4f} on {len(heldout)} held-out examples")
    return scores


def bench_stage(cfg: DemoConfig, paths: DemoPaths) -> dict:
    """Latency of merged, factored and PyTorch, interleaved in this process (runtime bench)."""
    from .bench import run_bench

    config = BenchConfig(warmup=2, threads=cfg.threads,
                         **{name: getattr(cfg, demo_name) for demo_name, name in BENCH_FIELDS.items()})
    int8 = paths.onnx_int8 / "merged"
    return run_bench(
        paths.onnx, config, json_path=str(paths.file("bench.json")), markdown_path=str(paths.file("bench.md")),
        plot_path=str(paths.file("latency.png")), command="adalora-deploy demo",
        extra_dirs={"merged_int8": int8} if int8.is_dir() else None,
    )


def heatmap_stage(paths: DemoPaths) -> Path:
    from .rank_report import plot_heatmap, rank_report

    return plot_heatmap(rank_report(paths.checkpoint), paths.file("ranks.png"))


# -- the summary, read back from the artifacts -----------------------------------------------------


def majority_share(labels: list[int]) -> float:
    """What always answering the most frequent class scores."""
    return Counter(labels).most_common(1)[0][1] / len(labels)


def latency_rows(bench: dict) -> list[dict]:
    """p50 ms of merged, factored and PyTorch for every bench cell."""
    rows = []
    for cell in bench["cells"]:
        row = {"batch_size": cell["batch_size"], "seq_len": cell["seq_len"]}
        for key, variant in VARIANT_KEYS.items():
            row[key] = cell["results"].get(variant, {}).get("p50_ms")
        rows.append(row)
    return rows


def build_summary(
    cfg: DemoConfig, paths: DemoPaths, onnx_accuracy: dict, majority: float, bench: dict, int8: dict,
) -> dict:
    """The demo's figures, each taken from the artifact that holds it.

    Accuracy: the checkpoint's recorded eval accuracy (PyTorch) and the exported graphs scored by
    ONNX Runtime; budget: kept triplets counted from the checkpoint's masks; adapter parameters:
    the pruned export's manifest; latency: the bench results; int8: the int8 export's manifest.
    """
    from .rank_report import rank_report

    meta = read_json(paths.checkpoint / CHECKPOINT_CONFIG_FILE, "checkpoint config")
    ranks = rank_report(paths.checkpoint)
    manifest = read_json(paths.onnx / "merged" / MANIFEST_FILE, "export manifest")
    return {
        "model": meta["base_model"]["name_or_path"], "data": cfg.data, "train_steps": meta["steps_done"],
        "heldout_examples": meta["eval_examples"], "majority_class_accuracy": majority,
        "accuracy": {"pytorch": meta["eval_accuracy"], **{f"onnx_{k}": v for k, v in onnx_accuracy.items()}},
        "budget": ranks.budget, "budget_initial": ranks.init_r * len(ranks.ranks),
        "budget_target": ranks.target_r * len(ranks.ranks), "modules": len(ranks.ranks),
        "init_r": ranks.init_r, "target_r": ranks.target_r,
        "adapter_params_before": manifest["adapter_params_before"],
        "adapter_params_after": manifest["adapter_params_after"],
        "latency_p50_ms": latency_rows(bench),
        "bench_provider": bench["variants"].get("merged", {}).get("provider"),
        "bench_threads": bench["config"]["threads"],
        "bench_providers": {k: bench["variants"].get(v, {}).get("provider") for k, v in VARIANT_KEYS.items()},
        # int8 figures are the export's own evaluation (fp32 and int8 graphs on the same batches of 32):
        # dynamic int8 depends on what shares a batch, so a separate scoring would give a different figure
        "int8": int8 if "refused" in int8 else {
            **{k: int8["evaluation"][k] for k in ("examples", "fp32_accuracy", "int8_accuracy", "accuracy_drop_points",
                                                  "agreement")},
            "size_ratio": int8["size_ratio"],
        },
    }


def format_demo_summary(summary: dict) -> str:
    """The one summary the demo prints."""
    acc = summary["accuracy"]
    before, after = summary["adapter_params_before"], summary["adapter_params_after"]
    lines = [
        "", "=" * 78, f"AdaLoRA demo: {Path(str(summary['model'])).name} on {summary['data']}, "
        f"{summary['train_steps']} steps", "=" * 78,
        f"held-out accuracy ({summary['heldout_examples']} examples): PyTorch {acc['pytorch']:.4f} | "
        f"ONNX merged {acc['onnx_merged']:.4f} | ONNX factored {acc['onnx_factored']:.4f} "
        f"(majority class {summary['majority_class_accuracy']:.4f})",
        _int8_line(summary),
        f"rank budget: {summary['budget']} triplets kept of {summary['budget_initial']} "
        f"(init_r {summary['init_r']} -> target_r {summary['target_r']} x {summary['modules']} modules)",
        f"adapter params: {before:,} before pruning -> {after:,} after ({100 * after / before:.1f}%)",
        f"p50 latency, ms ({summary['bench_provider']}, {summary['bench_threads']} threads):",
    ]
    for row in summary["latency_p50_ms"]:
        cells = " | ".join(f"{k} {_ms(row[k])}" for k in VARIANT_KEYS)
        lines.append(f"  batch {row['batch_size']:>3}, seq {row['seq_len']}: {cells}")
    return "\n".join(lines)


def _int8_line(summary: dict) -> str:
    int8 = summary["int8"]
    if "refused" in int8:
        return f"int8 merged: not exported ({int8['refused']})"
    return (f"int8 merged (CPU, the export's evaluation): accuracy {int8['int8_accuracy']:.4f} vs fp32 "
            f"{int8['fp32_accuracy']:.4f} (drop {int8['accuracy_drop_points']:+.2f} points), agreement with fp32 "
            f"{int8['agreement']:.4f}, model.onnx {int8['size_ratio']:.2f} x fp32")


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


# -- the command ---------------------------------------------------------------------------------


def demo(**kwargs) -> dict:
    """Train, export, score, bench and summarise, all under one output directory.

    Args:
        kwargs: the fields of DemoConfig, i.e. the flags of `adalora-deploy demo` one to one, and
            progress (stage headers and progress bars, default True).
    Returns:
        The summary dict, also written to OUT/demo_summary.json, with "out" and "seconds" added.
    """
    from .data import load_splits
    from .training import check_base_lengths

    cfg = DemoConfig(**kwargs)
    # The bench stage would crash 40 s in otherwise.
    check_base_lengths(cfg.model, {"--max-length": cfg.max_length, "--bench-seq-lens": max(cfg.bench_seq_lens)})
    start = time.perf_counter()
    stages = Stages(cfg.progress)
    with signals_as_exit(), staged_output_dir(cfg.out, cfg.overwrite, (cfg.model, cfg.data)) as root:
        paths = DemoPaths(root)
        heldout = load_splits(cfg.data)[1]
        with stages.stage("train", f"training AdaLoRA ({cfg.steps} steps, init_r {cfg.init_r} -> target_r {cfg.target_r})"):
            train_stage(cfg, paths)
        with stages.stage("export", "exporting pruned merged and factored ONNX graphs, validated against PyTorch"):
            export_stage(cfg, paths)
        with stages.stage("int8", "exporting the merged graph in int8 for CPU serving, judged on the held-out split"):
            int8 = int8_stage(cfg, paths)
        with stages.stage("score", f"scoring the ONNX graphs on the {len(heldout)} held-out examples"):
            onnx_accuracy = score_stage(cfg, paths, heldout)
        with stages.stage("bench", "timing merged, merged int8, factored and PyTorch (interleaved)"):
            bench = bench_stage(cfg, paths)
        with stages.stage("heatmap", "drawing the rank heatmap"):
            heatmap_stage(paths)
        summary = build_summary(cfg, paths, onnx_accuracy, majority_share(heldout.labels), bench, int8)
        summary["seconds"] = {**stages.seconds, "total": round(time.perf_counter() - start, 2)}
        summary["out"] = str(root)
        summary["config"] = {k: v for k, v in asdict(cfg).items() if k != "progress"}
        write_json(paths.file(SUMMARY_FILE), summary)
    return summary
