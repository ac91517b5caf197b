"""Labels of the token-level tasks, checked position by position against hand-made expectations."""

from __future__ import annotations

import json

import pytest

from adalora_deploy.errors import DataError
from adalora_deploy.task_data import (
    IGNORE_INDEX,
    causal_lm_rows,
    load_task_splits,
    question_answering_rows,
    token_classification_rows,
)

from .conftest import minilm_tokenizer
from .test_data import write_csv, write_jsonl
from .tiny_decoders import bpe_tokenizer


def test_tag_goes_on_the_first_subtoken_only():
    tok = minilm_tokenizer()
    rows = token_classification_rows([{"tokens": ["ada", "lovelace", "wrote"], "tags": ["B-PER", "I-PER", "O"]}], "t")
    assert rows.id2label == {0: "B-PER", 1: "I-PER", 2: "O"}
    enc = rows.encode(tok, max_length=32)
    pieces = tok.convert_ids_to_tokens(enc.input_ids[0])
    assert pieces[0] == "[CLS]" and pieces[-1] == "[SEP]" and len(pieces) > 5  # a word was split
    want, previous = [], None
    for word in tok(["ada", "lovelace", "wrote"], is_split_into_words=True).word_ids():
        want.append([0, 1, 2][word] if word is not None and word != previous else IGNORE_INDEX)
        previous = word
    assert enc.labels[0] == want
    assert sum(label != IGNORE_INDEX for label in enc.labels[0]) == 3  # one label per word


def test_csv_tokens_and_tags_are_space_separated(tmp_path):
    path = write_csv(tmp_path / "ner.csv", [("ada went", "B-PER O"), ("rome", "B-LOC")] * 5, header=("tokens", "tags"))
    train, held = load_task_splits("token-classification", path)
    assert len(train) == 9 and len(held) == 1
    assert train.rows[0]["tokens"] == ["ada", "went"] and train.id2label == {0: "B-LOC", 1: "B-PER", 2: "O"}


def test_completion_only_loss_masks_the_prompt():
    tok = bpe_tokenizer()
    rows = causal_lm_rows([{"prompt": "the quick", "completion": " brown fox"}, {"text": "red green"}], "c")
    enc = rows.encode(tok, max_length=64)
    prompt, completion = tok("the quick")["input_ids"], tok(" brown fox", add_special_tokens=False)["input_ids"]
    eos = tok.eos_token_id
    assert enc.input_ids[0] == prompt + completion + [eos]
    assert enc.labels[0] == [IGNORE_INDEX] * len(prompt) + completion + [eos]
    text = tok("red green")["input_ids"]
    assert enc.input_ids[1] == text + [eos] and enc.labels[1] == text + [eos]
    batch = enc.collate([0, 1])
    short = len(enc.input_ids[1])
    assert (batch["labels"][1, short:] == IGNORE_INDEX).all() and (batch["attention_mask"][1, short:] == 0).all()


def test_squad_nested_answers_are_accepted():
    rows = question_answering_rows(
        [{"question": "who?", "context": "ada wrote", "answers": {"text": ["ada"], "answer_start": [0]}}], "q")
    assert rows.rows[0]["answer_text"] == "ada" and rows.rows[0]["answer_start"] == 0


@pytest.mark.parametrize("rows, words", [
    ([{"prompt": "a", "completion": ""}], "'completion' is not a non-empty string"),
    ([{"tokens": "a b", "tags": "O"}], "2 tokens and 1 tags"),
])
def test_bad_rows_name_the_row(tmp_path, rows, words):
    reader = causal_lm_rows if "prompt" in rows[0] else token_classification_rows
    with pytest.raises(DataError, match=words):
        reader(rows, str(write_jsonl(tmp_path / "x.jsonl", rows)))


def test_top_p_and_temperature_sampling_follow_their_definitions():
    import numpy as np

    from adalora_deploy.runtime.generate import GenerationConfig, sample

    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = np.log(probs)[None].repeat(4000, axis=0)  # (N, V): 4000 independent draws
    rng = np.random.default_rng(0)
    drawn = sample(logits, GenerationConfig(do_sample=True, top_p=0.75), rng)
    assert set(drawn) == {0, 1}  # the smallest set of most likely tokens with mass >= 0.75
    assert abs((drawn == 0).mean() - 0.5 / 0.8) < 0.03  # renormalised inside the nucleus
    drawn = sample(logits, GenerationConfig(do_sample=True, top_p=0.9), rng)
    assert set(drawn) == {0, 1, 2}
    hot = sample(logits, GenerationConfig(do_sample=True, temperature=2.0), rng)
    want = probs ** 0.5 / (probs ** 0.5).sum()  # softmax(log p / 2)
    assert np.abs(np.bincount(hot, minlength=4) / len(hot) - want).max() < 0.03
    assert (sample(logits[:3], GenerationConfig(), rng) == 0).all()  # greedy


def test_cli_trains_token_classification_and_qa_from_csv(tmp_path, capsys, tiny_bert_dir):
    from adalora_deploy.cli import main

    ner = write_csv(tmp_path / "ner.csv", [("ada lovelace visited rome", "B-PER I-PER O B-LOC")] * 12,
                    header=("tokens", "tags"))
    context = "ada lovelace lives in rome."
    qa = write_csv(tmp_path / "qa.csv", [("where does ada live?", context, "rome", str(context.index("rome")))] * 12,
                   header=("question", "context", "answer_text", "answer_start"))
    for task, data, what in (("token-classification", ner, "token accuracy"),
                             ("question-answering", qa, "exact span accuracy")):
        out = tmp_path / task
        assert main(["train", "--task", task, "--model", str(tiny_bert_dir), "--data", data, "--steps", "3",
                     "--batch-size", "4", "--init-r", "4", "--target-r", "2", "--out", str(out)]) == 0
        assert f"eval {what}:" in capsys.readouterr().out
        assert json.loads((out / "adalora_config.json").read_text())["task"] == task


def test_rows_whose_prompt_fills_max_length_are_left_out(capsys):
    # Such a row has no target (position 0 is no one's target); a batch of them would give a NaN loss.
    tok = bpe_tokenizer()
    long_prompt = "the quick brown fox jumps over the lazy dog"
    assert len(tok(long_prompt)["input_ids"]) > 6
    rows = causal_lm_rows([{"prompt": long_prompt, "completion": " red"}, {"prompt": "a", "completion": " red green"},
                           {"text": "monday tuesday"}], "c")
    enc = rows.encode(tok, max_length=6)
    assert len(enc) == 2 and enc.input_ids[0][0] == tok("a")["input_ids"][0]
    assert all(any(t != IGNORE_INDEX for t in labels[1:]) for labels in enc.labels)
    assert "note: c: 1 of 3 rows left out" in capsys.readouterr().out


@pytest.mark.parametrize("start", [-1, "-1", True, 1.5, "1.5", "٣"])
def test_answer_start_must_be_a_non_negative_integer(start):
    with pytest.raises(DataError, match="is not a character offset"):
        question_answering_rows([{"question": "q", "context": "xada", "answer_text": "ada", "answer_start": start}], "q")


@pytest.mark.parametrize("start", [1, "1", " 1 "])
def test_answer_start_as_json_integer_or_csv_digits(start):
    assert question_answering_rows(
        [{"question": "q", "context": "xada", "answer_text": "ada", "answer_start": start}], "q").rows[0]["answer_start"] == 1
