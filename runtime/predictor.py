"""Text (or text pairs) -> the export's tokenizer -> ONNX Runtime -> logits, probabilities, labels.

Classification exports return logits; feature-extraction exports return mean-pooled embeddings;
token-classification exports return a label per word (and BIO entities); question-answering exports
return answer spans; causal-LM exports generate text (`generate`, `stream`).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from adalora_deploy.constants import (
    ADAPTER_INDEX_INPUT,
    CAUSAL_LM,
    FEATURE_EXTRACTION,
    MULTI_MODE,
    PAST_PREFIX,
    QUESTION_ANSWERING,
    TOKEN_CLASSIFICATION,
)
from adalora_deploy.constants import MODEL_CONFIG_FILE as CONFIG_FILE
from adalora_deploy.constants import SEQUENCE_CLASSIFICATION as CLASSIFICATION
from adalora_deploy.errors import CheckpointError, ConfigError
from adalora_deploy.io import read_json

from . import token_tasks
from .adapters import AdapterRegistry
from .generate import GenerationConfig, Generator, PredictionCancelled
from .session import (
    RELEASE_MEMORY_TOKENS,
    ExportDirError,
    OrtSession,
    SessionConfig,
    open_session,
    read_manifest,
    resolve_export_dir,
)
from .tokenizer import ExportTokenizer

# Texts are cut to max_length * CHARS_PER_TOKEN characters before tokenizing: the cut cannot change
# the first max_length tokens unless they average more than this many characters (ordinary text
# averages about 4), and it bounds the tokenizer's time and memory for very long texts.
CHARS_PER_TOKEN = 16


# One input: a text, or a (text, text_pair) pair for pair tasks (NLI, paraphrase, ...).
TextInput = str | tuple[str, str] | list[str]



def detect_task(session: OrtSession, manifest: dict | None) -> str:
    """The export's task: from its manifest, else from the graph (for exports made by other tools)."""
    if manifest and manifest.get("task"):
        return manifest["task"]
    if any(name.startswith(PAST_PREFIX) for name in session.input_names):
        return CAUSAL_LM
    if "start_logits" in session.output_names:
        return QUESTION_ANSWERING
    if "logits" in session.output_names:
        logits = next(o for o in session.session.get_outputs() if o.name == "logits")
        return TOKEN_CLASSIFICATION if len(logits.shape) == 3 else CLASSIFICATION
    return FEATURE_EXTRACTION


@dataclass
class Predictions:
    """Outputs for N inputs, in input order.

    Classification: logits and probabilities (N, C), label_ids (N,), labels (N strings).
    Feature extraction: embeddings (N, H), the hidden states mean-pooled over real tokens.
    """

    task: str
    id2label: dict[int, str] = field(default_factory=dict)
    logits: np.ndarray | None = None
    probabilities: np.ndarray | None = None
    label_ids: np.ndarray | None = None
    labels: list[str] = field(default_factory=list)
    embeddings: np.ndarray | None = None
    items: list[dict] | None = None  # token classification and question answering: one record per input
    # multi graphs: each row's adapter and its labels; logits beyond a row's num_labels are -inf
    adapters: list[str] | None = None
    row_id2label: list[dict[int, str]] | None = None

    def __len__(self) -> int:
        if self.items is not None:
            return len(self.items)
        return len(self.logits if self.logits is not None else self.embeddings)

    def records(self) -> list[dict]:
        """One JSON-ready dict per input: {"label", "scores"}, {"embedding"}, {"words", "entities"}
        (token classification) or {"answer", "score", "start", "end"} (question answering)."""
        if self.items is not None:
            return self.items
        if self.task == FEATURE_EXTRACTION:
            return [{"embedding": e.tolist()} for e in self.embeddings]
        if self.adapters is not None:
            return [
                {"adapter": adapter, "label": label,
                 "scores": {name: float(probs[i]) for i, name in id2label.items()}}
                for adapter, label, probs, id2label in zip(
                    self.adapters, self.labels, self.probabilities, self.row_id2label, strict=True)
            ]
        names = [self.id2label.get(i, str(i)) for i in range(self.probabilities.shape[1])]
        return [
            {"label": label, "scores": dict(zip(names, map(float, probs), strict=True))}
            for label, probs in zip(self.labels, self.probabilities, strict=True)
        ]


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64, stable for large logits."""
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)  # (N, C)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean of the hidden states over real (mask = 1) tokens."""
    m = mask[..., None].astype(hidden.dtype)  # (B, T, 1)
    return (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1)  # (B, H)


