"""Training data for the token-level tasks: token classification, extractive question answering and
causal language modelling. Each reads CSV/JSONL rows, tokenises them once into an `EncodedRows`
(unpadded ids plus per-token labels), and batches pad per batch. The formats are documented in
docs/tasks.md.

- token-classification: `tokens` (a list of words; in CSV one space-separated string) and `tags`
  (one tag per word, names like B-PER or integer ids). The tag of a word goes on its first
  sub-token; the other sub-tokens and the special tokens get -100 (ignored by the loss), the
  alignment transformers' token-classification examples use (through the tokenizer's word_ids).
- question-answering: `question`, `context`, `answer_text`, `answer_start` (the answer's first
  character in the context), or SQuAD's nested `answers` {"text": [...], "answer_start": [...]}.
  The answer's characters are mapped to start/end token positions through the offset mapping;
  an answer cut off by truncation points at position 0 (the "no answer in this window" label).
- causal-lm: `text` (loss on every token) or `prompt` + `completion` (loss on the completion
  only). EOS is appended so that the model learns to stop.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from .constants import CAUSAL_LM, QUESTION_ANSWERING, TOKEN_CLASSIFICATION
from .data import SPLIT_SEED, encode_labels, label2id, read_rows
from .errors import DataError

IGNORE_INDEX = -100  # label of positions the loss skips (transformers' CrossEntropyLoss default)
DEFAULT_HELDOUT_FRACTION = 0.1
MAX_HELDOUT = 1000


@dataclass
class EncodedRows:
    """Tokenised rows of one task, unpadded.

    Attributes:
        input_ids: token ids per row.
        labels: per-token labels (token classification, causal LM) per row, or None.
        positions: (start, end) token positions per row (question answering), or None.
        token_type_ids: segment ids per row when the tokenizer makes them.
        pad_id: the id padding positions get.
        pad_left: pad on the left (decoders generate from the last position).
    """

    input_ids: list[list[int]]
    labels: list[list[int]] | None = None
    positions: list[tuple[int, int]] | None = None
    token_type_ids: list[list[int]] | None = None
    pad_id: int = 0
    pad_left: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.input_ids]

    def collate(self, indices: list[int]) -> dict:
        """Padded tensors: input_ids, attention_mask, (token_type_ids,) and labels or start/end positions."""
        import torch

        width = max(len(self.input_ids[i]) for i in indices)

        def pad(rows: list[list[int]], fill: int) -> torch.Tensor:
            out = torch.full((len(rows), width), fill, dtype=torch.long)  # (B, T)
            for b, row in enumerate(rows):
                (out[b, width - len(row):] if self.pad_left else out[b, :len(row)])[:] = torch.tensor(row)
            return out

        batch = {
            "input_ids": pad([self.input_ids[i] for i in indices], self.pad_id),
            "attention_mask": pad([[1] * len(self.input_ids[i]) for i in indices], 0),
        }
        if self.token_type_ids is not None:
            batch["token_type_ids"] = pad([self.token_type_ids[i] for i in indices], 0)
        if self.labels is not None:
            batch["labels"] = pad([self.labels[i] for i in indices], IGNORE_INDEX)
        if self.positions is not None:
            batch["start_positions"] = torch.tensor([self.positions[i][0] for i in indices])
            batch["end_positions"] = torch.tensor([self.positions[i][1] for i in indices])
        return batch


@dataclass
class RowDataset:
    """Rows of one task, checked; `encode` turns them into EncodedRows with a tokenizer."""

    task: str
    rows: list[dict]
    source: str
    id2label: dict[int, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.rows)

    num_labels = property(lambda self: len(self.id2label))
    label2id = property(lambda self: label2id(self.id2label))

    def subset(self, indices, source: str) -> RowDataset:
        return RowDataset(self.task, [self.rows[i] for i in indices], source, dict(self.id2label))

    def encode(self, tokenizer, max_length: int) -> EncodedRows:
        return ENCODERS[self.task](self, tokenizer, max_length)


# -- reading and checking rows --------------------------------------------------------------------


def _require(rows: list[dict], where: str, columns: tuple[str, ...], hint: str) -> None:
    if not rows:
        raise DataError(f"{where} has no rows: pass a file with at least one example")
    present = set().union(*(row.keys() for row in rows))
    missing = [c for c in columns if c not in present]
    if missing:
        raise DataError(
            f"{where} lacks column(s) {', '.join(missing)} (found: {', '.join(sorted(map(str, present)))}); {hint}"
        )


def _words(value, where: str, row: int, column: str) -> list:
    if isinstance(value, str):  # CSV: one space-separated string
        value = value.split()
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: row {row} column {column!r} must be a non-empty list (or a space-separated string)")
    return value


def token_classification_rows(rows: list[dict], where: str, id2label: dict[int, str] | None = None) -> RowDataset:
    """Check {"tokens": [...], "tags": [...]} rows and map the tags to ids (names sorted, as for labels)."""
    _require(rows, where, ("tokens", "tags"), 'write rows like {"tokens": ["Ada", "Lovelace"], "tags": ["B-PER", "I-PER"]}')
    checked, flat = [], []
    for i, row in enumerate(rows, 1):
        tokens, tags = _words(row.get("tokens"), where, i, "tokens"), _words(row.get("tags"), where, i, "tags")
        if len(tokens) != len(tags) or not all(isinstance(t, str) for t in tokens):
            raise DataError(
                f"{where}: row {i} has {len(tokens)} tokens and {len(tags)} tags; give one tag per token (strings)"
            )
        checked.append({"tokens": tokens, "tags": tags})
        flat.extend(tags)
    training = id2label is None
    ids, id2label = encode_labels(flat, where, id2label)  # huge integer tag ids are refused here
    if training and len(set(ids)) < 2:
        raise DataError(
            f"{where}: every token has tag {id2label[ids[0]]!r}; a token classifier needs at least two tags "
            "(e.g. O and B-PER)"
        )
    start = 0
    for row in checked:
        row["tag_ids"], start = ids[start:start + len(row["tags"])], start + len(row["tags"])
    return RowDataset(TOKEN_CLASSIFICATION, checked, where, id2label)


def _answer(row: dict, where: str, i: int) -> tuple[str, int]:
    if "answers" in row and isinstance(row["answers"], dict):  # SQuAD's nested form: the first answer
        texts, starts = row["answers"].get("text") or [], row["answers"].get("answer_start") or []
        if not texts or not starts:
            raise DataError(f"{where}: row {i} has an empty answers entry; give one answer text and start")
        return texts[0], starts[0]
    return row.get("answer_text"), row.get("answer_start")


def _char_offset(value) -> int | None:
    # JSON gives ints, CSV digit strings; a negative start would slice the context from its end and
    # could match the answer text by accident.
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit() and len(value.strip()) < 19:
        return int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def question_answering_rows(rows: list[dict], where: str, id2label=None) -> RowDataset:
    """Check question/context/answer rows: the answer text must sit at answer_start in the context."""
    hint = "name the columns question, context, answer_text, answer_start (or SQuAD's answers)"
    _require(rows, where, ("question", "context"), hint)
    checked = []
    for i, row in enumerate(rows, 1):
        question, context = row.get("question"), row.get("context")
        text, start = _answer(row, where, i)
        start = _char_offset(start)
        if start is None:
            raise DataError(f"{where}: row {i} answer_start {_answer(row, where, i)[1]!r} is not a character offset "
                            f"(an integer >= 0); {hint}")
        if not all(isinstance(v, str) and v for v in (question, context, text)):
            raise DataError(f"{where}: row {i} needs non-empty question, context and answer_text strings")
        if context[start:start + len(text)] != text:
            raise DataError(
                f"{where}: row {i}: the context at answer_start {start} reads "
                f"{context[start:start + len(text)]!r}, not the answer {text!r}; fix answer_start (0-based characters)"
            )
        checked.append({"question": question, "context": context, "answer_text": text, "answer_start": start})
    return RowDataset(QUESTION_ANSWERING, checked, where)


def causal_lm_rows(rows: list[dict], where: str, id2label=None) -> RowDataset:
    """Check each row: `text` (loss on every token) or `prompt` + `completion` (loss on the completion)."""
    hint = "give a text column (loss on every token) or prompt and completion columns (loss on the completion only)"
    if not rows:
        raise DataError(f"{where} has no rows: pass a file with at least one example")
    checked = []
    for i, row in enumerate(rows, 1):
        keys = ("prompt", "completion") if "prompt" in row or "completion" in row else ("text",)
        bad = [k for k in keys if not isinstance(row.get(k), str) or (k != "prompt" and not row[k])]
        if bad:
            raise DataError(f"{where}: row {i} column {bad[0]!r} is not a non-empty string; {hint}")
        checked.append({k: row[k] for k in keys})
    return RowDataset(CAUSAL_LM, checked, where)


READERS = {
    TOKEN_CLASSIFICATION: token_classification_rows,
    QUESTION_ANSWERING: question_answering_rows,
    CAUSAL_LM: causal_lm_rows,
}


def load_task_splits(task: str, data: str, eval_data: str | None = None) -> tuple[RowDataset, RowDataset]:
    """(train, eval) for `task`: eval_data when given (labels follow the training set), else a fixed
    held-out 10% of data (at least 1 row, at most 1,000), drawn with the same fixed seed as the
    classification split."""
    train = READERS[task](read_rows(data), str(data))
    if eval_data is not None:
        return train, READERS[task](read_rows(eval_data), str(eval_data), train.id2label or None)
    n = len(train)
    size = min(MAX_HELDOUT, max(1, round(n * DEFAULT_HELDOUT_FRACTION)))
    if n - size < 1:
        raise DataError(f"{data} has {n} rows, too few to hold out {size} for evaluation; add rows or pass --eval-data")
    order = list(range(n))
    random.Random(SPLIT_SEED).shuffle(order)
    return (train.subset(sorted(order[size:]), f"{data} (train split)"),
            train.subset(sorted(order[:size]), f"{data} (held-out split)"))


# -- tokenising -----------------------------------------------------------------------------------


def _encode_token_classification(dataset: RowDataset, tokenizer, max_length: int) -> EncodedRows:
    enc = tokenizer(
        [row["tokens"] for row in dataset.rows], is_split_into_words=True, truncation=True, max_length=max_length,
    )
    labels = []
    for b, row in enumerate(dataset.rows):
        previous, tags = None, []
        for word in enc.word_ids(b):
            # Only a word's first sub-token carries its tag; special tokens and continuations are ignored.
            tags.append(row["tag_ids"][word] if word is not None and word != previous else IGNORE_INDEX)
            previous = word
        labels.append(tags)
    return EncodedRows(enc["input_ids"], labels=labels, token_type_ids=enc.get("token_type_ids"),
                       pad_id=tokenizer.pad_token_id or 0)


def answer_token_span(offsets: list[tuple[int, int]], sequence_ids: list, start_char: int, end_char: int) -> tuple[int, int]:
    """(start, end) token positions of the characters [start_char, end_char) of the context
    (sequence 1), or (0, 0) when truncation cut the answer off."""
    context = [i for i, s in enumerate(sequence_ids) if s == 1]
    if not context or offsets[context[0]][0] > start_char or offsets[context[-1]][1] < end_char:
        return 0, 0
    start = next(i for i in context if offsets[i][1] > start_char)
    end = next(i for i in reversed(context) if offsets[i][0] < end_char)
    return start, end


def _encode_question_answering(dataset: RowDataset, tokenizer, max_length: int) -> EncodedRows:
    rows = dataset.rows
    enc = tokenizer(
        [r["question"] for r in rows], [r["context"] for r in rows], truncation="only_second",
        max_length=max_length, return_offsets_mapping=True,
    )
    positions = [
        answer_token_span(enc["offset_mapping"][b], enc.sequence_ids(b), r["answer_start"],
                          r["answer_start"] + len(r["answer_text"]))
        for b, r in enumerate(rows)
    ]
    if all(p == (0, 0) for p in positions):
        # Every label would be "no answer in this window": the model would learn one class only.
        raise DataError(
            f"{dataset.source}: every answer lies beyond --max-length {max_length} tokens (truncation cuts it off); "
            "raise --max-length or shorten the contexts"
        )
    return EncodedRows(enc["input_ids"], positions=positions, token_type_ids=enc.get("token_type_ids"),
                       pad_id=tokenizer.pad_token_id or 0)


def _encode_causal_lm(dataset: RowDataset, tokenizer, max_length: int) -> EncodedRows:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token, which causal-LM training appends to every row; set eos_token")
    ids, labels = [], []
    for row in dataset.rows:
        if "text" in row:
            tokens = tokenizer(row["text"])["input_ids"] + [eos]
            mask = [True] * len(tokens)
        else:
            prompt = tokenizer(row["prompt"])["input_ids"] if row["prompt"] else []
            completion = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [eos]
            tokens, mask = prompt + completion, [False] * len(prompt) + [True] * len(completion)
        tokens, mask = tokens[:max_length], mask[:max_length]
        ids.append(tokens)
        # transformers' causal-LM loss shifts the labels itself: label t is the target of position t - 1.
        labels.append([t if keep else IGNORE_INDEX for t, keep in zip(tokens, mask, strict=True)])
    ids, labels = _drop_rows_without_targets(ids, labels, dataset.source, max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return EncodedRows(ids, labels=labels, pad_id=pad)


def _drop_rows_without_targets(ids: list, labels: list, where: str, max_length: int) -> tuple[list, list]:
    # Position 0 is no one's target (the loss shifts labels by one). A row whose prompt fills
    # --max-length has none: a batch of such rows has a 0/0 loss, NaN.
    keep = [i for i, row in enumerate(labels) if any(t != IGNORE_INDEX for t in row[1:])]
    if not keep:
        raise DataError(
            f"{where}: no row has a token to learn within --max-length {max_length} (the prompts fill it); "
            "raise --max-length or shorten the prompts"
        )
    if len(keep) < len(ids):
        print(f"note: {where}: {len(ids) - len(keep)} of {len(ids)} rows left out: their prompt fills --max-length "
              f"{max_length}, leaving no completion token to learn")
    return [ids[i] for i in keep], [labels[i] for i in keep]


ENCODERS = {
    TOKEN_CLASSIFICATION: _encode_token_classification,
    QUESTION_ANSWERING: _encode_question_answering,
    CAUSAL_LM: _encode_causal_lm,
}


# -- evaluation -----------------------------------------------------------------------------------


def correct_and_total(task: str, outputs, batch: dict) -> tuple[int, int]:
    """(correct, counted) of one evaluated batch: labelled tokens (token classification), next tokens
    on the loss positions (causal LM), or exact start+end spans (question answering)."""
    if task == QUESTION_ANSWERING:
        hit = (outputs.start_logits.argmax(-1) == batch["start_positions"]) & (
            outputs.end_logits.argmax(-1) == batch["end_positions"])
        return int(hit.sum()), hit.numel()
    logits, labels = outputs.logits, batch["labels"]  # (B, T, C), (B, T)
    if task == CAUSAL_LM:
        logits, labels = logits[:, :-1], labels[:, 1:]
    keep = labels != IGNORE_INDEX
    return int((logits.argmax(-1)[keep] == labels[keep]).sum()), int(keep.sum())
