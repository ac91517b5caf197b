"""`export --quantize int8`: ONNX Runtime's dynamic int8 graphs of a tiny model load (our Predictor,
Optimum's ORTModel), run, and predict what fp32 predicts; the accuracy gate refuses and writes
nothing; the manifest records the scheme and the figures, checked against independent predictions."""

import collections
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from adalora_deploy.cli import main
from adalora_deploy.exporters import ExportError, export
from adalora_deploy.exporters.graph import branches
from adalora_deploy.runtime import Predictor

from .conftest import EVAL_TEXTS as TEXTS

pytestmark = pytest.mark.slow
@pytest.fixture(scope="module")
def int8_root(tmp_path_factory, tiny_checkpoint, tiny_eval_csv) -> Path:
    # the tiny model is random: its accuracy means nothing, so the gate is opened wide here
    out = tmp_path_factory.mktemp("int8") / "onnx"
    return Path(export(tiny_checkpoint, out, prune_ranks=True, quantize="int8", eval_data=str(tiny_eval_csv),
                       max_accuracy_drop=100.0))


def _ops(path: Path) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


@pytest.mark.parametrize("mode", ["merged", "factored"])
def test_int8_export_runs_and_predicts_like_fp32(int8_root, tiny_export_root, mode):
    int8, fp32 = Predictor.from_pretrained(int8_root / mode), Predictor.from_pretrained(tiny_export_root / mode)
    assert int8.provider == "CPUExecutionProvider"
    a, b = int8.predict(TEXTS), fp32.predict(TEXTS)
    np.testing.assert_array_equal(a.label_ids, b.label_ids)
    assert not np.array_equal(a.logits, b.logits)  # really a different (quantized) graph
    np.testing.assert_allclose(a.logits, b.logits, atol=0.1)
    ops = _ops(int8_root / mode / "model.onnx")
    assert ops["MatMulInteger"] > 0 and ops["QEmbedLayerNormalization"] == 1
    if mode == "merged":
        assert ops["QAttention"] == 2 and ops["Attention"] == 0  # the fused attention kept, in int8
    else:  # the branches are quantized by default
        assert ops["MultiHeadAttention"] == 2
        assert not [n for n in onnx.load(str(int8_root / mode / "model.onnx")).graph.node
                    if n.name.startswith("adalora_branch:") and n.op_type == "MatMul"]


def test_factored_branches_can_stay_fp32(tmp_path, tiny_checkpoint, tiny_export_root, tiny_eval_csv):
    out = export(tiny_checkpoint, tmp_path / "onnx", mode="factored", prune_ranks=True, quantize="int8",
                 eval_data=str(tiny_eval_csv), max_accuracy_drop=100.0, quantize_branches=False)
    graph = onnx.load(str(out / "factored" / "model.onnx"))
    kept = [n for n in graph.graph.node if n.name.startswith("adalora_branch:") and n.op_type == "MatMul"]
    fp32_branches = branches(onnx.load(str(tiny_export_root / "factored" / "model.onnx")))
    assert len(kept) == 2 * len(fp32_branches) == 2 * 11  # every branch keeps its fp32 down/up (adapter 0: rank 0)
    assert _ops(out / "factored" / "model.onnx")["MatMulInteger"] > 0  # the base MatMuls are int8
    assert json.loads((out / "factored" / "adalora_manifest.json").read_text())["quantization"]["branches"] == "fp32"


def test_int8_export_loads_in_optimum(int8_root):
    from optimum.onnxruntime import ORTModelForSequenceClassification
    from transformers import AutoTokenizer

    model = ORTModelForSequenceClassification.from_pretrained(int8_root / "merged")
    tokens = AutoTokenizer.from_pretrained(int8_root / "merged")(TEXTS[:4], padding=True, return_tensors="pt")
    reference = Predictor.from_pretrained(int8_root / "merged").predict(TEXTS[:4])
    np.testing.assert_array_equal(model(**tokens).logits.argmax(-1).numpy(), reference.label_ids)