def _split_inputs(inputs: Sequence[TextInput]) -> tuple[list[str], list[str | None]]:
    """Texts and pairs (None for single texts); raises ConfigError on anything else."""
    texts, pairs = [], []
    for i, item in enumerate(inputs):
        if isinstance(item, str):
            texts.append(item)
            pairs.append(None)
        elif isinstance(item, tuple | list) and len(item) == 2 and all(isinstance(t, str) for t in item):
            texts.append(item[0])
            pairs.append(item[1])
        else:
            raise ConfigError(f"input {i} must be a string or a [text, text_pair] pair of strings, got {item!r:.80}")
    return texts, pairs


class Predictor:
    """Run an exported model on raw text. Safe to call from several threads.

    Args:
        session: an OrtSession on the export's model.onnx.
        tokenizer: the tokenizer saved in the export directory.
        model_config: the export's config.json as a dict (id2label, max_position_embeddings).
        manifest: the export's adalora_manifest.json, or None.
        batch_size: most inputs per ONNX Runtime call; longer input lists are chunked.
        max_length: tokens per input after truncation; None takes the smaller of the tokenizer's
            and the model's limits.
    """

    def __init__(
        self, session: OrtSession, tokenizer, model_config: dict, manifest: dict | None = None,
        batch_size: int = 32, max_length: int | None = None,
    ):
        if batch_size < 1:
            raise ConfigError(f"batch_size ({batch_size}) must be >= 1")
        self.session = session
        self.tokenizer = tokenizer
        self.model_config = model_config
        self.manifest = manifest
        self.batch_size = batch_size
        self.max_length = max_length or self._default_max_length()
        self.task = detect_task(session, manifest)
        self._generator: Generator | None = None
        self.id2label = {int(k): v for k, v in (model_config.get("id2label") or {}).items()}
        multi = (manifest or {}).get("mode") == MULTI_MODE
        self.adapters = AdapterRegistry(manifest, session.to_device if session.on_cuda else None) if multi else None
        # Fast (Rust) tokenizers raise "Already borrowed" when one instance is used by two threads.
        self._tokenizer_lock = threading.Lock()

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, provider: str = "auto", mode: str | None = None, batch_size: int = 32,
        max_length: int | None = None, session_config: SessionConfig | None = None,
    ) -> Predictor:
        """Open an export directory.

        Args:
            path: one mode's directory, or an export root (then `mode` picks merged or factored).
            provider: "auto", "cuda" or "cpu"; ignored when session_config is given.
            mode: "merged" (default) or "factored", for an export root.
            batch_size: most inputs per ONNX Runtime call.
            max_length: truncation length; None takes the tokenizer's and the model's limit.
            session_config: full session options (threads, graph optimisation, arena).
        """
        model_dir = resolve_export_dir(path, mode)
        model_config = read_json(model_dir / CONFIG_FILE, "model config")
        manifest = read_manifest(model_dir)
        tokenizer = load_export_tokenizer(model_dir)
        session = open_session(model_dir, session_config or SessionConfig(provider=provider))
        return cls(session, tokenizer, model_config, manifest, batch_size, max_length)

    @property
    def provider(self) -> str:
        return self.session.provider

    def _default_max_length(self) -> int:
        limits = [getattr(self.tokenizer, "model_max_length", None), self.model_config.get("max_position_embeddings")]
        limits = [int(n) for n in limits if isinstance(n, int | float) and 0 < n < 1_000_000]
        return min(limits) if limits else 512

    def tokenize(self, inputs: Sequence[TextInput]) -> list[dict[str, list[int]]]:
        """Token ids per input, truncated to max_length and not padded."""
        texts, pairs = _split_inputs(inputs)
        limit = self.max_length * CHARS_PER_TOKEN
        texts = [t[:limit] for t in texts]
        pairs = [p if p is None else p[:limit] for p in pairs]
        out: list[dict | None] = [None] * len(texts)
        singles = [i for i, p in enumerate(pairs) if p is None]
        doubles = [i for i, p in enumerate(pairs) if p is not None]
        with self._tokenizer_lock:
            for idx, with_pairs in ((singles, False), (doubles, True)):
                if not idx:
                    continue
                enc = self.tokenizer(
                    [texts[i] for i in idx], text_pair=[pairs[i] for i in idx] if with_pairs else None,
                    truncation=True, max_length=self.max_length, padding=False,
                )
                for j, i in enumerate(idx):
                    out[i] = {k: enc[k][j] for k in enc.keys()}
        return out

    def pad(self, encodings: list[dict[str, list[int]]]) -> dict[str, np.ndarray]:
        """Pad a batch to its longest item (dynamic padding) on the tokenizer's padding side."""
        longest = max(len(e["input_ids"]) for e in encodings)
        pad_id = self.tokenizer.pad_token_id or 0
        left = getattr(self.tokenizer, "padding_side", "right") == "left"
        batch = {}
        for name in encodings[0]:
            fill = pad_id if name == "input_ids" else 0
            array = np.full((len(encodings), longest), fill, dtype=np.int64)  # (B, T)
            for row, enc in enumerate(encodings):
                n = len(enc[name])
                (array[row, longest - n:] if left else array[row, :n])[:] = enc[name]
            batch[name] = array
        if "attention_mask" not in batch:
            batch["attention_mask"] = (batch["input_ids"] != pad_id).astype(np.int64)
        return batch

    # -- adapters (multi graphs: export --mode multi) ----------------------------------------------

    def _registry(self) -> AdapterRegistry:
        if self.adapters is None:
            raise ConfigError(f"{self.session.path} is not a multi-adapter graph: export one with --mode multi")
        return self.adapters

    def load_adapter(self, name: str, path: str | os.PathLike) -> dict:
        """Load the adapter pack at `path` under `name` (replacing one of that name) while predictions run.

        Returns its description (ranks, task, labels). Raises AdapterPackError for a corrupt pack or one
        made for another base model; the adapters already loaded stay as they were.
        """
        return self._registry().load(name, path).describe()

    def unload_adapter(self, name: str) -> None:
        """Stop serving `name`; batches already running finish with it. UnknownAdapterError if absent."""
        self._registry().unload(name)

    def list_adapters(self) -> list[dict]:
        return self._registry().describe()

    def _adapter_names(self, adapter, n: int) -> list[str] | None:
        if self.adapters is None:
            if adapter is not None:
                raise ConfigError(f"{self.session.path} serves one model: drop adapter= (or serve a multi graph)")
            return None
        names = [adapter] * n if isinstance(adapter, str) else list(adapter or [])
        if len(names) != n or not all(isinstance(a, str) for a in names):
            raise ConfigError(f"adapter= must be one adapter name or one name per input ({n} inputs)")
        return names

    def predict(
        self, inputs: TextInput | Sequence[TextInput], batch_size: int | None = None,
        max_batch_tokens: int | None = None, should_stop: Callable[[], bool] | None = None,
        adapter: str | Sequence[str] | None = None,
    ) -> Predictions:
        """Predict for one input or a list of them.

        Args:
            inputs: a text, a (text, text_pair) tuple, or a list of texts and pairs (inside the
                list a pair may also be a 2-item list, as JSON sends it). A bare list is always a
                batch: ["a", "b"] is two texts, [("a", "b")] is one pair.
            batch_size: overrides the predictor's batch size for this call.
            max_batch_tokens: most padded tokens (rows x longest row) in one model call; bounds
                the activation memory of a batch of long texts (None: batch_size alone).
            should_stop: asked before each model call; True raises PredictionCancelled.
            adapter: multi graphs only: the adapter every input uses, or one adapter name per input
                (rows of different adapters share batches).

        Returns:
            Predictions in input order.
        """
        if isinstance(inputs, str) or (isinstance(inputs, tuple) and len(inputs) == 2):
            inputs = [inputs]
        if len(inputs) == 0:
            raise ConfigError("no inputs: pass at least one text")
        names = self._adapter_names(adapter, len(inputs))
        state = self.adapters.state if names is not None else None  # one consistent view for the whole call
        if state is not None:
            state.index(names)  # an unknown name fails before any work
        if self.task == CAUSAL_LM:
            raise ConfigError("this export is a causal LM: call generate() (POST /v1/generate), not predict()")
        if self.task in (TOKEN_CLASSIFICATION, QUESTION_ANSWERING):
            return self._token_task(inputs, batch_size or self.batch_size)
        encodings = self.tokenize(inputs)
        # Sorting by length groups similar lengths, so that each batch pads little.
        lengths = [len(e["input_ids"]) for e in encodings]
        order = sorted(range(len(encodings)), key=lambda i: lengths[i])
        rows: list[np.ndarray | None] = [None] * len(encodings)
        for chunk in chunk_by_tokens(order, lengths, batch_size or self.batch_size, max_batch_tokens):
            if should_stop is not None and should_stop():
                raise PredictionCancelled("nobody waits for these predictions any more")
            extra = (state, [names[i] for i in chunk]) if state is not None else None
            for i, row in zip(chunk, self._run_batch([encodings[i] for i in chunk], extra), strict=True):
                rows[i] = row
        if state is not None:
            return self._adapter_predictions(rows, [state.pack(n) for n in names])
        return self._predictions(np.stack(rows))

    __call__ = predict

    def _token_task(self, inputs: Sequence[TextInput], batch_size: int) -> Predictions:
        with self._tokenizer_lock:
            if self.task == TOKEN_CLASSIFICATION:
                records = token_tasks.tag_words(self, inputs, batch_size)
            else:
                records = token_tasks.answer_questions(self, inputs, batch_size)
        return Predictions(self.task, self.id2label, items=records)

    # -- generation (causal-LM exports) ---------------------------------------------------------

    @property
    def generator(self) -> Generator:
        if self.task != CAUSAL_LM:
            raise ConfigError(f"this export is a {self.task} model; only causal-LM exports (--task causal-lm) generate")
        if self._generator is None:
            self._generator = Generator(self.session, self._eos_ids(), self._pad_id())
        return self._generator

    def _eos_ids(self) -> set[int]:
        eos = self.model_config.get("eos_token_id")
        ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def _pad_id(self) -> int:
        for pad in (self.model_config.get("pad_token_id"), self.tokenizer.pad_token_id, *sorted(self._eos_ids())):
            if pad is not None:
                return int(pad)
        return 0

    def _prompt_ids(self, prompts: str | Sequence[str], config: GenerationConfig) -> list[list[int]]:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ConfigError("prompts must be a string or a non-empty list of strings")
        with self._tokenizer_lock:
            ids = [self.tokenizer(p)["input_ids"] for p in prompts]
        limit = self.model_config.get("max_position_embeddings") or self.model_config.get("n_positions")
        longest = max(len(i) for i in ids)
        if limit and longest + config.max_new_tokens > limit:
            raise ConfigError(
                f"a prompt of {longest} tokens plus max_new_tokens {config.max_new_tokens} exceeds the model's "
                f"{limit} positions: shorten the prompt or lower max_new_tokens"
            )
        return ids

    def generate(
        self, prompts: str | Sequence[str], should_stop: Callable[[], bool] | None = None, **options
    ) -> list[dict]:
        """Generate a continuation of each prompt.

        Args:
            prompts: a prompt or a list of prompts (run as one left-padded batch).
            should_stop: asked before the first step and after each; True raises PredictionCancelled.
            options: GenerationConfig fields: max_new_tokens, do_sample, temperature, top_p, seed, use_cache.

        Returns:
            Per prompt {"text", "token_ids", "finish_reason": "eos" | "length"}; the text leaves out
            special tokens such as EOS.
        """
        config = GenerationConfig(**options)
        ids = self._prompt_ids(prompts, config)
        if should_stop is not None and should_stop():
            raise PredictionCancelled("nobody waits for this generation any more")
        results = self.generator.generate(ids, config, should_stop)
        with self._tokenizer_lock:
            for r in results:
                r["text"] = self.tokenizer.decode(r["token_ids"], skip_special_tokens=True)
        return results

    def stream(self, prompts: str | Sequence[str], **options) -> Iterator[dict]:
        """Like `generate`, one event per new token: {"index": prompt index, "token_id", "text": the new
        text it adds}; a row's last event has "finish_reason". Text is held back while it ends in an
        incomplete UTF-8 character."""
        config = GenerationConfig(**options)
        ids = self._prompt_ids(prompts, config)
        tokens: list[list[int]] = [[] for _ in ids]
        shown = [""] * len(ids)
        finished = np.zeros(len(ids), dtype=bool)
        for step, (new, done) in enumerate(self.generator.stream(ids, config), start=1):
            for row in np.flatnonzero(~finished):
                tokens[row].append(int(new[row]))
                with self._tokenizer_lock:
                    text = self.tokenizer.decode(tokens[row], skip_special_tokens=True)
                last = bool(done[row]) or step == config.max_new_tokens
                delta = text[len(shown[row]):] if last or not text.endswith("\ufffd") else ""
                shown[row] += delta
                event = {"index": int(row), "token_id": int(new[row]), "text": delta}
                if last:
                    event["finish_reason"] = "eos" if done[row] else "length"
                yield event
            finished = done

    def _run_batch(self, encodings: list[dict[str, list[int]]], adapters=None) -> np.ndarray:
        """Logits (B, C) or mean-pooled embeddings (B, H) for one padded batch; `adapters` is a multi
        graph's (AdapterState, one adapter name per row)."""
        feeds = self.pad(encodings)
        release = feeds["input_ids"].size > RELEASE_MEMORY_TOKENS
        if adapters is not None:
            state, names = adapters
            feeds[ADAPTER_INDEX_INPUT] = state.index(names)  # (B,)
            outputs = self.session.run(feeds, resident=state.feeds, release_memory=release)
        else:
            outputs = self.session.run(feeds, release_memory=release)
        if self.task == CLASSIFICATION:
            return outputs["logits"]
        hidden = outputs.get("last_hidden_state", outputs[self.session.output_names[0]])  # (B, T, H)
        if hidden.ndim != 3:
            raise ExportDirError(
                f"{self.session.path} outputs {self.session.output_names} of rank {hidden.ndim}: expected "
                "'logits' (classification) or a (batch, tokens, hidden) state (feature extraction)"
            )
        return mean_pool(hidden, feeds["attention_mask"])

    def _adapter_predictions(self, rows: list[np.ndarray], packs: list) -> Predictions:
        """Each row's logits cut to its adapter's num_labels (padded to the widest with -inf)."""
        width = max(p.num_labels for p in packs)
        logits = np.full((len(rows), width), -np.inf, dtype=np.float32)  # (N, C_max)
        for i, (row, pack) in enumerate(zip(rows, packs, strict=True)):
            logits[i, : pack.num_labels] = row[: pack.num_labels]
        probs = softmax(logits)
        ids = probs.argmax(axis=-1)
        maps = [p.id2label for p in packs]
        labels = [m.get(int(i), str(int(i))) for m, i in zip(maps, ids, strict=True)]
        return Predictions(self.task, {}, logits, probs, ids, labels, adapters=[p.name for p in packs],
                           row_id2label=maps)

    def _predictions(self, values: np.ndarray) -> Predictions:
        if self.task == FEATURE_EXTRACTION:
            return Predictions(task=self.task, embeddings=values)
        probs = softmax(values)  # (N, C)
        ids = probs.argmax(axis=-1)  # (N,)
        labels = [self.id2label.get(int(i), str(int(i))) for i in ids]
        return Predictions(self.task, self.id2label, values, probs, ids, labels)


def chunk_by_tokens(order: list[int], lengths: list[int], size: int, max_tokens: int | None) -> Iterator[list[int]]:
    """Split `order` (indices sorted by ascending length) into model batches of at most `size` rows
    and, when `max_tokens` is given, at most `max_tokens` padded tokens (rows x longest row); a
    single row longer than `max_tokens` runs alone."""
    chunk: list[int] = []
    for i in order:
        full = len(chunk) >= size or (max_tokens is not None and (len(chunk) + 1) * lengths[i] > max_tokens)
        if chunk and full:
            yield chunk
            chunk = []
        chunk.append(i)
    if chunk:
        yield chunk


def load_export_tokenizer(model_dir: str | os.PathLike) -> ExportTokenizer:
    """The tokenizer saved in an export directory (tokenizer.json, read with `tokenizers`); a clear
    error when it is missing or broken."""
    try:
        return ExportTokenizer.from_dir(model_dir)
    except CheckpointError as err:
        raise ExportDirError(str(err)) from err
