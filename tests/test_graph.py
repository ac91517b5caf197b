"""The exported graphs themselves: a branch per module with the module's effective rank as inner
dimension, no dense delta beside W0, rank-0 modules without a branch, the merged graph's operators
equal to the plain base model's export, and the manifest equal to the graph.

Expected values come from the checkpoint file itself (`tiny_checkpoint`: init_r 4; adapters 0, 1, 2
at ranks 0, 1, 3; the others at 4), never from the exporter's own figures."""

import json
import math
from collections import Counter
from pathlib import Path

import onnx
import pytest
import torch
from safetensors.torch import load_file

from adalora_deploy.architectures import ARCHITECTURES
from adalora_deploy.exporters import export
from adalora_deploy.exporters import graph as graphs

from .conftest import ID2LABEL, make_checkpoint

pytestmark = pytest.mark.slow
PREFIX = "adalora_branch:"


@pytest.fixture(scope="module")
def expected(tiny_checkpoint) -> dict[str, dict]:
    """Per module from adapter.safetensors: d_in, d_out, effective rank, mask, init_r."""
    state = load_file(str(tiny_checkpoint / "adapter.safetensors"))
    names = [k[: -len(".mask")] for k in state if k.endswith(".mask")]
    return {
        n: {"d_out": state[f"{n}.P"].shape[0], "d_in": state[f"{n}.Q"].shape[1], "mask": state[f"{n}.mask"],
            "rank": int(state[f"{n}.mask"].sum()), "init_r": state[f"{n}.mask"].numel()}
        for n in names
    }


@pytest.fixture(scope="module")
def unoptimized_root(tmp_path_factory, tiny_checkpoint) -> Path:
    return export(tiny_checkpoint, tmp_path_factory.mktemp("noopt") / "onnx", prune_ranks=True, optimize=False)


@pytest.fixture(scope="module")
def unpruned_root(tmp_path_factory, tiny_checkpoint) -> Path:
    return export(tiny_checkpoint, tmp_path_factory.mktemp("unpruned") / "onnx", mode="factored")


@pytest.fixture(scope="module")
def plain(tmp_path_factory, tiny_bert_dir, tiny_export_root) -> dict[str, onnx.ModelProto]:
    """Optimum's plain export of the base model with a fresh head, and the same ORT fusions and passes applied."""
    from optimum.exporters.onnx import onnx_export_from_model
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=len(ID2LABEL)).eval()
    opset = json.loads((tiny_export_root / "merged" / "adalora_manifest.json").read_text())["opset"]
    out = tmp_path_factory.mktemp("plain")
    onnx_export_from_model(model, output=out, task="text-classification", opset=opset, do_validation=False)
    unoptimized = onnx.load(str(out / "model.onnx"))
    fused, _ = graphs.optimize(onnx.load(str(out / "model.onnx")), ARCHITECTURES["bert"].fusion, model.config,
                               "Attention", has_branches=False)
    for graph in (unoptimized, fused):
        graphs.residual_adds_as_sum(graph)  # as the export does for fp32 graphs
    return {"unoptimized": unoptimized, "optimized": fused}


def _graphs(**roots) -> dict:
    return {name: onnx.load(str(root / "factored" / "model.onnx")) for name, root in roots.items()}