@pytest.mark.parametrize("mode", ["merged", "factored"])
def test_manifest_records_quantization_and_its_figures(int8_root, tiny_export_root, tiny_eval_csv, mode):
    q = json.loads((int8_root / mode / "adalora_manifest.json").read_text())["quantization"]
    assert (q["scheme"], q["tool"]) == ("int8", "onnxruntime.quantization.quantize_dynamic")
    assert q["branches"] == (None if mode == "merged" else "int8")
    assert q["int8_bytes"] == (int8_root / mode / "model.onnx").stat().st_size < q["fp32_bytes"]
    labels = np.array([i % 2 for i in range(len(TEXTS))])
    fp32 = Predictor.from_pretrained(tiny_export_root / mode).predict(TEXTS).label_ids
    int8 = Predictor.from_pretrained(int8_root / mode).predict(TEXTS).label_ids
    e = q["evaluation"]
    assert (e["examples"], e["data"], e["origin"]) == (len(TEXTS), str(tiny_eval_csv), "--eval-data")
    assert e["fp32_accuracy"] == pytest.approx(np.mean(fp32 == labels))
    assert e["int8_accuracy"] == pytest.approx(np.mean(int8 == labels))
    assert e["agreement"] == pytest.approx(np.mean(fp32 == int8))
    assert e["accuracy_drop_points"] == pytest.approx(100 * (e["fp32_accuracy"] - e["int8_accuracy"]))
    assert json.loads((tiny_export_root / mode / "adalora_manifest.json").read_text())["quantization"] is None


def test_accuracy_gate_refuses_and_writes_nothing(tmp_path, tiny_checkpoint, tiny_eval_csv, capsys):
    out = tmp_path / "refused"
    code = main(["export", str(tiny_checkpoint), "--out", str(out), "--mode", "merged", "--quantize", "int8",
                 "--eval-data", str(tiny_eval_csv), "--max-accuracy-drop", "-1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not out.exists()
    assert err[-1].startswith("error: merged: int8 accuracy ") and "--max-accuracy-drop -1" in err[-1]
    assert f"on {len(TEXTS)} examples" in err[-1] and "agreement" in err[-1]


def test_int8_without_known_eval_data_is_refused(tmp_path, tiny_checkpoint):
    # the tiny checkpoint records no training data, so there is no held-out split to fall back on
    with pytest.raises(ExportError, match="pass --eval-data FILE"):
        export(tiny_checkpoint, tmp_path / "out", mode="merged", quantize="int8")
    assert not (tmp_path / "out").exists()


def test_int8_flags_need_quantize_and_fp32(tmp_path, tiny_checkpoint, tiny_eval_csv):
    with pytest.raises(ExportError, match="drop --dtype fp16"):
        export(tiny_checkpoint, tmp_path / "a", quantize="int8", dtype="fp16", eval_data=str(tiny_eval_csv))
    with pytest.raises(ExportError, match="add --quantize int8"):
        export(tiny_checkpoint, tmp_path / "b", eval_data=str(tiny_eval_csv))


def test_serve_runs_an_int8_export_without_extra_flags(int8_root):
    """`adalora-deploy serve` on the int8 export root, provider left at auto: CPU, same labels as the Predictor."""
    import subprocess

    import httpx

    from .test_server import free_port, start_serve, wait_until_healthy

    port = free_port()
    proc = start_serve(int8_root, port, "--log-level", "warning", stdout=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(proc, url)
        health = httpx.get(f"{url}/health", timeout=5)
        assert health.json()["provider"] == "CPUExecutionProvider"
        got = httpx.post(f"{url}/v1/predict", json={"inputs": TEXTS[:3]}, timeout=30).json()["predictions"]
        want = Predictor.from_pretrained(int8_root / "merged").predict(TEXTS[:3]).labels
        assert [g["label"] for g in got] == want
        assert httpx.get(f"{url}/metadata", timeout=5).json()["quantization"]["scheme"] == "int8"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
