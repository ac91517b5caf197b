"""Label names from the data reach every answer: integer labels become LABEL_0.. (as transformers names
them), string labels stay as they are; the checkpoint, every exported config.json, the Predictor, a
served answer over HTTP and a transformers pipeline all give the same names."""

from __future__ import annotations

import csv
import json

import pytest

from adalora_deploy.runtime import Predictor
from adalora_deploy.runtime.server import ServerConfig, create_app

from .test_architectures import TEXTS, _save_base
from .test_server import free_port, serving

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("model_type, labels, names", [
    ("bert", ["0", "1", "2"], ["LABEL_0", "LABEL_1", "LABEL_2"]),
    ("gpt2", ["sad", "calm", "glad"], ["calm", "glad", "sad"]),  # names in sorted order
])
def test_predictor_serve_and_pipeline_give_the_data_labels(tmp_path, model_type, labels, names):
    from optimum.onnxruntime import ORTModelForSequenceClassification
    from transformers import AutoTokenizer, pipeline

    from adalora_deploy.exporters import export
    from adalora_deploy.training import train

    data = tmp_path / "data.csv"
    with data.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows([TEXTS[i % len(TEXTS)], labels[i % 3]] for i in range(12))
    base = _save_base(tmp_path / "base", model_type)
    train(model=str(base), data=str(data), steps=3, batch_size=4, max_length=16, init_r=2, target_r=1, tinit=0,
          tfinal=1, out=str(tmp_path / "ckpt"), progress=False)
    meta = json.loads((tmp_path / "ckpt" / "adalora_config.json").read_text())
    assert list(meta["id2label"].values()) == names
    out = export(tmp_path / "ckpt", tmp_path / "onnx", mode="both", prune_ranks=True)
    for mode in ("merged", "factored"):
        config = json.loads((out / mode / "config.json").read_text())
        assert list(config["id2label"].values()) == names and config["label2id"] == {n: i for i, n in enumerate(names)}
        assert config["architectures"][0].endswith("ForSequenceClassification")

    predictor = Predictor.from_pretrained(out, provider="cpu")
    mine = predictor.predict(TEXTS).labels
    assert set(mine) <= set(names)
    server_config = ServerConfig(port=free_port())
    with serving(create_app(predictor, server_config), server_config) as client:
        served = [p["label"] for p in client.post("/v1/predict", json={"inputs": TEXTS}).json()["predictions"]]
    merged = out / "merged"
    classify = pipeline("text-classification", model=ORTModelForSequenceClassification.from_pretrained(merged),
                        tokenizer=AutoTokenizer.from_pretrained(merged))
    piped = [r["label"] for r in classify(TEXTS)]
    assert mine == served == piped
