"""Every row of the architecture table with the token-level tasks it supports: encoders with token
classification and question answering, decoders with causal LM. Each pair is trained a few steps
through `train()` (the table's default targets), exported merged and factored with --prune-ranks,
compared with the IN-MEMORY trained model, and loaded in its ORTModel class."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from adalora_deploy.architectures import ARCHITECTURES
from adalora_deploy.exporters import export
from adalora_deploy.runtime import Predictor
from adalora_deploy.training import train

from .test_architectures import _save_base
from .test_data import write_jsonl
from .test_token_tasks import ner_rows, qa_rows
from .tiny_decoders import prompt_rows

pytestmark = pytest.mark.slow
ATOL = 1e-4
PROMPTS = ["the quick brown fox", "red", "hello world, this is a small"]
ROWS = {"token-classification": ner_rows, "question-answering": qa_rows, "causal-lm": prompt_rows}
ORT_CLASSES = {"token-classification": "ORTModelForTokenClassification",
               "question-answering": "ORTModelForQuestionAnswering", "causal-lm": "ORTModelForCausalLM"}
PAIRS = [(t, task) for t, row in sorted(ARCHITECTURES.items())
         for task in (("causal-lm",) if row.is_decoder else ("token-classification", "question-answering"))]


@pytest.fixture(scope="module", params=PAIRS, ids=[f"{t}-{task}" for t, task in PAIRS])
def trained(request, tmp_path_factory):
    model_type, task = request.param
    root = tmp_path_factory.mktemp(f"{model_type}-{task}")
    base = _save_base(root / "base", model_type)
    data = write_jsonl(root / "data.jsonl", ROWS[task](16))
    # The byte-level BPE splits the QA rows into ~50 tokens: at 24 every answer would be cut off (refused).
    max_length = 64 if task == "question-answering" else 24
    result = train(model=str(base), data=data, task=task, steps=3, batch_size=4, max_length=max_length, init_r=4, target_r=2,
                   tinit=1, tfinal=1, lr=5e-2, out=str(root / "ckpt"), progress=False)
    return task, result.model.eval(), export(root / "ckpt", root / "onnx", prune_ranks=True)


def _encoder_batch(task: str, tokenizer) -> dict:
    if task == "question-answering":
        rows = qa_rows(2, seed=3)
        return dict(tokenizer([r["question"] for r in rows], [r["context"] for r in rows], padding=True,
                              return_tensors="pt"))
    return dict(tokenizer(["ada lovelace visited rome", "grace hopper visited paris today"], padding=True,
                          return_tensors="pt"))


def test_manifest_names_the_task_and_the_pruned_ranks(trained):
    task, model, root = trained
    for mode in ("merged", "factored"):
        manifest = json.loads((root / mode / "adalora_manifest.json").read_text())
        assert manifest["task"] == task and manifest["pruned"] is True
        assert sum(manifest["ranks_after"].values()) == sum(model.ranks().values())


@pytest.mark.parametrize("mode", ["merged", "factored"])
def test_export_matches_the_in_memory_model_and_loads_in_ortmodel(trained, mode):
    import optimum.onnxruntime
    from transformers import AutoTokenizer

    task, model, root = trained
    tokenizer = AutoTokenizer.from_pretrained(root / mode)
    ort_model = getattr(optimum.onnxruntime, ORT_CLASSES[task]).from_pretrained(root / mode)
    if task == "causal-lm":
        tokenizer.padding_side = "left"
        enc = tokenizer(PROMPTS, padding=True, return_tensors="pt", return_token_type_ids=False)
        kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        with torch.no_grad():
            want = model.model.generate(**enc, **kwargs)
        config = model.model.config
        if ort_model.num_key_value_heads != getattr(config, "num_key_value_heads", config.num_attention_heads):
            # Optimum 2.1's ORTModelForCausalLM assumes as many KV heads as attention heads for model types
            # outside its grouped-query list (phi3 among them); our Predictor reads the graph's shapes.
            with pytest.raises(Exception, match="past_key_values"):
                ort_model.generate(**enc, **kwargs)
        else:
            assert torch.equal(ort_model.generate(**enc, **kwargs), want)
        eos = tokenizer.eos_token_id
        got = Predictor.from_pretrained(root, mode=mode, provider="cpu").generate(PROMPTS, max_new_tokens=12)
        new = want[:, enc["input_ids"].shape[1]:].tolist()
        assert [g["token_ids"] for g in got] == [w[: w.index(eos) + 1] if eos in w else w for w in new]
        return
    predictor = Predictor.from_pretrained(root, mode=mode, provider="cpu")
    # What the graph takes: RoBERTa's ONNX graph has no token_type_ids, which this generic test tokenizer emits.
    batch = {k: v for k, v in _encoder_batch(task, tokenizer).items() if k in predictor.session.input_names}
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        want, got = model.model(**batch), ort_model(**batch)
    for name in ("logits",) if task == "token-classification" else ("start_logits", "end_logits"):
        diff = (torch.as_tensor(getattr(got, name)) - getattr(want, name))[real].abs().max()
        assert float(diff) <= ATOL, (name, float(diff))
    session_out = predictor.session.run({k: v.numpy() for k, v in batch.items()})
    first = "logits" if task == "token-classification" else "start_logits"
    assert np.abs(session_out[first][real.numpy()] - getattr(want, first)[real].numpy()).max() <= ATOL
