"""Two ways to run rows of many adapters in one ONNX Runtime call, measured against each other and against
the merged graph, interleaved in one process (MiniLM, CPU, 1 thread):

- gather (today's multi graph, exporters/multi.py): each row gathers its adapter's factors,
  (B, d_in, r) and (B, r, d_out), and the branch is a batched MatMul, one small GEMM per row;
- grouped: the runtime sorts the rows by adapter and feeds the group offsets (N + 1,); per module and per
  adapter the graph takes that group's rows (Range + Gather), runs two plain MatMuls on that adapter's
  factors (B_g * T rows per GEMM instead of T) and concatenates the groups back.

Both multi graphs are also exported without ONNX Runtime's transformer fusions (their branches differ, the
base is the same), so that "gather_plain" vs "grouped_plain" compares the branch formulations alone; the
fused gather graph ("gather") is the one served. Beside them: merged, factored (today's one-adapter graph),
and the bound on "multi >= 3x PEFT eager" (issue 9): PEFT eager with one adapter and one group of rows
(peft_n1) and with N adapters, set_adapter per group (peft_nN). Multi can never be faster than merged, so
multi / PEFT eager <= merged / peft_n1 on this CPU.

    python benchmarks/multi_variants.py runs/multi-real/reviews/ckpt --adapters 16 --runs 7 \\
        --json benchmarks/multi_variants.json --markdown benchmarks/multi_variants.md
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from adalora_deploy.bench.multi import _assignments, _export_all, multi_variants, peft_variant
from adalora_deploy.bench.run import BenchConfig, make_feeds, summarize, time_cell, write_script_outputs
from adalora_deploy.bench.variants import Variant, onnx_variant
from adalora_deploy.constants import ADAPTER_INDEX_INPUT, MANIFEST_FILE, MODEL_CONFIG_FILE, MODEL_FILE
from adalora_deploy.exporters.multi import (
    MultiAdapterClassifier,
    MultiLinear,
    _shapes,
    factor_inputs,
    random_stack,
)
from adalora_deploy.layers import replace_module

GROUP_OFFSETS = "group_offsets"


class GroupedLinear(MultiLinear):
    """y = x @ W0^T + concat over adapters g of (x[rows of g] @ down[g]) @ up[g] + b (rows sorted by adapter)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        down, up = self.factors.rows[self.module]  # (N, d_in, r), (N, r, d_out): the whole stacks
        offsets = self.factors.offsets  # (N + 1,)
        h = x if x.dim() == 3 else x.unsqueeze(1)
        parts = []
        for g in range(down.shape[0]):
            rows = torch.arange(offsets[g], offsets[g + 1])  # group g's rows: a Range on run-time offsets
            parts.append((h.index_select(0, rows) @ down[g]) @ up[g])  # (B_g, T, r) then (B_g, T, d_out)
        branch = torch.cat(parts, 0)  # (B, T, d_out), rows in sorted order
        y = nn.functional.linear(x, self.weight) + (branch if x.dim() == 3 else branch.squeeze(1))
        return y if self.bias is None else y + self.bias


class GroupedMultiClassifier(MultiAdapterClassifier):
    """The multi classifier with grouped branches; the number of adapters is fixed when it is traced."""

    def __init__(self, model: nn.Module):
        super().__init__(model)
        for full, local in self.paths.items():  # a MultiLinear has the weight and bias a Linear has
            replace_module(self.backbone, local, GroupedLinear(self.backbone.get_submodule(local), full, self.factors))

    def forward(self, input_ids, attention_mask, token_type_ids, group_offsets, adapter_index, head_weight,
                head_bias, *factors):
        self.factors.rows = {m: (factors[2 * i], factors[2 * i + 1]) for i, m in enumerate(self.module_names)}
        self.factors.offsets = group_offsets
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        w, b = head_weight[adapter_index], head_bias[adapter_index]  # (B, C, H), (B, C)
        return (w @ out[1].unsqueeze(-1)).squeeze(-1) + b  # (B, C)


