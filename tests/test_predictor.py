"""The predictor against the PyTorch model it was exported from: logits, probabilities, labels,
embeddings; dynamic padding, chunking, and calls from several threads."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from adalora_deploy.errors import ConfigError
from adalora_deploy.model import AdaLoraModel
from adalora_deploy.runtime.predictor import Predictor
from adalora_deploy.runtime.session import RELEASE_MEMORY_TOKENS

from .conftest import ID2LABEL, minilm_tokenizer

INPUTS = [
    "a gripping, beautifully shot film",
    "dull",
    ("the premise is thin", "but the cast carries it with real warmth and wit"),
    "an overlong, self-indulgent mess that mistakes noise for energy and length for depth " * 3,
    "",
    ("short", "pair"),
    "fine.",
]


def reference_logits(model: AdaLoraModel, inputs, max_length: int) -> np.ndarray:
    """PyTorch logits, one unpadded input at a time: no padding can leak into the reference."""
    tok = minilm_tokenizer()
    rows = []
    for item in inputs:
        text, pair = (item, None) if isinstance(item, str) else item
        enc = tok(text, text_pair=pair, truncation=True, max_length=max_length, return_tensors="pt")
        with torch.no_grad():
            rows.append(model(**enc).logits[0].numpy())
    return np.stack(rows)


@pytest.fixture(scope="module")
def torch_model(tiny_checkpoint):
    return AdaLoraModel.from_pretrained(tiny_checkpoint).eval()


@pytest.mark.parametrize("mode", ["merged", "factored"])
def test_predictor_equals_pytorch(tiny_export_root, torch_model, mode):
    predictor = Predictor.from_pretrained(tiny_export_root, provider="cpu", mode=mode, batch_size=3)
    out = predictor.predict(INPUTS)
    ref = reference_logits(torch_model, INPUTS, predictor.max_length)  # (N, C)
    np.testing.assert_allclose(out.logits, ref, atol=1e-4, rtol=0)
    probs = torch.softmax(torch.from_numpy(ref).double(), dim=-1).numpy()
    np.testing.assert_allclose(out.probabilities, probs, atol=1e-5, rtol=0)
    assert out.labels == [ID2LABEL[int(i)] for i in ref.argmax(axis=1)]
    assert predictor.provider == "CPUExecutionProvider"


def test_records_carry_label_and_scores(tiny_export_root):
    predictor = Predictor.from_pretrained(tiny_export_root, provider="cpu")
    (record,) = predictor("a single text").records()
    assert set(record["scores"]) == set(ID2LABEL.values())
    assert record["label"] == max(record["scores"], key=record["scores"].get)
    assert sum(record["scores"].values()) == pytest.approx(1.0, abs=1e-9)


class RecordingSession:
    """Passes calls through to the real session and remembers each batch's shape."""

    def __init__(self, session):
        self.session, self.shapes, self.released = session, [], []

    def __getattr__(self, name):
        return getattr(self.session, name)

    def run(self, feeds, **options):
        self.shapes.append(feeds["input_ids"].shape)
        self.released.append(options.get("release_memory", False))
        return self.session.run(feeds, **options)


def test_chunks_and_pads_to_the_longest_in_each_batch(tiny_export_root):
    predictor = Predictor.from_pretrained(tiny_export_root, provider="cpu", batch_size=2)
    lengths = [len(e["input_ids"]) for e in predictor.tokenize(INPUTS)]
    predictor.session = RecordingSession(predictor.session)
    predictor.predict(INPUTS)
    shapes = predictor.session.shapes
    assert [b for b, _ in shapes] == [2, 2, 2, 1]  # 7 inputs in batches of at most 2
    # Sorted by length, batch k holds the 2k-th and (2k+1)-th shortest: padded to the longer of them.
    ordered = sorted(lengths)
    assert [t for _, t in shapes] == [max(ordered[i:i + 2]) for i in range(0, len(ordered), 2)]


def test_only_calls_over_release_memory_tokens_hand_memory_back(tiny_export_root):
    predictor = Predictor.from_pretrained(tiny_export_root, provider="cpu", batch_size=64)
    small = predictor.predict(["short"] * 64)  # 64 x 3 tokens
    predictor.session = RecordingSession(predictor.session)
    predictor.predict(["short"] * 64)
    big = predictor.predict(["short"] * 63 + ["word " * 1000])  # 64 x 128 padded tokens (the model's limit)
    again = predictor.predict(["short"] * 64)
    assert [b * t > RELEASE_MEMORY_TOKENS for b, t in predictor.session.shapes] == [False, True, False]
    assert predictor.session.released == [False, True, False]
    # Shrinking the arena and trimming the heap change nothing in the results, before or after.
    np.testing.assert_array_equal(again.logits, small.logits)
    np.testing.assert_allclose(big.logits[:31], small.logits[:31], atol=1e-5)


def test_truncates_to_the_model_limit(tiny_export_root, torch_model):
    predictor = Predictor.from_pretrained(tiny_export_root, provider="cpu")
    assert predictor.max_length == 128  # the tiny model's max_position_embeddings, below the tokenizer's 512
    long_text = "word " * 1000
    ref = reference_logits(torch_model, [long_text], 128)
    np.testing.assert_allclose(predictor(long_text).logits, ref, atol=1e-4, rtol=0)


def test_safe_from_several_threads(tiny_export_root):
    predictor = Predictor.from_pretrained(tiny_export_root, provider="cpu", batch_size=4)
    jobs = [INPUTS[i:] + INPUTS[:i] for i in range(len(INPUTS))] * 4
    serial = [predictor.predict(job).logits for job in jobs]
    with ThreadPoolExecutor(max_workers=8) as pool:
        parallel = list(pool.map(lambda job: predictor.predict(job).logits, jobs))
    for a, b in zip(serial, parallel, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("bad", [[], [1], [["a", "b", "c"]], [("a", 2)], [None]])
def test_bad_inputs_are_clear_errors(tiny_export_root, bad):
    predictor = Predictor.from_pretrained(tiny_export_root, provider="cpu")
    with pytest.raises(ConfigError, match="no inputs|must be a string"):
        predictor.predict(bad)


@pytest.mark.slow
def test_feature_extraction_embeddings_are_mean_pooled(tmp_path, tiny_bert_dir):
    from adalora_deploy.config import AdaLoraConfig
    from adalora_deploy.exporters import export
    from adalora_deploy.model import prepare_model

    model = prepare_model(str(tiny_bert_dir), AdaLoraConfig(init_r=4, target_r=2), task="feature-extraction")
    torch.manual_seed(1)
    with torch.no_grad():
        for m in model.adapters.values():
            m.lam.normal_(0.0, 0.5)
    model.eval().save_pretrained(tmp_path / "ckpt", tokenizer=minilm_tokenizer())
    root = export(tmp_path / "ckpt", tmp_path / "onnx", mode="merged")
    predictor = Predictor.from_pretrained(root, provider="cpu", batch_size=2)
    texts = [t for t in INPUTS if isinstance(t, str)]
    out = predictor.predict(texts)
    tok = minilm_tokenizer()
    for text, emb in zip(texts, out.embeddings, strict=True):
        enc = tok(text, truncation=True, max_length=predictor.max_length, return_tensors="pt")
        with torch.no_grad():
            ref = model(**enc).last_hidden_state[0].mean(dim=0).numpy()  # (H,): no padding, plain mean
        np.testing.assert_allclose(emb, ref, atol=1e-4, rtol=0)
    assert out.records()[0].keys() == {"embedding"}
