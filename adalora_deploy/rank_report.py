"""Rank reports of a checkpoint: ranks per layer and module type, as a table, JSON, or the
paper's heatmap of final ranks (Zhang et al. 2023, Fig. 1)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .architectures import module_labels
from .constants import ADAPTER_FILE
from .errors import CheckpointError
from .io import IMAGE_SUFFIXES, atomic_write, check_output_file, load_safetensors
from .model import module_matches, read_checkpoint_config

# Short column names of the target-module suffixes in the architecture table; any other suffix is
# shown as it is.
TYPE_LABELS = module_labels()
NO_LAYER = "-"


@dataclass
class RankReport:
    """Final ranks of a checkpoint, arranged as layers (rows) x module types (columns).

    Args:
        ranks: module path -> effective rank, in registration order.
        layers: row labels (layer indices as strings; NO_LAYER for modules outside any layer).
        types: column labels, in target-module order.
        cells: (layer, type) -> rank.
        init_r, target_r: from the checkpoint config.
        trainable_params, adapter_params_before, adapter_params_after: parameter counts.
        stopped_early: the config's record of a run that diverged and kept its last good state, else None.
    """

    ranks: dict[str, int]
    layers: list[str]
    types: list[str]
    cells: dict[tuple[str, str], int]
    init_r: int
    target_r: int
    trainable_params: int
    adapter_params_before: int
    adapter_params_after: int
    stopped_early: dict | None = None

    @property
    def budget(self) -> int:
        return sum(self.ranks.values())

    def to_json(self) -> dict:
        """{"modules", "budget", "init_r", "target_r", "trainable_params"}: the `inspect --json` output."""
        return {
            "modules": dict(self.ranks), "budget": self.budget, "init_r": self.init_r,
            "target_r": self.target_r, "trainable_params": self.trainable_params,
        }


def module_type(path: str, target_modules: list[str]) -> str:
    """The target-module suffix `path` was adapted for: the longest that matches, because
    'attention.output.dense' also ends in 'output.dense'. Returns its TYPE_LABELS name."""
    hits = [s for s in target_modules if module_matches(path, s)]
    if not hits:
        return path.rpartition(".")[2]
    suffix = max(hits, key=len)
    return TYPE_LABELS.get(suffix, suffix)


def layer_index(path: str) -> int | None:
    """The layer number of a module path: its first all-digit component (`encoder.layer.3.…` -> 3)."""
    numbers = [int(part) for part in path.split(".") if part.isdigit()]
    return numbers[0] if numbers else None


def arrange(ranks: dict[str, int], target_modules: list[str]) -> tuple[list[str], list[str], dict]:
    """(layers, types, cells) for `ranks`; rows by layer number, columns in target-module order."""
    cells, layer_ids, types = {}, set(), []
    for path, rank in ranks.items():
        index = layer_index(path)
        layer = NO_LAYER if index is None else str(index)
        kind = module_type(path, target_modules)
        if (layer, kind) in cells:
            raise CheckpointError(f"two adapted modules map to layer {layer}, type {kind}: {path}")
        cells[(layer, kind)] = rank
        layer_ids.add(layer)
        if kind not in types:
            types.append(kind)
    layers = sorted(layer_ids, key=lambda s: (s == NO_LAYER, int(s) if s != NO_LAYER else 0))
    return layers, types, cells


def checkpoint_ranks(checkpoint: str | os.PathLike) -> tuple[dict, dict[str, int]]:
    """(checkpoint config, module -> rank counted from the saved masks, in registration order)."""
    meta = read_checkpoint_config(checkpoint)
    state = load_safetensors(Path(checkpoint) / ADAPTER_FILE, "adapter weights")
    names = list(meta.get("ranks", {}))
    masks = {key[: -len(".mask")]: t for key, t in state.items() if key.endswith(".mask")}
    if set(names) != set(masks):
        raise CheckpointError(
            f"{checkpoint}: the adapter masks and the config's module list disagree; re-save the checkpoint"
        )
    return meta, {name: int(masks[name].sum()) for name in names}


def rank_report(checkpoint: str | os.PathLike) -> RankReport:
    """Read a checkpoint's final ranks (from its masks) and parameter counts.

    Args:
        checkpoint: a directory written by `adalora-deploy train`.
    Returns:
        A RankReport.
    """
    meta, ranks = checkpoint_ranks(checkpoint)
    layers, types, cells = arrange(ranks, meta["target_modules"])
    return RankReport(
        ranks, layers, types, cells, meta["adalora"]["init_r"], meta["adalora"]["target_r"],
        meta["trainable_params"], meta["adapter_params_before"], meta["adapter_params_after"],
        meta.get("stopped_early"),
    )


def format_table(report: RankReport) -> str:
    """The ranks as text: one row per layer, one column per module type, with totals."""
    header = ["layer", *report.types, "total"]
    rows = [header]
    for layer in report.layers:
        values = [report.cells.get((layer, t)) for t in report.types]
        rows.append([layer, *("" if v is None else str(v) for v in values), str(sum(v or 0 for v in values))])
    column_totals = [sum(report.cells.get((layer, t), 0) for layer in report.layers) for t in report.types]
    rows.append(["total", *map(str, column_totals), str(report.budget)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def format_rank_summary(report: RankReport) -> str:
    """Budget and parameter counts, under the table."""
    n = len(report.ranks)
    return (
        f"budget: {report.budget} triplets kept of {report.init_r * n} (init_r {report.init_r} x {n} modules); "
        f"target {report.target_r * n} (target_r {report.target_r} x {n})\n"
        f"trainable params: {report.trainable_params:,}\n"
        f"adapter params: {report.adapter_params_before:,} at init_r -> {report.adapter_params_after:,} "
        f"after pruning ({_percent(report.adapter_params_after, report.adapter_params_before)})"
    )


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "n/a"


def rank_grid(report: RankReport):
    """The heatmap's values: a (module types, layers) float array, NaN where no module was adapted."""
    import numpy as np

    return np.array(
        [[report.cells.get((layer, t), np.nan) for layer in report.layers] for t in report.types], dtype=float,
    )  # (types, layers)