def export_grouped(model: nn.Module, count: int, out: Path) -> Path:
    """Trace the grouped graph for `count` adapters (no fusions) into out/model.onnx; checks it against
    PyTorch on a mixed batch of random adapters (empty groups included)."""
    module = GroupedMultiClassifier(model).eval()
    shapes, hidden = _shapes(module), model.config.hidden_size
    mods = module.module_names
    stack = random_stack(module, shapes, [{m: 1 + (i + k) % 3 for i, m in enumerate(mods)} for k in range(count)],
                         3, hidden)
    index = np.sort(np.arange(6) % max(1, count - 1))  # the last adapter has no row: an empty group
    offsets = np.concatenate([[0], np.cumsum(np.bincount(index, minlength=count))])
    ids = np.random.default_rng(0).integers(1000, 2000, (6, 8))
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids),
             GROUP_OFFSETS: offsets, ADAPTER_INDEX_INPUT: index, **stack}
    names = list(feeds)
    axes = {n: {0: "batch", 1: "sequence"} for n in ("input_ids", "attention_mask", "token_type_ids")}
    axes[ADAPTER_INDEX_INPUT] = {0: "batch"}
    for i, name in enumerate(factor_inputs(module)):  # down, up per module: each module its own rank axis
        axes[name] = {2 - i % 2: f"rank_{i // 2}"}
    axes["head_weight"], axes["head_bias"], axes["logits"] = {1: "labels"}, {1: "labels"}, {0: "batch", 1: "labels"}
    out.mkdir(parents=True, exist_ok=True)
    tensors = tuple(torch.from_numpy(np.asarray(v)) for v in feeds.values())
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, tensors, str(out / MODEL_FILE), input_names=names, output_names=["logits"],
                          dynamic_axes=axes, opset_version=18, dynamo=False)
        want = module(*tensors).numpy()
    from adalora_deploy.ort import inference_session, providers_for

    got = inference_session(out / MODEL_FILE, providers_for("cpu")).run(None, feeds)[0]
    diff = float(np.abs(got - want).max())
    if diff > 1e-4:
        raise RuntimeError(f"grouped graph: ONNX Runtime vs PyTorch differ by {diff:.3g}")
    return out


def grouped_variant(graph_dir: Path, multi_dir: Path, packs: list[Path], session_config) -> Variant:
    """Rows sorted by adapter (the same random assignment as the gather variants), offsets fed, order restored."""
    from adalora_deploy.runtime.adapters import AdapterRegistry
    from adalora_deploy.runtime.session import open_session

    session = open_session(graph_dir, replace(session_config, warmup=False))  # its warm-up feeds lack the offsets
    registry = AdapterRegistry(json.loads((multi_dir / MANIFEST_FILE).read_text()))
    for i, p in enumerate(packs):
        registry.load(f"a{i}", p)
    state, count = registry.state, len(packs)

    def forward(feeds):
        index = _assignments(count, feeds["input_ids"].shape[0])
        order = np.argsort(index, kind="stable")
        offsets = np.concatenate([[0], np.cumsum(np.bincount(index, minlength=count))])
        sorted_feeds = {k: v[order] for k, v in feeds.items()}
        logits = session.run({**sorted_feeds, ADAPTER_INDEX_INPUT: index[order], GROUP_OFFSETS: offsets},
                             resident=state.feeds)["logits"]
        restored = np.empty_like(logits)
        restored[order] = logits
        return restored

    return Variant("grouped_plain", forward, session.provider, str(graph_dir))


