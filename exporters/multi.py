"""`export BASE_OR_CKPT --mode multi`: one base graph that serves many adapter packs (docs/adapter_pack.md).

Every Linear layer of the backbone gets a low-rank branch whose factors are graph INPUTS, stacked over
the loaded adapters, each module with its own rank dimension:

    <module>.down  (N, d_in, r_m)    <module>.up  (N, r_m, d_out)    adapter_index (B,)
    y = x @ W0^T + (x @ down[adapter_index]) @ up[adapter_index] + b      per row: (B, T, r_m), (B, T, d_out)

r_m is the largest rank any loaded adapter has at module m (others padded with zero columns); a module
that no loaded adapter touches is fed r_m = 0 and its branch is an empty product. The task head is an
input too: head.weight (N, C, H), head.bias (N, C), C the largest num_labels loaded; each row's logits
are sliced to its adapter's num_labels by the runtime. The d_out x d_in product is never formed.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from adalora_deploy.constants import (
    ADAPTER_INDEX_INPUT,
    DOWN_SUFFIX,
    HEAD_BIAS_INPUT,
    HEAD_WEIGHT_INPUT,
    MANIFEST_FILE,
    MODEL_FILE,
    MULTI_MODE,
    SEQUENCE_CLASSIFICATION,
    UP_SUFFIX,
)
from adalora_deploy.io import write_json
from adalora_deploy.layers import replace_module

from . import graph as graphs
from .adapter_pack import base_identity, head_module, plain_model
from .errors import ExportValidationError
from .manifest import manifest_header, package_versions
from .specs import MIN_OPSET
from .validate import OrtRunner

log = logging.getLogger("adalora_deploy.export")
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
MULTI_ATOL = 1e-4  # ONNX Runtime vs PyTorch on random stacked adapters
MULTI_OPSET = 18


class RowFactors:
    """Per-call state shared by the branches: each module's factors gathered for the batch's rows."""

    def __init__(self):
        self.rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


class MultiLinear(nn.Module):
    """y = (x @ W0^T + (x @ down_row) @ up_row) + b, the branch joining before the bias Add."""

    def __init__(self, base: nn.Linear, module: str, factors: RowFactors):
        super().__init__()
        self.register_buffer("weight", base.weight.detach().clone())  # W0: (d_out, d_in)
        self.register_buffer("bias", base.bias.detach().clone() if base.bias is not None else None)
        self.module, self.factors = module, factors

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        down, up = self.factors.rows[self.module]  # (B, d_in, r), (B, r, d_out)
        h = x if x.dim() == 3 else x.unsqueeze(1)  # the pooler sees (B, d_in): one token per row
        branch = (h @ down) @ up  # (B, T, r) then (B, T, d_out)
        y = nn.functional.linear(x, self.weight) + (branch if x.dim() == 3 else branch.squeeze(1))
        return y if self.bias is None else y + self.bias


class MultiAdapterClassifier(nn.Module):
    """The backbone with a run-time branch on every Linear, and a run-time classification head.

    forward(input_ids, attention_mask, token_type_ids, adapter_index, head_weight, head_bias,
    *factors) -> logits (B, C); `factors` is down, up per module in `self.modules` order.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        plain = plain_model(model)
        prefix = plain.base_model_prefix  # "bert": module paths in packs are the full model's paths
        self.backbone = plain.base_model
        self.factors = RowFactors()
        linears = [n for n, m in self.backbone.named_modules() if isinstance(m, nn.Linear)]
        self.paths = {f"{prefix}.{n}": n for n in linears}
        for full, local in self.paths.items():
            replace_module(self.backbone, local, MultiLinear(self.backbone.get_submodule(local), full, self.factors))

    @property
    def module_names(self) -> list[str]:
        return list(self.paths)

    def forward(self, input_ids, attention_mask, token_type_ids, adapter_index, head_weight, head_bias, *factors):
        self.factors.rows = {
            m: (factors[2 * i][adapter_index], factors[2 * i + 1][adapter_index]) for i, m in enumerate(self.module_names)
        }
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        pooled = out[1]  # (B, H): BERT's pooler output, what its classifier reads (dropout is off in eval)
        w, b = head_weight[adapter_index], head_bias[adapter_index]  # (B, C, H), (B, C)
        return (w @ pooled.unsqueeze(-1)).squeeze(-1) + b  # (B, C)


