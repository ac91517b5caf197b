"""The export's tokenizer, read with the `tokenizers` library alone (no transformers, no torch).

An export directory holds the fast tokenizer's `tokenizer.json` and transformers'
`tokenizer_config.json` / `special_tokens_map.json`. `ExportTokenizer` reads them and answers the
part of transformers' tokenizer API that serving uses, with the same encodings: the same ids,
token type ids, attention masks, offsets, word and sequence ids, truncation and padding (both are
done by the same Rust backend transformers' fast tokenizers call), and the same decoding.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from adalora_deploy.constants import SPECIAL_TOKENS_FILE, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE
from adalora_deploy.errors import CheckpointError
from adalora_deploy.io import read_json

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# transformers' PreTrainedTokenizerBase default, for exports that do not record their own.
DEFAULT_INPUT_NAMES = ("input_ids", "token_type_ids", "attention_mask")
TRUNCATION_STRATEGIES = ("longest_first", "only_first", "only_second")
VERY_LARGE_LENGTH = int(1e30)  # transformers' model_max_length when the config sets none
# transformers' clean_up_tokenization: spaces before punctuation and English contractions.
CLEANUPS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
            (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


class Encoded(dict):
    """What a call returns: {"input_ids", ["token_type_ids"], "attention_mask", ["offset_mapping"]},
    lists per input (or one list for one unbatched input), or arrays with return_tensors."""

    def __init__(self, data: dict, encodings: list):
        super().__init__(data)
        self.encodings = encodings

    def word_ids(self, index: int = 0) -> list[int | None]:
        return self.encodings[index].word_ids

    def sequence_ids(self, index: int = 0) -> list[int | None]:
        return self.encodings[index].sequence_ids


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


class ExportTokenizer:
    """The tokenizer of an export directory, called like a transformers fast tokenizer.

    Args:
        backend: the `tokenizers.Tokenizer` read from tokenizer.json.
        config: tokenizer_config.json, with special_tokens_map.json's tokens over it.
    """

    def __init__(self, backend, config: dict):
        self.backend = backend
        self.backend.no_padding()
        self.backend.no_truncation()
        self.model_max_length = int(config.get("model_max_length") or VERY_LARGE_LENGTH)
        self.padding_side = config.get("padding_side", "right")
        self.truncation_side = config.get("truncation_side", "right")
        self.model_input_names = list(config.get("model_input_names") or DEFAULT_INPUT_NAMES)
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        self.add_prefix_space = bool(config.get("add_prefix_space", False)) or _byte_level_prefix(backend)
        self.byte_level = _is_byte_level(backend)
        for name in SPECIAL_TOKENS:
            setattr(self, name, _token_text(config.get(name)))

    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike) -> ExportTokenizer:
        """Read `model_dir`/tokenizer.json and its configs; CheckpointError when it is missing or broken."""
        from tokenizers import Tokenizer

        model_dir = Path(model_dir)
        path = model_dir / TOKENIZER_FILE
        if not path.is_file():
            raise CheckpointError(f"{model_dir} has no {TOKENIZER_FILE} (the fast tokenizer serving reads): re-export it")
        try:
            backend = Tokenizer.from_file(str(path))
        except Exception as err:  # the Rust side raises plain Exception on a malformed file
            raise CheckpointError(f"{path} is not a tokenizer file ({str(err)[:160]}): re-export it") from err
        config = {}
        if (model_dir / TOKENIZER_CONFIG_FILE).is_file():
            config = read_json(model_dir / TOKENIZER_CONFIG_FILE, "tokenizer config")
        if (model_dir / SPECIAL_TOKENS_FILE).is_file():
            special = read_json(model_dir / SPECIAL_TOKENS_FILE, "special tokens map")
            config.update({k: v for k, v in special.items() if k in SPECIAL_TOKENS and v})
        return cls(backend, config)

    def _token_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def pad_token_id(self) -> int | None:
        return self._token_id(self.pad_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._token_id(self.eos_token)

    @property
    def bos_token_id(self) -> int | None:
        return self._token_id(self.bos_token)

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __call__(
        self, text, text_pair=None, *, add_special_tokens: bool = True, padding: bool | str = False,
        truncation: bool | str = False, max_length: int | None = None, is_split_into_words: bool = False,
        return_offsets_mapping: bool = False, return_token_type_ids: bool | None = None,
        return_attention_mask: bool | None = None, return_tensors: str | None = None,
    ) -> Encoded:
        """Encode one input or a batch, as transformers' fast tokenizers do.

        Args:
            text: a text, a list of texts, or (is_split_into_words) a list of words / of word lists.
            text_pair: the second text(s) of pair inputs.
            padding: False, True / "longest", or "max_length".
            truncation: False, True (= "longest_first"), "longest_first", "only_first" or "only_second";
                max_length defaults to model_max_length.
            return_tensors: None (lists), "np", or "pt" (with the torch the caller has imported).
        """
        batched = isinstance(text, list | tuple) and (not is_split_into_words or isinstance(text[0], list | tuple))
        texts = list(text) if batched else [text]
        pairs = (list(text_pair) if batched else [text_pair]) if text_pair is not None else None
        inputs = list(zip(texts, pairs, strict=True)) if pairs is not None else texts
        if is_split_into_words and self.byte_level and not self.add_prefix_space:
            raise ValueError("a byte-level BPE tokenizer takes words only when saved with add_prefix_space=True")
        encodings = self._encode(inputs, add_special_tokens, padding, truncation, max_length, is_split_into_words)
        data = self._fields(encodings, return_offsets_mapping, return_token_type_ids, return_attention_mask)
        if return_tensors is not None:
            return Encoded({k: _tensor(v, return_tensors) for k, v in data.items()}, encodings)
        return Encoded(data if batched else {k: v[0] for k, v in data.items()}, encodings)

    def _encode(self, inputs, add_special_tokens, padding, truncation, max_length, is_split_into_words) -> list:
        # Truncation and padding are set for this call only; callers share one instance under a lock.
        if truncation:
            strategy = "longest_first" if truncation is True else truncation
            if strategy not in TRUNCATION_STRATEGIES:
                raise ValueError(f"truncation {truncation!r}: use True or one of {', '.join(TRUNCATION_STRATEGIES)}")
            self.backend.enable_truncation(max_length or self.model_max_length, strategy=strategy,
                                           direction=self.truncation_side)
        if padding:
            if self.pad_token_id is None:
                raise ValueError("padding needs a pad token: set tokenizer.pad_token (e.g. to tokenizer.eos_token)")
            self.backend.enable_padding(direction=self.padding_side, pad_id=self.pad_token_id,
                                        pad_token=self.pad_token, length=max_length if padding == "max_length" else None)
        try:
            return self.backend.encode_batch(inputs, add_special_tokens=add_special_tokens,
                                             is_pretokenized=is_split_into_words)
        finally:
            self.backend.no_truncation()
            self.backend.no_padding()

    def _fields(self, encodings, offsets: bool, type_ids: bool | None, mask: bool | None) -> dict:
        data = {"input_ids": [e.ids for e in encodings]}
        if type_ids if type_ids is not None else "token_type_ids" in self.model_input_names:
            data["token_type_ids"] = [e.type_ids for e in encodings]
        if mask if mask is not None else "attention_mask" in self.model_input_names:
            data["attention_mask"] = [e.attention_mask for e in encodings]
        if offsets:
            data["offset_mapping"] = [e.offsets for e in encodings]
        return data

    def decode(self, ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool | None = None) -> str:
        """Token ids -> text, with transformers' optional clean-up of spaces before punctuation."""
        ids = [int(ids)] if isinstance(ids, int | np.integer) else [int(i) for i in ids]
        text = self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        clean = self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None else clean_up_tokenization_spaces
        if clean:
            for before, after in CLEANUPS:
                text = text.replace(before, after)
        return text

    def batch_decode(self, sequences, **kwargs) -> list[str]:
        return [self.decode(ids, **kwargs) for ids in sequences]


def _pre_tokenizers(backend) -> list[dict]:
    import json

    spec = json.loads(backend.to_str()).get("pre_tokenizer") or {}
    return spec.get("pretokenizers", [spec]) if spec.get("type") == "Sequence" else [spec]


def _is_byte_level(backend) -> bool:
    return any(p.get("type") == "ByteLevel" for p in _pre_tokenizers(backend))


def _byte_level_prefix(backend) -> bool:
    return any(p.get("type") == "ByteLevel" and p.get("add_prefix_space") for p in _pre_tokenizers(backend))


def _tensor(rows, kind: str):
    """Rows of equal length -> one array, (B, T) (or (B, T, 2) for offsets)."""
    if kind not in ("np", "pt"):
        raise ValueError(f"return_tensors {kind!r}: use 'np', 'pt' or None")
    array = np.asarray(rows, dtype=np.int64)
    if kind == "np":
        return array
    torch = sys.modules.get("torch")  # serving never imports torch; a caller asking for torch tensors has
    if torch is None:
        raise ValueError("return_tensors='pt' needs torch imported by the caller; serving uses 'np'")
    return torch.from_numpy(array)
