"""Predictions of the token-level exports, from per-token logits to what a user asks for.

- token classification: the label of each word is the argmax at its first sub-token (the position
  training labels); consecutive words tagged B-X, I-X, ... are grouped into entities.
- question answering: the answer is the context span (start <= end, at most MAX_ANSWER_TOKENS
  tokens) with the highest p_start * p_end, the probabilities being softmaxes over the context
  tokens; its characters come from the tokenizer's offsets.
"""

from __future__ import annotations

import numpy as np

from adalora_deploy.errors import ConfigError

from .session import RELEASE_MEMORY_TOKENS

MAX_ANSWER_TOKENS = 30
OUTSIDE = "O"


def _softmax(x: np.ndarray) -> np.ndarray:
    z = x.astype(np.float64) - x.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _words(item) -> tuple[list[str], list[tuple[int, int]], str]:
    """(words, character spans, text): a text is split on whitespace; a list of words is joined by spaces."""
    if isinstance(item, str):
        text, words, spans, pos = item, [], [], 0
        for word in item.split():
            start = item.index(word, pos)
            words.append(word)
            spans.append((start, start + len(word)))
            pos = start + len(word)
        return words, spans, text
    if isinstance(item, list | tuple) and item and all(isinstance(w, str) and w for w in item):
        spans, pos = [], 0
        for word in item:
            spans.append((pos, pos + len(word)))
            pos += len(word) + 1
        return list(item), spans, " ".join(item)
    raise ConfigError(f"a token-classification input must be a text or a list of words, got {item!r:.80}")


def _run(predictor, encodings: list[dict], batch_size: int) -> list[dict[str, np.ndarray]]:
    """Each encoding's outputs, unpadded: {output name: (T, ...)} with T its own length."""
    out = []
    for start in range(0, len(encodings), batch_size):
        chunk = encodings[start:start + batch_size]
        feeds = predictor.pad(chunk)
        results = predictor.session.run(feeds, release_memory=feeds["input_ids"].size > RELEASE_MEMORY_TOKENS)
        left = getattr(predictor.tokenizer, "padding_side", "right") == "left"
        width = feeds["input_ids"].shape[1]
        for row, enc in enumerate(chunk):
            n = len(enc["input_ids"])
            cols = slice(width - n, width) if left else slice(0, n)
            out.append({name: value[row, cols] for name, value in results.items()})
    return out


def _entities(words: list[dict]) -> list[dict]:
    """BIO grouping: B-X opens an entity, I-X continues one of type X; other labels group by equality."""
    entities: list[dict] = []
    current = None
    for w in words:
        prefix, _, kind = w["label"].partition("-") if w["label"][:2] in ("B-", "I-") else ("", "", w["label"])
        if w["label"] == OUTSIDE:
            current = None
            continue
        if current is not None and current["entity"] == kind and prefix != "B":
            current["end"], current["scores"] = w["end"], current["scores"] + [w["score"]]
            current["words"].append(w["word"])
            continue
        current = {"entity": kind, "start": w["start"], "end": w["end"], "scores": [w["score"]], "words": [w["word"]]}
        entities.append(current)
    return [
        {"entity": e["entity"], "start": e["start"], "end": e["end"], "score": float(np.mean(e["scores"])),
         "words": e["words"]}
        for e in entities
    ]


def tag_words(predictor, inputs, batch_size: int) -> list[dict]:
    """{"words": [{"word", "label", "score", "start", "end"}], "entities": [...]} per input.

    Called with the predictor's tokenizer lock held.
    """
    parsed = [_words(item) for item in inputs]
    try:
        enc = predictor.tokenizer(
            [words for words, _, _ in parsed], is_split_into_words=True, truncation=True,
            max_length=predictor.max_length,
        )
    except (AssertionError, ValueError) as err:  # GPT-2/RoBERTa tokenizers without add_prefix_space
        raise ConfigError(
            f"the export's tokenizer cannot take words ({err}): save it with add_prefix_space=True and re-export"
        ) from err
    encodings = [{k: enc[k][i] for k in enc.keys()} for i in range(len(parsed))]
    records = []
    for i, (outputs, (words, spans, text)) in enumerate(zip(_run(predictor, encodings, batch_size), parsed, strict=True)):
        probs = _softmax(outputs["logits"])  # (T, C)
        first: dict[int, int] = {}
        for position, word in enumerate(enc.word_ids(i)):
            if word is not None:
                first.setdefault(word, position)
        tagged = []
        for word, position in sorted(first.items()):  # words cut off by truncation get no label
            label_id = int(probs[position].argmax())
            tagged.append({
                "word": words[word], "label": predictor.id2label.get(label_id, str(label_id)),
                "score": float(probs[position, label_id]), "start": spans[word][0], "end": spans[word][1],
            })
        for e in (entities := _entities(tagged)):
            e["text"] = text[e["start"]:e["end"]]
        records.append({"words": tagged, "entities": entities})
    return records


def best_span(start_logits: np.ndarray, end_logits: np.ndarray, context: np.ndarray) -> tuple[int, int, float]:
    """(start, end, p_start * p_end) of the best span inside the context tokens (boolean mask (T,))."""
    masked = np.where(context, 0.0, -np.inf)
    p_start, p_end = _softmax(start_logits + masked), _softmax(end_logits + masked)  # (T,)
    scores = np.triu(np.outer(p_start, p_end))  # (T, T): start <= end
    scores = np.tril(scores, MAX_ANSWER_TOKENS - 1)  # end - start < MAX_ANSWER_TOKENS
    start, end = np.unravel_index(int(scores.argmax()), scores.shape)
    return int(start), int(end), float(scores[start, end])


def answer_questions(predictor, inputs, batch_size: int) -> list[dict]:
    """{"answer", "score", "start", "end"} per (question, context) input; start/end are characters of
    the context. Called with the predictor's tokenizer lock held."""
    for i, item in enumerate(inputs):
        if not (isinstance(item, tuple | list) and len(item) == 2 and all(isinstance(t, str) and t for t in item)):
            raise ConfigError(f"input {i} must be a [question, context] pair of non-empty strings, got {item!r:.80}")
    enc = predictor.tokenizer(
        [q for q, _ in inputs], [c for _, c in inputs], truncation="only_second", max_length=predictor.max_length,
        return_offsets_mapping=True,
    )
    encodings = [{k: enc[k][i] for k in enc.keys() if k != "offset_mapping"} for i in range(len(inputs))]
    records = []
    for i, outputs in enumerate(_run(predictor, encodings, batch_size)):
        context = np.array([s == 1 for s in enc.sequence_ids(i)])  # (T,)
        start, end, score = best_span(outputs["start_logits"], outputs["end_logits"], context)
        offsets = enc["offset_mapping"][i]
        first, last = offsets[start][0], offsets[end][1]
        records.append({"answer": inputs[i][1][first:last], "score": score, "start": int(first), "end": int(last)})
    return records
