"""Bench results as a markdown page and a console summary."""

from __future__ import annotations

TARGET_DEFINITIONS = [
    "Each target is checked on every grid cell where its variants were measured; it passes when every",
    "checked cell passes. All comparisons use p50 latency.",
    "",
    "- `merged_vs_base`: |p50(merged) / p50(onnx_base) - 1| <= 0.03.",
    "- `factored_flop_overhead`: p50(factored_pruned) / p50(merged) - 1 <= 1.5 x FLOP share, the share being",
    "  the pruned branch's FLOPs over the merged graph's at that sequence length.",
    "- `pruned_faster_than_unpruned`: p50(factored_pruned) < p50(factored_unpruned).",
    "- `merged_vs_optimum_plain`: p50(merged) <= 0.90 x p50(optimum_plain) at batch 1 and 32, sequence 128.",
    "- `merged_int8_vs_optimum_plain`: p50(merged_int8) <= 0.55 x p50(optimum_plain) at batch 1 and 32, sequence 128.",
    "- `merged_int8_vs_optimum_int8`: p50(merged_int8) <= 0.90 x p50(optimum_int8) at batch 1 and 32, sequence 128.",
]


def int8_lines(result: dict) -> list[str]:
    """Accuracy of our int8 exports as measured at export time (fp32 vs int8 on labelled rows)."""
    figures = result.get("int8_evaluation") or {}
    if not figures:
        return []
    rows = ["## int8 accuracy (measured by the export)", "",
            "| variant | data | examples | fp32 acc | int8 acc | drop (points) | agreement | size / fp32 |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, e in figures.items():
        rows.append(f"| {name} | {e['data']} | {e['examples']} | {e['fp32_accuracy']:.4f} | {e['int8_accuracy']:.4f} | "
                    f"{e['accuracy_drop_points']:+.2f} | {e['agreement']:.4f} | {e['size_ratio']:.3f} |")
    return [*rows, ""]


def _fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def results_table(result: dict) -> list[str]:
    """One row per cell and variant."""
    rows = [
        "| batch | seq | variant | p50 ms | p90 ms | p99 ms | seq/s | p50 / merged |",
        "|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for cell in result["cells"]:
        for name, r in cell["results"].items():
            rows.append(
                f"| {cell['batch_size']} | {cell['seq_len']} | {name} | {_fmt(r['p50_ms'])} | {_fmt(r['p90_ms'])} | "
                f"{_fmt(r['p99_ms'])} | {_fmt(r['throughput_seq_per_s'], 1)} | {_fmt(r['ratio_to_merged'], 3)} |"
            )
    return rows


def flops_lines(result: dict) -> list[str]:
    if not result.get("flops"):
        return ["FLOP share: not computed (no checkpoint to read ranks and shapes from)."]
    rows = [
        "| seq | merged GFLOP/seq | branch (pruned) MFLOP/seq | FLOP share pruned | FLOP share unpruned |",
        "|---:|---:|---:|---:|---:|",
    ]
    for seq, f in result["flops"].items():
        rows.append(
            f"| {seq} | {f['merged'] / 1e9:.3f} | {f['branch_pruned'] / 1e6:.2f} | {100 * f['share']:.2f}% | "
            f"{100 * f['share_unpruned']:.2f}% |"
        )
    return rows


def _verdict(passed: bool | None) -> str:
    return "not measured" if passed is None else ("PASS" if passed else "FAIL")


def target_lines(result: dict) -> list[str]:
    """One line per target, then one per checked cell."""
    lines = []
    for t in result["targets"]:
        lines.append(f"- **{_verdict(t['passed'])}** `{t['name']}`: {t['description']}")
        for c in t["cells"]:
            lines.append(
                f"  - batch {c['batch_size']}, seq {c['seq_len']}: value {c['value']:+.4f}, limit {c['limit']:.4f} "
                f"-> {_verdict(c['passed'])}"
            )
    return lines


def header_lines(result: dict) -> list[str]:
    h = result["header"]
    threads = ", ".join(f"{k} {v}" for k, v in h["threads"].items())
    versions = ", ".join(f"{k} {v}" for k, v in h["versions"].items())
    return [
        f"- command: `{h['command']}`" if h.get("command") else f"- source: `{h['source']}`",
        f"- date: {h['date']}",
        f"- device: {h['device']}",
        f"- provider (actually used): {h['provider']}; per variant: "
        + ", ".join(f"{k} {v}" for k, v in h["providers"].items()),
        f"- threads: {threads}",
        f"- dtype {h['dtype']}; {h['warmup']} warm-up + {h['runs']} timed runs per variant and cell, "
        "interleaved in one process (order rotated every round)",
        f"- versions: {versions}",
    ]


def render_markdown(result: dict) -> str:
    """The whole results page."""
    variants = [f"- `{name}`: {v['description']}" for name, v in result["variants"].items()]
    parts = [
        "# adalora-deploy bench", "", *header_lines(result), "", "## Variants", "", *variants, "",
        "## Latency", "", "Throughput is sequences per second at the median latency.", "",
        *results_table(result), "", "## FLOPs", "",
        "Per sequence; the share is the factored branch's FLOPs over the merged graph's (adalora_deploy/bench/flops.py).",
        "", *flops_lines(result), "", *int8_lines(result), "## Targets", "", *TARGET_DEFINITIONS, "",
        *target_lines(result), "",
    ]
    return "\n".join(parts)


def console_summary(result: dict) -> str:
    """What `bench` prints: the table, the FLOP share and the targets."""
    return "\n".join([*results_table(result), "", *flops_lines(result), "", *target_lines(result)])