def plot_heatmap(report: RankReport, path: str | os.PathLike, overwrite: bool = False, title: str | None = None) -> Path:
    """Draw final ranks as the paper's heatmap: module types (rows) x layers (columns), each cell
    annotated with its rank. Written atomically; an existing file is kept unless `overwrite`.

    Args:
        report: the ranks to draw.
        path: the image file (.png, .pdf, .svg).
        overwrite: replace an existing file.
        title: the figure title (default: the budget).
    Returns:
        The path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    path = check_output_file(path, overwrite, IMAGE_SUFFIXES)
    grid = np.ma.masked_invalid(rank_grid(report))  # (types, layers); NaN where no module
    fig, ax = plt.subplots(figsize=(max(5.0, 2.5 + 0.6 * len(report.layers)), 1.2 + 0.5 * len(report.types)))
    image = ax.imshow(grid, cmap="YlGn", vmin=0, vmax=report.init_r, aspect="auto")
    for (row, col), value in np.ndenumerate(grid.filled(np.nan)):
        if not np.isnan(value):
            dark = value > 0.6 * report.init_r  # white text on the darkest greens
            ax.text(col, row, f"{int(value)}", ha="center", va="center", fontsize=9, color="white" if dark else "black")
    ax.set_xticks(range(len(report.layers)), labels=report.layers)
    ax.set_yticks(range(len(report.types)), labels=report.types)
    ax.set_xlabel("layer")
    ax.set_title(title or f"final ranks: budget {report.budget} of {report.init_r * len(report.ranks)}")
    fig.colorbar(image, ax=ax, label="rank", ticks=range(0, report.init_r + 1, max(1, report.init_r // 6)))
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=150))
    plt.close(fig)
    return path
