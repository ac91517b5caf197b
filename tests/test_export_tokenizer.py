"""The serving tokenizer (tokenizers alone) encodes and decodes exactly as transformers' tokenizer
loaded from the same export directory: MiniLM's WordPiece and byte-level BPE (GPT-2 style)."""

from __future__ import annotations

import numpy as np
import pytest

from adalora_deploy.exporters.onnx_export import save_tokenizer
from adalora_deploy.runtime.tokenizer import ExportTokenizer

from .conftest import minilm_tokenizer

TEXTS = [
    "a gripping film", "The plot NEVER comes together...", "naïve café — résumé, 100% über-cool!",
    "it's a don't-miss, isn't it?", "  extra   spaces  ", "emoji 🎬 and tabs\tand\nnewlines",
    "word " * 40, "well , it is n't so . is it ? they 're here !",
]
PAIRS = [("where does ada live?", "ada lovelace lives in rome and likes tea."), ("premise", "hypothesis " * 30)]
WORDS = [["ada", "lovelace", "visited", "rome"], ["grace", "hopper", ",", "berlin", "today"]]
CALLS = [  # (args, kwargs) of a call, the same on both tokenizers
    ((TEXTS,), {}),
    ((TEXTS,), {"truncation": True, "max_length": 12}),
    ((TEXTS[0],), {}),
    (([p[0] for p in PAIRS], [p[1] for p in PAIRS]), {"truncation": True, "max_length": 16}),
    (([p[0] for p in PAIRS], [p[1] for p in PAIRS]), {"truncation": "only_second", "max_length": 20,
                                                      "return_offsets_mapping": True}),
    (PAIRS[0], {"return_offsets_mapping": True}),
    ((WORDS,), {"is_split_into_words": True, "truncation": True, "max_length": 6}),
    ((WORDS[0],), {"is_split_into_words": True, "return_tensors": "np"}),
    ((TEXTS[:3],), {"padding": True, "return_tensors": "np"}),
    ((TEXTS[:3],), {"padding": "max_length", "max_length": 40, "truncation": True}),
    ((TEXTS[:2],), {"return_token_type_ids": False}),
]


def _bpe(add_prefix_space: bool, clean_up: bool = False):
    from transformers import GPT2TokenizerFast

    from .tiny_decoders import bpe_tokenizer

    fast = bpe_tokenizer()
    return GPT2TokenizerFast(tokenizer_object=fast._tokenizer, eos_token=fast.eos_token, bos_token=fast.eos_token,
                             pad_token=fast.eos_token, add_prefix_space=add_prefix_space,
                             clean_up_tokenization_spaces=clean_up)


TOKENIZERS = {"minilm-wordpiece": minilm_tokenizer, "bpe": lambda: _bpe(False), "bpe-prefix-space": lambda: _bpe(True),
              "bpe-clean-up": lambda: _bpe(False, clean_up=True)}


@pytest.fixture(scope="module", params=sorted(TOKENIZERS))
def pair(request, tmp_path_factory):
    """(transformers tokenizer, serving tokenizer), both read from the same saved directory."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp(request.param)
    save_tokenizer(TOKENIZERS[request.param](), out)
    return AutoTokenizer.from_pretrained(out), ExportTokenizer.from_dir(out)


def _plain(value):
    """Lists all the way down (offsets are tuples in one, arrays in the other form)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    return [_plain(v) for v in value] if isinstance(value, list | tuple) else value


def _same(want, got):
    assert list(got.keys()) == list(want.keys())
    for key in want:
        if isinstance(want[key], np.ndarray):
            assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, key
        assert _plain(got[key]) == _plain(want[key]), key


@pytest.mark.parametrize("case", range(len(CALLS)))
def test_encodings_are_transformers_encodings(pair, case):
    reference, serving = pair
    args, kwargs = CALLS[case]
    if kwargs.get("is_split_into_words") and not reference.add_prefix_space and type(reference).__name__ == "GPT2TokenizerFast":
        with pytest.raises((AssertionError, ValueError)):
            reference(*args, **kwargs)
        with pytest.raises(ValueError):
            serving(*args, **kwargs)
        return
    want, got = reference(*args, **kwargs), serving(*args, **kwargs)
    _same(want, got)
    batch = len(args[0]) if isinstance(args[0], list) and not (kwargs.get("is_split_into_words") and
                                                               isinstance(args[0][0], str)) else 1
    for i in range(batch):
        assert got.word_ids(i) == want.word_ids(i)
        assert got.sequence_ids(i) == want.sequence_ids(i)


def test_special_tokens_limits_and_decoding(pair):
    reference, serving = pair
    assert (serving.pad_token_id, serving.eos_token_id, serving.model_max_length, serving.padding_side) == (
        reference.pad_token_id, reference.eos_token_id, reference.model_max_length, reference.padding_side)
    assert serving.model_input_names == reference.model_input_names
    for text in TEXTS:
        ids = reference(text)["input_ids"]
        for skip in (False, True):
            assert serving.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip)


def test_missing_tokenizer_file_is_one_clear_error(tmp_path):
    from adalora_deploy.errors import CheckpointError

    with pytest.raises(CheckpointError, match="no tokenizer.json.*re-export"):
        ExportTokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a tokenizer file"):
        ExportTokenizer.from_dir(tmp_path)
