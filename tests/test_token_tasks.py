"""Token classification and extractive question answering end to end on a tiny BERT: train, export
merged and factored (pruned), ONNX Runtime against the in-memory trained model, Optimum's ORTModel
classes and pipelines, the Predictor's words/entities and answer spans, and the data refusals."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from adalora_deploy.cli import main
from adalora_deploy.exporters import export
from adalora_deploy.runtime import Predictor
from adalora_deploy.task_data import answer_token_span
from adalora_deploy.training import train

from .conftest import minilm_tokenizer
from .test_data import write_jsonl

ATOL = 1e-4
PEOPLE = [("ada", "lovelace"), ("alan", "turing"), ("grace", "hopper"), ("john", "smith")]
CITIES = ["paris", "london", "berlin", "rome"]


def people(n: int, seed: int) -> list[tuple[str, str, str]]:
    """n random (first name, last name, city) triples."""
    rng = random.Random(seed)
    return [(*rng.choice(PEOPLE), rng.choice(CITIES)) for _ in range(n)]


def ner_rows(n: int = 40, seed: int = 0) -> list[dict]:
    return [{"tokens": [first, last, "visited", city, "today"], "tags": ["B-PER", "I-PER", "O", "B-LOC", "O"]}
            for first, last, city in people(n, seed)]


def qa_rows(n: int = 40, seed: int = 0) -> list[dict]:
    rows = []
    for first, last, city in people(n, seed):
        context = f"{first} {last} lives in {city} and likes tea."
        rows.append({"question": f"where does {first} live?", "context": context, "answer_text": city,
                     "answer_start": context.index(city)})
    return rows


def _train(tmp, base, task: str, rows: list[dict]):
    data = write_jsonl(tmp / "train.jsonl", rows)
    result = train(model=str(base), data=data, task=task, steps=6, batch_size=8, lr=5e-2, init_r=4, target_r=2,
                   tinit=1, tfinal=2, max_length=32, out=str(tmp / "ckpt"), progress=False)
    root = export(tmp / "ckpt", tmp / "onnx", prune_ranks=True)
    return result.model.eval(), root


@pytest.fixture(scope="module")
def ner(tmp_path_factory, tiny_bert_dir):
    return _train(tmp_path_factory.mktemp("ner"), tiny_bert_dir, "token-classification", ner_rows())


@pytest.fixture(scope="module")
def qa(tmp_path_factory, tiny_bert_dir):
    return _train(tmp_path_factory.mktemp("qa"), tiny_bert_dir, "question-answering", qa_rows())


def _ort_vs_model(root, mode, model, feeds: dict[str, np.ndarray], outputs: tuple[str, ...]) -> float:
    predictor = Predictor.from_pretrained(root, mode=mode, provider="cpu")
    got = predictor.session.run(feeds)
    with torch.no_grad():
        want = model.model(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    real = feeds["attention_mask"].astype(bool)
    return max(float(np.abs(got[o][real] - getattr(want, o).numpy()[real]).max()) for o in outputs)


# -- token classification -----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["merged", "factored"])
def test_ner_onnx_matches_in_memory_model(ner, mode):
    model, root = ner
    enc = minilm_tokenizer()([r["tokens"] for r in ner_rows(3, seed=1)] + [["paris"]], is_split_into_words=True,
                             padding=True, return_tensors="np")
    feeds = {k: v.astype(np.int64) for k, v in enc.items()}
    assert _ort_vs_model(root, mode, model, feeds, ("logits",)) <= ATOL


def test_ner_labels_reach_checkpoint_and_exports(ner):
    _, root = ner
    want = {"0": "B-LOC", "1": "B-PER", "2": "I-PER", "3": "O"}
    ckpt = json.loads((root.parent / "ckpt" / "adalora_config.json").read_text())
    assert ckpt["task"] == "token-classification" and ckpt["id2label"] == want
    for mode in ("merged", "factored"):
        config = json.loads((root / mode / "config.json").read_text())
        assert config["id2label"] == want


def test_ner_predictor_labels_first_subtoken_of_each_word(ner):
    model, root = ner
    predictor = Predictor.from_pretrained(root, provider="cpu")
    text = "grace  hopper visited berlin today"  # two spaces: offsets must still point at the words
    record = predictor.predict(text).records()[0]
    assert [w["word"] for w in record["words"]] == text.split()
    assert all(text[w["start"]:w["end"]] == w["word"] for w in record["words"])
    enc = predictor.tokenizer(text.split(), is_split_into_words=True, return_tensors="pt")
    with torch.no_grad():
        logits = model.model(**enc).logits[0]  # (T, C)
    first = {}
    for position, word in enumerate(enc.word_ids(0)):
        if word is not None:
            first.setdefault(word, position)
    want = [model.model.config.id2label[int(logits[first[w]].argmax())] for w in range(len(text.split()))]
    assert [w["label"] for w in record["words"]] == want
    for e in record["entities"]:
        assert text[e["start"]:e["end"]] == e["text"] and e["entity"] in ("PER", "LOC")


def test_ner_ortmodel_and_pipeline(ner):
    from optimum.onnxruntime import ORTModelForTokenClassification
    from transformers import AutoTokenizer, pipeline

    model, root = ner
    ort_model = ORTModelForTokenClassification.from_pretrained(root / "factored")
    tokenizer = AutoTokenizer.from_pretrained(root / "factored")
    enc = tokenizer("ada lovelace visited rome", return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(ort_model(**enc).logits, model.model(**enc).logits, atol=ATOL)
    tagged = pipeline("token-classification", model=ort_model, tokenizer=tokenizer)("ada lovelace visited rome")
    assert all(t["entity"] in {"B-LOC", "B-PER", "I-PER", "O"} for t in tagged)


def test_entity_grouping():
    from adalora_deploy.runtime.token_tasks import _entities

    words = [{"word": w, "label": lab, "score": s, "start": i * 10, "end": i * 10 + 3}
             for i, (w, lab, s) in enumerate([("ada", "B-PER", 0.9), ("lovelace", "I-PER", 0.7), ("in", "O", 1.0),
                                              ("rome", "B-LOC", 0.8), ("paris", "B-LOC", 0.6), ("x", "I-PER", 0.5)])]
    got = [(e["entity"], e["words"], round(e["score"], 6), e["start"], e["end"]) for e in _entities(words)]
    assert got == [("PER", ["ada", "lovelace"], 0.8, 0, 13), ("LOC", ["rome"], 0.8, 30, 33),
                   ("LOC", ["paris"], 0.6, 40, 43), ("PER", ["x"], 0.5, 50, 53)]


# -- question answering -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["merged", "factored"])
def test_qa_onnx_matches_in_memory_model(qa, mode):
    model, root = qa
    rows = qa_rows(3, seed=2)
    enc = minilm_tokenizer()([r["question"] for r in rows], [r["context"] for r in rows], padding=True,
                             return_tensors="np")
    feeds = {k: v.astype(np.int64) for k, v in enc.items()}
    assert _ort_vs_model(root, mode, model, feeds, ("start_logits", "end_logits")) <= ATOL


def test_qa_predictor_returns_the_best_context_span(qa):
    model, root = qa
    predictor = Predictor.from_pretrained(root, mode="factored", provider="cpu")
    question, context = "where does alan live?", "alan turing lives in london and likes tea."
    got = predictor.predict([(question, context)]).records()[0]
    enc = predictor.tokenizer(question, context, return_offsets_mapping=True)
    with torch.no_grad():
        out = model.model(**{k: torch.tensor([v]) for k, v in enc.items() if k != "offset_mapping"})
    ctx = [i for i, s in enumerate(enc.sequence_ids(0)) if s == 1]
    p_start = torch.softmax(out.start_logits[0, ctx].double(), -1)
    p_end = torch.softmax(out.end_logits[0, ctx].double(), -1)
    spans = [(float(p_start[a] * p_end[b]), a, b) for a in range(len(ctx)) for b in range(a, min(len(ctx), a + 30))]
    score, a, b = max(spans)
    start, end = enc["offset_mapping"][ctx[a]][0], enc["offset_mapping"][ctx[b]][1]
    assert (got["start"], got["end"], got["answer"]) == (start, end, context[start:end])
    assert got["score"] == pytest.approx(score, rel=1e-6)


def test_qa_ortmodel_and_pipeline(qa):
    from optimum.onnxruntime import ORTModelForQuestionAnswering
    from transformers import AutoTokenizer, pipeline

    model, root = qa
    ort_model = ORTModelForQuestionAnswering.from_pretrained(root / "merged")
    tokenizer = AutoTokenizer.from_pretrained(root / "merged")
    enc = tokenizer("where does ada live?", "ada lovelace lives in rome and likes tea.", return_tensors="pt")
    with torch.no_grad():
        got, want = ort_model(**enc), model.model(**enc)
    assert torch.allclose(got.start_logits, want.start_logits, atol=ATOL)
    assert torch.allclose(got.end_logits, want.end_logits, atol=ATOL)
    context = "ada lovelace lives in rome and likes tea."
    answer = pipeline("question-answering", model=ort_model, tokenizer=tokenizer)(
        question="where does ada live?", context=context)
    assert context[answer["start"]:answer["end"]] == answer["answer"]


def test_answer_token_span_maps_characters_to_tokens():
    tok = minilm_tokenizer()
    context = "ada lovelace lives in rome."
    enc = tok("where?", context, return_offsets_mapping=True)
    start, end = answer_token_span(enc["offset_mapping"], enc.sequence_ids(0), 4, 12)  # "lovelace"
    assert tok.decode(enc["input_ids"][start:end + 1]) == "lovelace"
    cut = tok("where?", context, truncation="only_second", max_length=6, return_offsets_mapping=True)
    assert answer_token_span(cut["offset_mapping"], cut.sequence_ids(0), 22, 26) == (0, 0)  # "rome" cut off


# -- refusals -----------------------------------------------------------------------------------


@pytest.mark.parametrize("task, rows, words", [
    ("token-classification", [{"tokens": ["a", "b"], "tags": ["O"]}] * 4, "one tag per token"),
    ("token-classification", [{"text": "a b"}] * 4, "lacks column(s) tokens, tags"),
    ("question-answering", [{"question": "q", "context": "abc", "answer_text": "b", "answer_start": 0}] * 4,
     "fix answer_start"),
    ("question-answering", [{"question": "q", "context": "abc"}] * 4, "answer_start"),
])
def test_bad_task_data_is_a_one_line_error(tmp_path, capsys, tiny_bert_dir, task, rows, words):
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    assert main(["train", "--task", task, "--model", str(tiny_bert_dir), "--data", data, "--steps", "2",
                 "--out", str(tmp_path / "ckpt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and words in err and "\n" not in err
    assert not (tmp_path / "ckpt").exists()


def test_ner_on_gpt2_with_a_byte_level_tokenizer(tmp_path):
    """GPT-2's tokenizer refuses words unless add_prefix_space=True: training reloads it so, and the
    export serves words with it."""
    from transformers import GPT2TokenizerFast

    from .tiny_decoders import bpe_tokenizer, tiny_decoder

    fast = bpe_tokenizer()
    tokenizer = GPT2TokenizerFast(tokenizer_object=fast._tokenizer, eos_token=fast.eos_token, bos_token=fast.eos_token)
    tiny_decoder("gpt2", len(tokenizer), tokenizer.eos_token_id).save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    data = write_jsonl(tmp_path / "ner.jsonl", ner_rows())
    result = train(model=str(tmp_path / "gpt2"), data=data, task="token-classification", steps=4, batch_size=8,
                   lr=5e-2, init_r=4, target_r=2, tinit=1, tfinal=1, out=str(tmp_path / "ckpt"), progress=False)
    root = export(tmp_path / "ckpt", tmp_path / "onnx", prune_ranks=True, optimize=False)
    predictor = Predictor.from_pretrained(root, mode="factored", provider="cpu")
    assert predictor.tokenizer.add_prefix_space
    words = "ada lovelace visited rome".split()
    enc = predictor.tokenizer(words, is_split_into_words=True, return_tensors="pt")
    with torch.no_grad():
        logits = result.model.eval().model(**enc).logits[0]  # (T, C)
    first = {w: i for i, w in reversed(list(enumerate(enc.word_ids(0))))}
    want = [result.model.model.config.id2label[int(logits[first[w]].argmax())] for w in range(len(words))]
    assert [w["label"] for w in predictor.predict(" ".join(words)).records()[0]["words"]] == want
    feeds = {k: v.numpy() for k, v in enc.items()}
    got = predictor.session.run(feeds)["logits"][0]
    assert np.abs(got - logits.numpy()).max() <= ATOL


def test_serve_token_tasks_over_http(ner, qa):
    from adalora_deploy.runtime.server import ServerConfig, create_app

    from .test_server import free_port, serving

    cases = [
        (ner, ["ada lovelace visited rome today"]),
        (qa, [["where does ada live?", "ada lovelace lives in rome and likes tea."]]),
    ]
    for (_, root), inputs in cases:
        predictor = Predictor.from_pretrained(root, provider="cpu")
        config = ServerConfig(port=free_port())
        with serving(create_app(predictor, config), config) as client:
            response = client.post("/v1/predict", json={"inputs": inputs})
            assert response.status_code == 200
            want = predictor.predict([tuple(i) if isinstance(i, list) else i for i in inputs]).records()
            assert response.json()["predictions"] == json.loads(json.dumps(want))
            refused = client.post("/v1/generate", json={"inputs": "hi"})
            assert refused.status_code == 422 and "/v1/predict" in refused.json()["error"]
