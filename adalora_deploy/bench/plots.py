"""PNG plot of bench results: p50 latency per cell, and each variant's p50 relative to merged."""

from __future__ import annotations

import os
from pathlib import Path


def plot_bench(result: dict, path: str | os.PathLike) -> Path:
    """Two panels: p50 latency bars per cell and variant (log scale; p90/p99 are in the table), and
    each variant's p50 over merged's. Written with the Agg backend, atomically.

    Args:
        result: what run_bench returns.
        path: the PNG file to write.

    Returns:
        The path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from adalora_deploy.io import atomic_write

    cells = result["cells"]
    names = list(result["variants"])
    labels = [f"b{c['batch_size']}\ns{c['seq_len']}" for c in cells]
    x = np.arange(len(cells))
    width = 0.8 / len(names)
    fig, (ax_ms, ax_ratio) = plt.subplots(2, 1, figsize=(max(7, 1.4 * len(cells)), 7.5), sharex=True)
    for i, name in enumerate(names):
        p50 = [c["results"][name]["p50_ms"] for c in cells]
        ratio = [c["results"][name]["ratio_to_merged"] or np.nan for c in cells]
        ax_ms.bar(x + (i - (len(names) - 1) / 2) * width, p50, width, label=name)
        ax_ratio.plot(x, ratio, marker="o", label=name)
    ax_ms.set_yscale("log")
    ax_ms.set_ylabel("p50 latency (ms, log)")
    ax_ms.legend(fontsize=8, ncol=3)
    ax_ratio.axhline(1.0, color="grey", lw=0.8)
    ax_ratio.set_ylabel("p50 / merged p50")
    ax_ratio.set_xticks(x, labels)
    ax_ratio.set_xlabel("batch size / sequence length")
    h = result["header"]
    fig.suptitle(f"{h['device']}\n{h['provider']}, intra-op threads {h['threads']['ort_intra_op']}, {h['dtype']}", fontsize=9)
    fig.tight_layout()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120))
    finally:
        plt.close(fig)