def _dims(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    return {t.name: tuple(t.dims) for t in model.graph.initializer}


def _branch_nodes(model: onnx.ModelProto, module: str) -> dict[str, onnx.NodeProto]:
    return {n.name.rsplit("/", 1)[1]: n for n in model.graph.node if n.name.startswith(f"{PREFIX}{module}/")}


def _check_branch(model: onnx.ModelProto, module: str, d_in: int, d_out: int, rank: int) -> None:
    nodes = _branch_nodes(model, module)
    assert set(nodes) == {"down", "up", "add"}, module
    down, up, add = nodes["down"], nodes["up"], nodes["add"]
    dims = _dims(model)
    assert (down.op_type, up.op_type, add.op_type) == ("MatMul", "MatMul", "Add")
    assert dims[down.input[1]] == (d_in, rank) and dims[up.input[1]] == (rank, d_out)  # inner dim = rank
    assert up.input[0] == down.output[0] and up.output[0] in add.input
    base = next(n for n in model.graph.node if n.output[0] in add.input and n is not up)
    assert base.op_type == "MatMul" and dims[base.input[1]] == (d_in, d_out)  # W0, as (d_in, d_out)
    assert base.input[0] == down.input[0]  # the branch reads the base MatMul's input
    readers = [n for n in model.graph.node if base.output[0] in n.input]
    assert readers == [add]  # every consumer of x @ W0 now sees x @ W0 + branch


@pytest.mark.parametrize("which", ["optimized", "unoptimized"])
def test_factored_branch_per_module_has_its_effective_rank(which, tiny_export_root, unoptimized_root, expected):
    model = _graphs(optimized=tiny_export_root, unoptimized=unoptimized_root)[which]
    for module, e in expected.items():
        if e["rank"] == 0:
            assert _branch_nodes(model, module) == {}, f"{module} has rank 0 but a branch"
        else:
            _check_branch(model, module, e["d_in"], e["d_out"], e["rank"])
    assert sorted(e["rank"] for e in expected.values())[:3] == [0, 1, 3]


def test_unpruned_factored_keeps_all_triplets_zeros_included(unpruned_root, expected):
    model = _graphs(unpruned=unpruned_root)["unpruned"]
    values = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    for module, e in expected.items():
        _check_branch(model, module, e["d_in"], e["d_out"], e["init_r"])
        up = values[_branch_nodes(model, module)["up"].input[1]]  # P'^T: (r, d_out), row i = s lam_i P[:, i]
        masked = (~e["mask"]).nonzero().flatten().tolist()
        assert (up[masked] == 0).all() and (abs(up[e["mask"].nonzero().flatten().tolist()]).sum(axis=1) > 0).all()


def _dense_counts(model: onnx.ModelProto, shapes: set[tuple[int, int]]) -> Counter:
    tensors = list(model.graph.initializer)
    tensors += [a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    return Counter(tuple(t.dims) for t in tensors if tuple(t.dims) in shapes)


@pytest.mark.parametrize("which", ["optimized", "unoptimized", "unpruned"])
def test_no_dense_delta_beside_w0(which, tiny_export_root, unoptimized_root, unpruned_root, plain, expected):
    model = _graphs(optimized=tiny_export_root, unoptimized=unoptimized_root, unpruned=unpruned_root)[which]
    shapes = {s for e in expected.values() for s in ((e["d_in"], e["d_out"]), (e["d_out"], e["d_in"]))}
    # the plain export holds exactly the base model's weights of these shapes (MatMul W0^T, pooler Gemm)
    assert _dense_counts(model, shapes) == _dense_counts(plain["unoptimized"], shapes)


@pytest.mark.parametrize("which", ["optimized", "unoptimized"])
def test_merged_graph_has_the_plain_base_models_operators(which, tiny_export_root, unoptimized_root, plain):
    root = {"optimized": tiny_export_root, "unoptimized": unoptimized_root}[which]
    merged = onnx.load(str(root / "merged" / "model.onnx"))
    assert graphs.op_counts(merged) == graphs.op_counts(plain[which])


@pytest.mark.parametrize("which", ["optimized", "unoptimized", "unpruned"])
def test_manifest_matches_the_graph(which, tiny_export_root, unoptimized_root, unpruned_root, expected):
    root = {"optimized": tiny_export_root, "unoptimized": unoptimized_root, "unpruned": unpruned_root}[which]
    model = onnx.load(str(root / "factored" / "model.onnx"))
    manifest = json.loads((root / "factored" / "adalora_manifest.json").read_text())
    dims = _dims(model)
    graph_rank = {m: dims[n["down"].input[1]][1] for m in expected if (n := _branch_nodes(model, m))}
    assert manifest["ranks_after"] == {m: graph_rank.get(m, 0) for m in expected}
    assert manifest["ranks_before"] == {m: e["init_r"] for m, e in expected.items()}
    assert {m: v["rank_in_graph"] for m, v in manifest["modules"].items()} == {m: graph_rank.get(m) for m in expected}
    per_triplet = {m: e["d_in"] + e["d_out"] + 1 for m, e in expected.items()}
    assert manifest["adapter_params_before"] == sum(e["init_r"] * per_triplet[m] for m, e in expected.items())
    assert manifest["adapter_params_after"] == sum(graph_rank.get(m, 0) * per_triplet[m] for m in expected)
    branch_tensors = [n[k].input[1] for m in graph_rank for n in [_branch_nodes(model, m)] for k in ("down", "up")]
    assert manifest["graph"]["branch_params"] == sum(math.prod(dims[t]) for t in branch_tensors)
    assert manifest["graph"]["branches"] == len(graph_rank)
    assert manifest["pruned"] is (which != "unpruned")


def test_fused_op_counts_are_the_graphs(tiny_export_root, unoptimized_root):
    num_layers = 2
    attention = {"merged": "Attention", "factored": "MultiHeadAttention"}
    for mode, op in attention.items():
        model = onnx.load(str(tiny_export_root / mode / "model.onnx"))
        fused = json.loads((tiny_export_root / mode / "adalora_manifest.json").read_text())["graph"]["fused_ops"]
        assert fused == {k: graphs.op_counts(model).get(k, 0) for k in fused}
        assert fused[op] == num_layers and fused["BiasGelu"] == num_layers and fused["EmbedLayerNormalization"] == 1
        unfused = json.loads((unoptimized_root / mode / "adalora_manifest.json").read_text())
        assert unfused["graph"]["fused_ops"] is None and unfused["optimized"] is False


def test_factored_and_merged_graphs_agree_with_pytorch(tiny_export_root, unpruned_root, tiny_checkpoint):
    """The graphs run: ONNX Runtime on all three graphs against the checkpoint's PyTorch model."""
    import onnxruntime as ort

    from adalora_deploy.model import AdaLoraModel

    model = AdaLoraModel.from_pretrained(tiny_checkpoint).eval()
    ids = torch.randint(1, 30522, (2, 10))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "token_type_ids": torch.zeros_like(ids).numpy()}
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits.numpy()
    for path in (tiny_export_root / "merged", tiny_export_root / "factored", unpruned_root / "factored"):
        session = ort.InferenceSession(str(path / "model.onnx"), providers=["CPUExecutionProvider"])
        got = session.run(["logits"], feeds)[0]
        assert abs(got - want).max() <= 1e-4, path


def test_equal_branch_weights_stored_once_still_export(tmp_path, tiny_bert_dir):
    """Unpruned, three rank-0 modules have equal all-zero P'^T: TorchScript stores it once (plus
    Identity copies); the fused factored graph must still carry a branch per module and validate."""
    ckpt = tmp_path / "ckpt"
    make_checkpoint(ckpt, tiny_bert_dir, ranks={0: 0, 1: 0, 2: 0})
    root = export(ckpt, tmp_path / "onnx", mode="factored")  # optimized and validated by default
    model = onnx.load(str(root / "factored" / "model.onnx"))
    ups = [_branch_nodes(model, m)["up"].input[1] for m in
           ("bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.attention.self.key",
            "bert.encoder.layer.0.attention.self.value")]
    assert len(set(ups)) == 1 and ups[0] in _dims(model)  # one shared initializer, read directly
    assert json.loads((root / "factored" / "adalora_manifest.json").read_text())["graph"]["branches"] == 12