def run(checkpoint: Path, count: int, batch: int, seq: int, runs: int, warmup: int) -> dict:
    from adalora_deploy.exporters import export
    from adalora_deploy.exporters.multi import load_base_or_checkpoint
    from adalora_deploy.model import AdaLoraModel

    config = BenchConfig(batch_sizes=[batch], seq_lens=[seq], runs=runs, warmup=warmup, provider="cpu", threads=1)
    session = config.session_config()
    with tempfile.TemporaryDirectory(prefix="adalora-multi-variants-") as tmp:
        work = Path(tmp)
        dirs = _export_all(checkpoint, work, count)
        plain = export(checkpoint, work / "multi-plain", mode="multi", optimize=False) / "multi"
        model = load_base_or_checkpoint(str(checkpoint), None)[0]
        grouped = export_grouped(model, count, work / "grouped")
        gather = multi_variants(dirs["multi"], dirs["packs"], [count], session)[0]
        gather.name = "gather"
        gather_plain = multi_variants(plain, dirs["packs"], [count], session)[0]
        gather_plain.name = "gather_plain"
        def peft(n):  # PEFT injects into the model it wraps: one fresh load each
            return peft_variant(AdaLoraModel.from_pretrained(checkpoint).eval(), n, 1)

        variants = [onnx_variant("merged", dirs["merged"] / "merged", session),
                    onnx_variant("factored", dirs["merged"] / "factored", session),
                    gather, gather_plain, grouped_variant(grouped, dirs["multi"], dirs["packs"], session),
                    peft(1), peft(count)]
        feeds = make_feeds(batch, seq, json.loads((dirs["multi"] / MODEL_CONFIG_FILE).read_text())["vocab_size"], 0)
        # the grouped graph answers what the gather graph answers (same packs, same row assignment)
        np.testing.assert_allclose(variants[4].forward(feeds), gather.forward(feeds)["logits"], atol=1e-3)
        times = time_cell(variants, feeds, config)
    cell = {name: summarize(t, batch) for name, t in times.items()}
    merged = cell["merged"]["p50_ms"]
    ratios = {name: round(c["p50_ms"] / merged, 3) for name, c in cell.items()}
    peft_n = f"peft_eager_n{count}"
    return {"checkpoint": str(checkpoint), "adapters": count, "batch": batch, "seq_len": seq, "threads": 1,
            "runs": runs, "cell": cell, "p50_over_merged": ratios,
            "grouped_over_gather_plain": round(cell["grouped_plain"]["p50_ms"] / cell["gather_plain"]["p50_ms"], 3),
            "peft_bound": {"merged_over_peft_n1_throughput": round(cell["peft_eager_n1"]["p50_ms"] / merged, 3),
                           "merged_over_peft_nN_throughput": round(cell[peft_n]["p50_ms"] / merged, 3),
                           "gather_over_peft_nN_throughput": round(cell[peft_n]["p50_ms"] / cell["gather"]["p50_ms"], 3)}}


def markdown(r: dict, command: str) -> str:
    lines = [f"# Multi-adapter graph variants (MiniLM, CPU, 1 thread, b{r['batch']} s{r['seq_len']}, "
             f"N = {r['adapters']})", "", f"Command: `{command}`", "", __doc__.split("\n\n    python")[0], "",
             "| variant | p50 ms | p90 ms | seq/s | p50 / merged |", "|---|---|---|---|---|"]
    for name, c in r["cell"].items():
        lines.append(f"| {name} | {c['p50_ms']:.1f} | {c['p90_ms']:.1f} | {c['throughput_seq_per_s']:.2f} "
                     f"| {r['p50_over_merged'][name]:.3f} |")
    b = r["peft_bound"]
    lines += ["", f"grouped_plain / gather_plain (p50): {r['grouped_over_gather_plain']:.3f}.", "",
              f"Bound on multi / PEFT eager throughput: merged / PEFT eager with one adapter and one group = "
              f"{b['merged_over_peft_n1_throughput']:.2f}x; merged / PEFT eager with N adapters in groups = "
              f"{b['merged_over_peft_nN_throughput']:.2f}x; served multi graph (gather) / PEFT eager N = "
              f"{b['gather_over_peft_nN_throughput']:.2f}x.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = run(args.checkpoint, args.adapters, args.batch, args.seq, args.runs, args.warmup)
    command = "python " + " ".join(sys.argv)
    print(json.dumps(result["p50_over_merged"], indent=1), result["grouped_over_gather_plain"], result["peft_bound"])
    write_script_outputs({"command": command, **result}, markdown(result, command), args.json, args.markdown)


if __name__ == "__main__":
    main()
