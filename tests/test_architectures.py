"""Every row of the architecture table, end to end on tiny random models built from configs: train a few
steps through `train()` with string labels, export merged and factored with --prune-ranks for
sequence classification and feature extraction, and compare ONNX Runtime with the IN-MEMORY trained
model (not only with a reload), then load each export in its ORTModel class and pipeline."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from adalora_deploy.architectures import ARCHITECTURES

from .tiny_decoders import bpe_tokenizer

pytestmark = pytest.mark.slow
ATOL = 1e-4
LABELS = ("negative", "neutral", "positive")
TEXTS = ["the quick brown fox", "a tiny model learns to count", "hello world, this is a small corpus",
         "red green blue yellow", "monday tuesday wednesday", "what colour is the sky? blue"]
SENTENCES = ["hello world", "the quick brown fox jumps over the lazy dog, then sleeps"]

_SMALL = dict(vocab_size=300, max_position_embeddings=128)
_DECODER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=64, **_SMALL)
CONFIGS = {
    "bert": ("BertConfig", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, **_SMALL)),
    "roberta": ("RobertaConfig", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                      vocab_size=300, max_position_embeddings=130, pad_token_id=1)),
    "distilbert": ("DistilBertConfig", dict(dim=32, n_layers=2, n_heads=4, hidden_dim=64, **_SMALL)),
    # DeBERTaV3: relative attention, no absolute positions, no token types.
    "deberta-v2": ("DebertaV2Config", dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, type_vocab_size=0,
        relative_attention=True, position_buckets=32, pos_att_type=["p2c", "c2p"], position_biased_input=False,
        norm_rel_ebd="layer_norm", share_att_key=True, **_SMALL)),
    "gpt2": ("GPT2Config", dict(n_embd=32, n_layer=2, n_head=4, n_positions=128, vocab_size=300)),
    "llama": ("LlamaConfig", _DECODER),
    "mistral": ("MistralConfig", _DECODER),
    "qwen2": ("Qwen2Config", _DECODER),
    "phi3": ("Phi3Config", dict(_DECODER, pad_token_id=None)),
}


def test_every_row_has_a_tiny_config():
    assert set(CONFIGS) == set(ARCHITECTURES)


def _save_base(path: Path, model_type: str) -> Path:
    """The bare base model (AutoModel, no head) with a byte-level BPE tokenizer that has EOS, no pad."""
    import transformers

    tokenizer = bpe_tokenizer()
    class_name, kwargs = CONFIGS[model_type]
    eos = tokenizer.eos_token_id
    config = getattr(transformers, class_name)(**{**kwargs, "eos_token_id": eos, "bos_token_id": eos})
    torch.manual_seed(0)
    transformers.AutoModel.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _write_data(path: Path) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(24):
            writer.writerow([TEXTS[i % len(TEXTS)], LABELS[i % 3]])
    return path


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def trained(request, tmp_path_factory):
    """(model_type, TrainResult, export root of both tasks) for one row, built once per module."""
    from adalora_deploy.exporters import export
    from adalora_deploy.training import train

    model_type = request.param
    root = tmp_path_factory.mktemp(model_type)
    base = _save_base(root / "base", model_type)
    result = train(model=str(base), data=str(_write_data(root / "data.csv")), steps=6, batch_size=4, max_length=16,
                   init_r=4, target_r=2, tinit=1, tfinal=2, delta_t=1, lr=5e-2, out=str(root / "ckpt"), progress=False)
    result.model.eval()
    exports = {task: export(root / "ckpt", root / task, mode="both", prune_ranks=True, task=task)
               for task in ("sequence-classification", "feature-extraction")}
    return model_type, result, exports


def _batch(model_dir: Path) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))


def test_newly_initialised_modules_are_trained_and_saved(trained):
    model_type, result, _ = trained
    assert result.model.modules_to_save == list(ARCHITECTURES[model_type].new_modules)
    for name in result.model.modules_to_save:
        assert all(p.requires_grad for p in result.model.model.get_submodule(name).parameters())
    meta = json.loads((result.checkpoint / "adalora_config.json").read_text())
    assert meta["modules_to_save"] == result.model.modules_to_save
    assert meta["id2label"] == {str(i): name for i, name in enumerate(LABELS)}
    # the tokenizer has no pad token: the config's pad id, else EOS pads; recorded in the checkpoint
    assert meta["pad_token"]["id"] == meta["pad_token_id"] == result.model.model.config.pad_token_id is not None
    assert meta["pad_token"]["is_eos"] == (model_type != "roberta")  # the RoBERTa config brings pad id 1


@pytest.mark.parametrize("task", ["sequence-classification", "feature-extraction"])
@pytest.mark.parametrize("mode", ["merged", "factored"])
def test_onnx_matches_the_in_memory_trained_model(trained, task, mode):
    import onnxruntime as ort

    model_type, result, exports = trained
    model_dir = exports[task] / mode
    manifest = json.loads((model_dir / "adalora_manifest.json").read_text())
    assert manifest["pruned"] and manifest["reload_fingerprint"]["max_abs_diff"] <= 1e-5
    row = ARCHITECTURES[model_type]
    assert manifest["optimized"] == (row.fusion is not None)
    assert manifest["fusion_skipped"] == row.no_fusion
    config = json.loads((model_dir / "config.json").read_text())
    module = result.model.model if task == "sequence-classification" else result.model.model.base_model
    assert config["architectures"] == [type(module).__name__]
    batch = _batch(model_dir)
    session = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    if "position_ids" in names:
        batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    output = "logits" if task == "sequence-classification" else "last_hidden_state"
    got = session.run([output], {k: v.numpy() for k, v in batch.items() if k in names})[0]
    with torch.no_grad():
        want = getattr(module(**{k: v for k, v in batch.items() if k in names}), output).numpy()
    if task == "feature-extraction":  # padded positions are never used
        keep = batch["attention_mask"].numpy()[..., None] == 1
        got, want = np.where(keep, got, 0), np.where(keep, want, 0)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("mode", ["merged", "factored"])
def test_ortmodel_and_pipeline_load_each_export(trained, mode):
    from optimum.onnxruntime import ORTModelForFeatureExtraction, ORTModelForSequenceClassification
    from transformers import AutoTokenizer, pipeline

    _, result, exports = trained
    classify_dir, extract_dir = exports["sequence-classification"] / mode, exports["feature-extraction"] / mode
    classifier = ORTModelForSequenceClassification.from_pretrained(classify_dir, provider="CPUExecutionProvider")
    classify = pipeline("text-classification", model=classifier, tokenizer=AutoTokenizer.from_pretrained(classify_dir))
    single = AutoTokenizer.from_pretrained(classify_dir)(SENTENCES[0], return_tensors="pt")
    with torch.no_grad():
        probs = result.model.model(**single).logits.softmax(-1)[0]
    answer = classify(SENTENCES[0])[0]
    assert answer["label"] == LABELS[int(probs.argmax())]
    assert answer["score"] == pytest.approx(float(probs.max()), abs=1e-4)
    extractor = ORTModelForFeatureExtraction.from_pretrained(extract_dir, provider="CPUExecutionProvider")
    extract = pipeline("feature-extraction", model=extractor, tokenizer=AutoTokenizer.from_pretrained(extract_dir))
    hidden = np.asarray(extract(SENTENCES[0]))[0]  # (T, H)
    with torch.no_grad():
        want = result.model.model.base_model(**AutoTokenizer.from_pretrained(extract_dir)(
            SENTENCES[0], return_tensors="pt")).last_hidden_state[0].numpy()
    np.testing.assert_allclose(hidden, want, atol=ATOL, rtol=0)
