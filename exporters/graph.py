"""Passes over the exported ONNX graph: find the low-rank branches, fuse with ONNX Runtime's transformer
optimizer without losing them, convert to fp16, and describe the result.

Why branches are set aside during fusion: ONNX Runtime's fusions match fixed patterns (MatMul -> Add
bias -> Reshape for attention, Add -> Gelu for BiasGelu, ...). A branch joining between the MatMul
and the bias Add breaks every one of them, and the attention pattern also needs the layer input to
feed exactly three MatMuls. So the factored graph is fused as if it were the plain base model, then
each branch is put back on its base MatMul's output, which every fused op keeps as its input.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import NodeProto

from .errors import ExportError
from .factored import BRANCH_NAME
from .specs import FUSIONS, FusionSpec

LABEL_PREFIX = f"{BRANCH_NAME}:"  # canonical branch node names: "adalora_branch:<module path>/down"
EXTERNAL_DATA_BYTES = 2 * 1024**3  # protobuf's hard limit on one file
FUSED_OPS = (
    "EmbedLayerNormalization", "Attention", "MultiHeadAttention", "SkipLayerNormalization",
    "LayerNormalization", "Gelu", "FastGelu", "BiasGelu",
)


@dataclass
class Branch:
    """One low-rank branch in a graph: down = x @ Q'^T, up = h @ P'^T, join = base MatMul output + up."""

    module: str
    down: NodeProto
    up: NodeProto
    join: NodeProto
    base_out: str  # the base MatMul's output, which the join adds to

    @property
    def initializers(self) -> tuple[str, str]:
        return self.down.input[1], self.up.input[1]


def _producers(graph: onnx.GraphProto) -> dict[str, NodeProto]:
    return {out: node for node in graph.node for out in node.output}


def consumers(graph: onnx.GraphProto) -> dict[str, list[NodeProto]]:
    """{tensor name: the nodes that read it}."""
    users: dict[str, list[NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    return users


def _branch_from_down(graph: onnx.GraphProto, down: NodeProto, module: str) -> Branch:
    users, producers = consumers(graph), _producers(graph)
    (up,) = users[down.output[0]]
    (join,) = users[up.output[0]]
    base_out = next(name for name in join.input if name != up.output[0])
    base = producers.get(base_out)
    if up.op_type != "MatMul" or join.op_type != "Add" or base is None or base.op_type != "MatMul":
        raise ExportError(f"unexpected graph around the low-rank branch of {module}; export with --no-optimize")
    return Branch(module, down, up, join, base_out)


def _scope_module(node_name: str) -> str:
    # TorchScript names a node "/<scope>/<Op>", the scope being the called modules' names joined by "/".
    scope = node_name.split(f"/{BRANCH_NAME}/")[0]
    return scope.strip("/").replace("/", ".")


def label_branches(model: onnx.ModelProto, names: dict[str, str]) -> list[Branch]:
    """Name each branch's nodes after its module ("adalora_branch:<module>/down|up|add"), so that the
    graph itself says which module each branch belongs to.

    Args:
        model: a freshly exported factored graph (TorchScript node names).
        names: module path in the exported module -> the name to label with (the checkpoint's path);
            every one must have exactly one branch, and no other branch may exist.

    Returns:
        The branches, in graph order.
    """
    graph = model.graph
    in_branch = [n for n in graph.node if f"/{BRANCH_NAME}/" in n.name and n.op_type == "MatMul"]
    inner = {out for n in in_branch for out in n.output}
    downs = [n for n in in_branch if n.input[0] not in inner]  # the up MatMul reads the down's output
    found = [_branch_from_down(graph, down, _scope_module(down.name)) for down in downs]
    counts = Counter(b.module for b in found)
    if set(counts) != set(names) or any(count != 1 for count in counts.values()):
        raise ExportError(
            f"low-rank branches in the graph ({sorted(counts)}) do not match the adapted modules "
            f"({sorted(names)}); export with --mode merged and report this"
        )
    _read_weights_directly(graph, [node for b in found for node in (b.down, b.up)])
    for b in found:
        b.module = names[b.module]
        b.down.name, b.up.name, b.join.name = (f"{LABEL_PREFIX}{b.module}/{part}" for part in ("down", "up", "add"))
    return found


def _read_weights_directly(graph: onnx.GraphProto, nodes: list[NodeProto]) -> None:
    """Point `nodes` at initializers instead of Identity copies of them.

    TorchScript stores equal initializers once and gives the other users an Identity of it (two
    rank-0 modules of an unpruned export have equal all-zero P'). ONNX Runtime's optimizer drops an
    Identity once a detached branch no longer reads it, so the branches read the initializer itself.
    """
    producers = _producers(graph)
    for node in nodes:
        for i, name in enumerate(node.input):
            while name in producers and producers[name].op_type == "Identity":
                name = producers[name].input[0]
            node.input[i] = name
    read = {name for n in graph.node for name in n.input} | {o.name for o in graph.output}
    for node in [n for n in graph.node if n.op_type == "Identity" and n.output[0] not in read]:
        graph.node.remove(node)


def branches(model: onnx.ModelProto) -> list[Branch]:
    """The labelled branches of a factored graph (see `label_branches`), in graph order."""
    graph = model.graph
    downs = [n for n in graph.node if n.name.startswith(LABEL_PREFIX) and n.name.endswith("/down")]
    return [_branch_from_down(graph, d, d.name[len(LABEL_PREFIX): -len("/down")]) for d in downs]


def _rename_input(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
    for out in graph.output:
        if out.name == old:
            raise ExportError(f"a low-rank branch feeds the graph output {old!r} directly; export with --no-optimize")


@dataclass
class DetachedBranches:
    """Branches taken out of a graph, with the initializers only they use."""

    branches: list[Branch]
    initializers: list[onnx.TensorProto]


def detach_branches(model: onnx.ModelProto) -> DetachedBranches:
    """Remove every labelled branch; consumers of each join read the base MatMul's output again."""
    graph = model.graph
    found = branches(model)
    for b in found:
        _rename_input(graph, b.join.output[0], b.base_out)
        for node in (b.down, b.up, b.join):
            graph.node.remove(node)
    used = {name for node in graph.node for name in node.input}
    own = {name for b in found for name in b.initializers} - used
    inits = [t for t in graph.initializer if t.name in own]
    for t in inits:
        graph.initializer.remove(t)
    return DetachedBranches(found, inits)


def reattach_branches(model: onnx.ModelProto, detached: DetachedBranches) -> None:
    """Put each branch back on its base MatMul's output; fusions may have renamed the MatMul's input."""
    graph = model.graph
    producers = _producers(graph)
    for b in detached.branches:
        base = producers.get(b.base_out)
        if base is None or base.op_type != "MatMul":
            raise ExportError(f"the optimizer removed the base MatMul of {b.module}; export with --no-optimize")
        b.down.input[0] = base.input[0]  # the branch reads what the base MatMul reads
        _rename_input(graph, b.base_out, b.join.output[0])
        b.join.input[:] = [b.base_out, b.up.output[0]]
        graph.node.extend([b.down, b.up, b.join])
    graph.initializer.extend(detached.initializers)


def fusion_options(attention_op: str, fusions: FusionSpec):
    """ONNX Runtime's FusionOptions for the declared fusions and the mode's attention op."""
    from onnxruntime.transformers.fusion_options import FusionOptions

    options = FusionOptions("bert")
    options.use_raw_attention_mask(fusions.raw_attention_mask)
    options.enable_skip_layer_norm = fusions.skip_layer_norm
    options.enable_bias_skip_layer_norm = fusions.skip_layer_norm
    options.enable_bias_gelu = fusions.bias_gelu
    options.use_multi_head_attention = attention_op == "MultiHeadAttention"
    return options


def optimize(model: onnx.ModelProto, arch, config, attention_op: str, has_branches: bool,
             fusions: FusionSpec = FUSIONS):
    """Fuse `model` with ONNX Runtime's transformer optimizer (opt_level 1: only provider-independent
    rewrites, so the graph stays portable between CPU and GPU).

    Args:
        model: the exported graph (labelled branches if `has_branches`).
        arch: the architecture's optimizer declaration (adalora_deploy.architectures).
        config: the transformers config (heads, hidden size).
        attention_op: "Attention" or "MultiHeadAttention".
        has_branches: set the low-rank branches aside during fusion, then put them back.
        fusions: which fusions to apply (the declared default, or another for comparison).

    Returns:
        (the optimized ModelProto, fused-op counts).
    """
    from onnxruntime.transformers.optimizer import optimize_model

    detached = detach_branches(model) if has_branches else None
    optimized = optimize_model(
        model, model_type=arch.ort_model_type, num_heads=getattr(config, arch.num_heads_attr),
        hidden_size=getattr(config, arch.hidden_size_attr),
        optimization_options=fusion_options(attention_op, fusions),
        opt_level=1, use_gpu=False,
    )
    counts = optimized.get_fused_operator_statistics()
    if detached is not None:
        reattach_branches(optimized.model, detached)
        optimized.topological_sort()
    return optimized.model, {op: int(counts.get(op, 0)) for op in FUSED_OPS}


def residual_adds_as_sum(model: onnx.ModelProto) -> int:
    """Write each residual Add that feeds a LayerNormalization as the equivalent two-input Sum.

    Why: ONNX Runtime's session-time SkipLayerNormFusion matches Add -> LayerNormalization and, with
    the default session options every other loader uses (Optimum's ORTModel, a plain InferenceSession),
    swaps in its CPU SkipLayerNormalization kernel, which is slower than Add + LayerNormalization in
    onnxruntime 1.31 (docs/quantization.md). Sum computes the same values and is not matched, so the graph
    runs as fast wherever it is loaded. Only Adds of two activations are rewritten (bias Adds read
    an initializer and stay).

    Returns:
        The number of Adds rewritten.
    """
    graph = model.graph
    producers = _producers(graph)
    constants = {t.name for t in graph.initializer}
    count = 0
    for node in graph.node:
        if node.op_type != "LayerNormalization" or node.input[0] not in producers:
            continue
        add = producers[node.input[0]]
        if add.op_type == "Add" and add.domain in ("", "ai.onnx") and not constants.intersection(add.input):
            add.op_type = "Sum"
            count += 1
    return count


def to_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """fp16 weights and activations; int64 inputs and the float outputs keep their types."""
    from onnxruntime.transformers.onnx_model import OnnxModel

    wrapped = OnnxModel(model)
    wrapped.convert_float_to_float16(keep_io_types=True)
    return wrapped.model


def save(model: onnx.ModelProto, path: Path) -> None:
    """Write model.onnx; weights go to model.onnx_data beside it when the graph is over 2 GB."""
    external = model.ByteSize() > EXTERNAL_DATA_BYTES
    onnx.save_model(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=path.name + "_data")


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    return dict(sorted(Counter(node.op_type for node in model.graph.node).items()))


def branch_ranks(model: onnx.ModelProto) -> dict[str, int]:
    """Module path -> inner dimension of its branch (the rank the graph computes with)."""
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    return {b.module: int(shapes[b.initializers[0]][1]) for b in branches(model)}


def branch_params(model: onnx.ModelProto) -> int:
    """Elements of Q'^T and P'^T over all branches (a shared initializer counted per branch)."""
    sizes = {t.name: math.prod(t.dims) for t in model.graph.initializer}
    return sum(sizes[name] for b in branches(model) for name in b.initializers)