def factor_inputs(module: MultiAdapterClassifier) -> list[str]:
    return [name for m in module.module_names for name in (m + DOWN_SUFFIX, m + UP_SUFFIX)]


def random_stack(module: MultiAdapterClassifier, shapes: dict[str, tuple[int, int]], ranks: list[dict[str, int]],
                 num_labels: int, hidden: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Stacked random adapters of the given per-module ranks (a module missing from a dict: rank 0)."""
    rng = np.random.default_rng(seed)
    n = len(ranks)
    feeds = {
        HEAD_WEIGHT_INPUT: rng.normal(0, 0.5, (n, num_labels, hidden)).astype(np.float32),
        HEAD_BIAS_INPUT: rng.normal(0, 0.5, (n, num_labels)).astype(np.float32),
    }
    for m in module.module_names:
        d_out, d_in = shapes[m]
        r_max = max(r.get(m, 0) for r in ranks)
        down, up = np.zeros((n, d_in, r_max), np.float32), np.zeros((n, r_max, d_out), np.float32)
        for a, r in enumerate(ranks):
            k = r.get(m, 0)
            down[a, :, :k] = rng.normal(0, 0.05, (d_in, k))
            up[a, :k] = rng.normal(0, 0.05, (k, d_out))
        feeds[m + DOWN_SUFFIX], feeds[m + UP_SUFFIX] = down, up
    return feeds


def _shapes(module: MultiAdapterClassifier) -> dict[str, tuple[int, int]]:
    layers = {full: module.backbone.get_submodule(local) for full, local in module.paths.items()}
    return {m: tuple(layer.weight.shape) for m, layer in layers.items()}


def _dummy(module: MultiAdapterClassifier, hidden: int) -> tuple[dict[str, torch.Tensor], dict]:
    shapes = _shapes(module)
    stack = random_stack(module, shapes, [dict.fromkeys(shapes, 2), dict.fromkeys(shapes, 1)], 3, hidden)
    ids = torch.randint(1000, 2000, (2, 8))
    feeds = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids),
             ADAPTER_INDEX_INPUT: torch.tensor([0, 1])}
    feeds.update({k: torch.from_numpy(v) for k, v in stack.items()})
    axes = {name: {0: "batch", 1: "sequence"} for name in TEXT_INPUTS}
    axes[ADAPTER_INDEX_INPUT] = {0: "batch"}
    axes[HEAD_WEIGHT_INPUT] = {0: "adapters", 1: "labels"}
    axes[HEAD_BIAS_INPUT] = {0: "adapters", 1: "labels"}
    for i, m in enumerate(module.module_names):
        axes[m + DOWN_SUFFIX] = {0: "adapters", 2: f"rank_{i}"}
        axes[m + UP_SUFFIX] = {0: "adapters", 1: f"rank_{i}"}
    axes["logits"] = {0: "batch", 1: "labels"}
    return feeds, axes


def trace(module: MultiAdapterClassifier, path: Path) -> None:
    """torch.onnx (TorchScript) export of the multi module to `path`."""
    feeds, axes = _dummy(module, module.backbone.config.hidden_size)
    names = list(feeds)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, tuple(feeds.values()), str(path), input_names=names, output_names=["logits"],
                          dynamic_axes=axes, opset_version=max(MULTI_OPSET, MIN_OPSET), dynamo=False,
                          do_constant_folding=True)


def validate(module: MultiAdapterClassifier, path: Path) -> dict:
    """ONNX Runtime vs PyTorch on random adapters of uneven ranks (rank 0 included) in one mixed batch."""
    shapes, hidden = _shapes(module), module.backbone.config.hidden_size
    mods = module.module_names
    ranks = [{m: (i % 4) for i, m in enumerate(mods)}, {m: 3 for m in mods[::2]}, {}]
    stack = random_stack(module, shapes, ranks, 3, hidden, seed=1)
    runner = OrtRunner(path)
    rng = np.random.default_rng(2)
    worst = 0.0
    for batch, length in ((3, 7), (5, 16)):
        ids = rng.integers(1000, 2000, (batch, length))
        mask = np.ones_like(ids)
        mask[0, length // 2:] = 0
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids),
                 ADAPTER_INDEX_INPUT: np.arange(batch) % len(ranks), **stack}
        got = runner.run(feeds)["logits"]
        with torch.no_grad():
            want = module(*(torch.from_numpy(np.asarray(v)) for v in feeds.values())).numpy()
        worst = max(worst, float(np.abs(got - want).max()))
    if not worst <= MULTI_ATOL:
        raise ExportValidationError(f"multi graph: ONNX Runtime vs PyTorch differ by {worst:.3g} > {MULTI_ATOL}")
    return {"validated": True, "provider": runner.provider, "max_abs_diff": worst, "atol": MULTI_ATOL, "cases": 2}


def multi_manifest(model: nn.Module, module: MultiAdapterClassifier, graph: onnx.ModelProto, validation: dict,
                   seconds: float, base_name: str | None, fused: dict | None) -> dict:
    shapes = _shapes(module)
    return {
        **manifest_header(MULTI_MODE, SEQUENCE_CLASSIFICATION, "fp32", MULTI_OPSET, fused is not None, True),
        "base": {**base_identity(model), "name_or_path": base_name},
        "head": {"module": head_module(model), "hidden": model.config.hidden_size},
        "modules": {m: {"d_out": d_out, "d_in": d_in} for m, (d_out, d_in) in shapes.items()},
        "inputs": {"adapter_index": ADAPTER_INDEX_INPUT, "head_weight": HEAD_WEIGHT_INPUT,
                   "head_bias": HEAD_BIAS_INPUT, "down_suffix": DOWN_SUFFIX, "up_suffix": UP_SUFFIX},
        "graph": {"file": MODEL_FILE, "fused_ops": fused, "op_counts": graphs.op_counts(graph)},
        "validation": validation,
        "export_seconds": round(seconds, 2),
        "versions": package_versions(),
    }


def write_multi(model: nn.Module, tokenizer, out: Path, base_name: str | None, validate_graph: bool = True,
                optimize: bool = True) -> None:
    """Export the multi graph of `model`'s base into the (temporary) directory `out`.

    Args:
        model: a transformers sequence classifier (SVDLinear adapters allowed: only the base counts).
        tokenizer: saved beside the graph.
        out: the mode directory to fill.
        base_name: the base model's path or hub id, recorded in the manifest.
        validate_graph: compare ONNX Runtime with PyTorch on random mixed adapters first.
        optimize: apply ONNX Runtime's transformer fusions (MultiHeadAttention etc.), branches set aside.
    """
    start = time.perf_counter()
    head_module(model)  # refuses model types without a declared head
    module = MultiAdapterClassifier(model).eval()
    out.mkdir(parents=True, exist_ok=True)
    trace(module, out / MODEL_FILE)
    graph, fused = onnx.load(str(out / MODEL_FILE)), None
    if optimize:
        graph, fused = fuse(graph, model.config)
    graphs.residual_adds_as_sum(graph)  # as every fp32 export: keeps the slower CPU SkipLayerNormalization out
    graphs.save(graph, out / MODEL_FILE)
    validation = validate(module, out / MODEL_FILE) if validate_graph else {"validated": False}
    model.config.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    write_json(out / MANIFEST_FILE,
               multi_manifest(model, module, graph, validation, time.perf_counter() - start, base_name, fused))
    log.info("multi graph: %d modules with run-time branches", len(module.module_names))



def load_base_or_checkpoint(path: str, base: str | None) -> tuple[nn.Module, object, str | None]:
    """(model, tokenizer, base name) from a checkpoint, a PEFT adapter, or a base model (path or hub id)."""
    from transformers import AutoTokenizer

    from adalora_deploy.constants import CHECKPOINT_CONFIG_FILE, PEFT_CONFIG_FILE
    from adalora_deploy.model import load_base_model, resolve_model_path

    from .source import load_source

    if any((Path(path) / name).is_file() for name in (CHECKPOINT_CONFIG_FILE, PEFT_CONFIG_FILE)):
        source = load_source(path, base=base)
        tokenizer = AutoTokenizer.from_pretrained(source.tokenizer_dir)
        return source.model.model, tokenizer, source.model.base_model.get("name_or_path")
    name = base or path
    model = load_base_model(name, SEQUENCE_CLASSIFICATION, num_labels=2).eval()
    return model, AutoTokenizer.from_pretrained(resolve_model_path(name)), name


def export_multi(base_or_checkpoint, out, *, base: str | None = None, overwrite: bool = False,
                 validate_graph: bool = True, optimize: bool = True) -> Path:
    """`export BASE_OR_CKPT --mode multi --out OUT`: OUT/multi/, one graph for every pack of that base.

    Args:
        base_or_checkpoint: a checkpoint, a PEFT adapter (their base is used) or a base model.
        out: the export root; OUT/multi/ is written atomically.
        base: overrides the base model a checkpoint names.
        overwrite: replace a non-empty `out`.
        validate_graph: check ONNX Runtime against PyTorch on random mixed adapters.
        optimize: apply ONNX Runtime's transformer fusions.
    """
    from adalora_deploy.io import atomic_output_dir, check_output_dir

    check_output_dir(out, overwrite)
    model, tokenizer, name = load_base_or_checkpoint(str(base_or_checkpoint), base)
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        write_multi(model, tokenizer, tmp / MULTI_MODE, name, validate_graph, optimize)
    return Path(out)


def _run_time_branches(model: onnx.ModelProto) -> list[dict]:
    """The branches of 3-D modules: {gathers, down, up, join, base_out}; the pooler's (2-D, wrapped in
    Unsqueeze/Squeeze) is left in place: no fusion touches it."""
    graph = model.graph
    users: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    producers = {out: node for node in graph.node for out in node.output}
    found = []
    for inp in graph.input:
        if not inp.name.endswith(DOWN_SUFFIX):
            continue
        (gather_d,) = users[inp.name]
        (down,) = users[gather_d.output[0]]
        (up,) = users[down.output[0]]
        gather_u = producers[up.input[1]]
        joins = users.get(up.output[0], [])
        if len(joins) != 1 or joins[0].op_type != "Add" or down.op_type != "MatMul" or up.op_type != "MatMul":
            continue
        join = joins[0]
        base_out = next(name for name in join.input if name != up.output[0])
        if producers.get(base_out) is None or producers[base_out].op_type != "MatMul":
            continue
        found.append({"nodes": [gather_d, gather_u, down, up, join], "down": down, "join": join, "base_out": base_out})
    return found


def fuse(model: onnx.ModelProto, config) -> tuple[onnx.ModelProto, dict]:
    """ONNX Runtime's transformer fusions with the run-time branches set aside (as for the factored graph,
    exporters/graph.py): fuse the plain base, then put each branch back on its base MatMul's output."""
    from onnxruntime.transformers.optimizer import optimize_model

    from adalora_deploy.architectures import ARCHITECTURES

    from .specs import FUSIONS

    graph = model.graph
    found = _run_time_branches(model)
    inputs = list(graph.input)
    for b in found:
        graphs._rename_input(graph, b["join"].output[0], b["base_out"])
        for node in b["nodes"]:
            graph.node.remove(node)
    arch = ARCHITECTURES[config.model_type].fusion  # a declared multi head implies a BERT-family row
    optimized = optimize_model(
        model, model_type=arch.ort_model_type, num_heads=getattr(config, arch.num_heads_attr),
        hidden_size=getattr(config, arch.hidden_size_attr),
        optimization_options=graphs.fusion_options("MultiHeadAttention", FUSIONS), opt_level=1, use_gpu=False,
    )
    counts = optimized.get_fused_operator_statistics()
    fused = optimized.model
    producers = {out: node for node in fused.graph.node for out in node.output}
    for b in found:
        base = producers.get(b["base_out"])
        if base is None or base.op_type != "MatMul":
            raise ExportValidationError(f"the optimizer removed a base MatMul ({b['base_out']}); export with --no-optimize")
        b["down"].input[0] = base.input[0]
        graphs._rename_input(fused.graph, b["base_out"], b["join"].output[0])
        fused.graph.node.extend(b["nodes"])
    present = {i.name for i in fused.graph.input}
    fused.graph.input.extend([i for i in inputs if i.name not in present])  # unused while detached: pruned
    optimized.topological_sort()
    return optimized.model, {op: int(counts.get(op, 0)) for op in graphs.FUSED_OPS}
