"""`adalora-deploy export`: directories that Optimum's ORTModel classes and transformers pipelines load,
parity with PyTorch, the manifest, fp16, the CLI, and bad input (clear error, exit 2, nothing written)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from adalora_deploy.cli import main
from adalora_deploy.exporters import ExportValidationError, export
from adalora_deploy.io import file_sha256
from adalora_deploy.model import AdaLoraModel
from adalora_deploy.ort import cuda_status

from .conftest import ID2LABEL, make_checkpoint, save_tiny_bert

pytestmark = pytest.mark.slow
SENTENCES = ["a quietly devastating film", "the plot never comes together and the jokes fall flat, again"]


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    return AdaLoraModel.from_pretrained(tiny_checkpoint).eval()


def _tokenize(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)(SENTENCES, padding=True, return_tensors="pt")


@pytest.mark.parametrize("mode", ["merged", "factored"])
def test_ortmodel_loads_each_mode_and_matches_pytorch(tiny_export_root, reference, mode):
    from optimum.onnxruntime import ORTModelForSequenceClassification

    model_dir = tiny_export_root / mode
    ort_model = ORTModelForSequenceClassification.from_pretrained(model_dir, provider="CPUExecutionProvider")
    batch = _tokenize(model_dir)  # right padding: the second sentence is longer
    with torch.no_grad():
        want = reference(**batch).logits
    got = ort_model(**batch).logits
    torch.testing.assert_close(torch.as_tensor(got), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("mode", ["merged", "factored"])
def test_each_mode_runs_in_a_pipeline(tiny_export_root, reference, mode):
    from optimum.onnxruntime import ORTModelForSequenceClassification
    from transformers import AutoTokenizer, pipeline

    model_dir = tiny_export_root / mode
    ort_model = ORTModelForSequenceClassification.from_pretrained(model_dir, provider="CPUExecutionProvider")
    classify = pipeline("text-classification", model=ort_model, tokenizer=AutoTokenizer.from_pretrained(model_dir))
    results = classify(SENTENCES)
    with torch.no_grad():
        probs = reference(**_tokenize(model_dir)).logits.softmax(-1)
    for result, p in zip(results, probs, strict=True):
        assert result["label"] == ID2LABEL[int(p.argmax())]
        assert result["score"] == pytest.approx(float(p.max()), abs=1e-4)


def test_manifest_describes_the_export(tiny_export_root, tiny_checkpoint):
    for mode in ("merged", "factored"):
        d = tiny_export_root / mode
        assert {"model.onnx", "config.json", "tokenizer.json", "adalora_manifest.json"} <= {p.name for p in d.iterdir()}
        m = json.loads((d / "adalora_manifest.json").read_text())
        assert (m["mode"], m["dtype"], m["task"], m["pruned"], m["optimized"]) == (
            mode, "fp32", "sequence-classification", True, True)
        assert m["opset"] >= 17
        files = m["source"]["files"]
        assert files["adapter.safetensors"] == file_sha256(tiny_checkpoint / "adapter.safetensors")
        assert files["adalora_config.json"] == file_sha256(tiny_checkpoint / "adalora_config.json")
        assert {"torch", "transformers", "optimum", "onnx"} <= set(m["versions"])
        parity = m["validation"]["parity"]
        assert parity["onnx_vs_pytorch"]["max_abs_diff"] <= 1e-4 and parity["onnx_vs_pytorch"]["atol"] == 1e-4
        assert parity["pruned_vs_unpruned_pytorch"]["max_abs_diff"] <= 1e-5
        assert parity["merged_vs_factored"]["max_abs_diff"] <= 1e-4
        paddings = {c["padding"] for c in parity["onnx_vs_pytorch"]["cases"]}
        assert paddings == {"none", "right", "left"}
        assert json.loads((d / "config.json").read_text())["id2label"] == {str(k): v for k, v in ID2LABEL.items()}


def test_feature_extraction_export(tmp_path, tiny_checkpoint, reference):
    from optimum.onnxruntime import ORTModelForFeatureExtraction
    from transformers import AutoTokenizer, pipeline

    out = export(tiny_checkpoint, tmp_path / "fe", task="feature-extraction", prune_ranks=True)
    batch = _tokenize(out / "merged")
    with torch.no_grad():
        want = reference.model.bert(**batch).last_hidden_state
    for mode in ("merged", "factored"):
        ort_model = ORTModelForFeatureExtraction.from_pretrained(out / mode, provider="CPUExecutionProvider")
        got = torch.as_tensor(ort_model(**batch).last_hidden_state)
        valid = batch["attention_mask"].bool()
        torch.testing.assert_close(got[valid], want[valid], atol=1e-4, rtol=0)
        extract = pipeline("feature-extraction", model=ort_model, tokenizer=AutoTokenizer.from_pretrained(out / mode))
        features = np.asarray(extract(SENTENCES[0])[0])  # (T, hidden)
        assert features.shape == (int(valid[0].sum()), reference.model.config.hidden_size)
        assert json.loads((out / mode / "adalora_manifest.json").read_text())["task"] == "feature-extraction"


def test_fp16_export_is_fp16_and_validated(tmp_path, tiny_checkpoint, reference):
    import onnx
    import onnxruntime as ort

    out = export(tiny_checkpoint, tmp_path / "fp16", dtype="fp16", prune_ranks=True)
    ids = _tokenize(out / "merged")
    with torch.no_grad():
        want = reference(**ids).logits.numpy()
    for mode in ("merged", "factored"):
        graph = onnx.load(str(out / mode / "model.onnx"))
        float_types = {t.data_type for t in graph.graph.initializer if t.data_type in (1, 10)}
        assert float_types == {onnx.TensorProto.FLOAT16}
        m = json.loads((out / mode / "adalora_manifest.json").read_text())
        assert m["dtype"] == "fp16" and m["validation"]["parity"]["onnx_vs_pytorch"]["atol"] == 5e-2
        if m["validation"]["provider"] == "CPUExecutionProvider":
            assert "CPU provider" in m["validation"]["note"]  # says what was (not) exercised
            assert cuda_status()[1] in m["validation"]["note"]  # and why: the reason serving gives too
        session = ort.InferenceSession(str(out / mode / "model.onnx"), providers=["CPUExecutionProvider"])
        got = session.run(["logits"], {k: v.numpy() for k, v in ids.items()})[0]
        assert np.abs(got - want).max() <= 5e-2


def test_cli_writes_only_the_asked_mode(tmp_path, tiny_checkpoint, capsys):
    out = tmp_path / "cli"
    assert main(["export", str(tiny_checkpoint), "--out", str(out), "--mode", "merged", "--no-optimize"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["merged"]
    manifest = json.loads((out / "merged" / "adalora_manifest.json").read_text())
    assert manifest["optimized"] is False and manifest["pruned"] is False
    assert "[export]" in capsys.readouterr().err  # progress lines


def test_validation_failures_are_collected_into_one_error(tmp_path, tiny_checkpoint, monkeypatch):
    """With zero tolerance every ONNX Runtime vs PyTorch comparison fails: one error lists them all."""
    from adalora_deploy.exporters import onnx_export, specs

    monkeypatch.setitem(specs.DTYPES, "fp32", specs.DtypeSpec("fp32", atol=0.0, float16=False))
    monkeypatch.setattr(onnx_export, "CROSS_MODE_ATOL", 0.0)
    with pytest.raises(ExportValidationError) as err:
        export(tiny_checkpoint, tmp_path / "out", prune_ranks=True)
    failures = err.value.failures
    assert any(f.startswith("merged: ONNX Runtime vs PyTorch") for f in failures)
    assert any(f.startswith("factored: ONNX Runtime vs PyTorch") for f in failures)
    assert len(failures) >= 2 and str(len(failures)) in str(err.value)
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary directory left


# -- bad input: clear error, exit 2, no partial output ------------------------------------------------


def _truncate(ckpt: Path) -> None:
    f = ckpt / "adapter.safetensors"
    f.write_bytes(f.read_bytes()[:300])


def _drop_weights(ckpt: Path) -> None:
    (ckpt / "adapter.safetensors").unlink()


def _drop_config(ckpt: Path) -> None:
    (ckpt / "adalora_config.json").unlink()


def _lora_adapter(ckpt: Path) -> None:
    (ckpt / "adalora_config.json").unlink()
    (ckpt / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16}))


@pytest.mark.parametrize(
    ("break_it", "extra", "message"),
    [
        (_truncate, [], "corrupt or truncated"),
        (_drop_weights, [], "adapter weights not found"),
        (_drop_config, [], "neither an adalora-deploy checkpoint"),
        (_lora_adapter, [], "only AdaLoRA adapters"),
        (None, ["--task", "translation"], "unknown task 'translation'"),
        (None, ["--task", "token-classification"], "has no token-classification head"),
        (None, ["--opset", "13"], "--opset 13 is too old"),
        (None, ["--base", "WIDER"], "does not match its base model"),
    ],
)
def test_bad_input_is_refused_without_output(tmp_path, tiny_bert_dir, capsys, break_it, extra, message):
    ckpt = tmp_path / "ckpt"
    make_checkpoint(ckpt, tiny_bert_dir)
    if break_it is not None:
        break_it(ckpt)
    if "WIDER" in extra:
        extra = ["--base", str(save_tiny_bert(tmp_path / "wider", hidden_size=48))]
    out = tmp_path / "out"
    assert main(["export", str(ckpt), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert "error: " in err and message in err and "Traceback" not in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temporary directory


def test_non_empty_out_is_kept_unless_overwrite(tmp_path, tiny_checkpoint, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    assert main(["export", str(tiny_checkpoint), "--out", str(out), "--mode", "merged", "--no-optimize"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert main(["export", str(tiny_checkpoint), "--out", str(out), "--mode", "merged", "--no-optimize",
                 "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["merged"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
