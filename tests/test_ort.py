"""adalora_deploy.ort, the one ONNX Runtime helper: the inputs it makes are what the exporters' validation,
the bench and the sessions' warm-up each made before they shared it, and the CUDA check gives one answer
to the exporters, the serving path and the bench."""

from __future__ import annotations

import re

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from adalora_deploy.bench.profile import op_times
from adalora_deploy.bench.run import make_feeds
from adalora_deploy.exporters.validate import CASES, InputCase, OrtRunner, make_inputs
from adalora_deploy.ort import (
    CPU_EP,
    CUDA_EP,
    ProviderUnavailableError,
    attention_mask,
    cuda_status,
    dummy_inputs,
    inference_session,
    providers_for,
    token_inputs,
)
from adalora_deploy.runtime.session import SessionConfig, choose_providers, open_session

from .conftest import tiny_bert_config

# -- the generators as they were written before the helper (references) ---------------------------------

def bench_feeds_before(batch, seq, vocab_size, seed):
    rng = np.random.default_rng(seed)
    low = min(1000, vocab_size - 1)
    return {
        "input_ids": rng.integers(low, vocab_size, size=(batch, seq), dtype=np.int64),
        "attention_mask": np.ones((batch, seq), dtype=np.int64),
        "token_type_ids": np.zeros((batch, seq), dtype=np.int64),
    }


def validation_inputs_before(case, config, input_names, seed):
    rng = np.random.default_rng(seed)
    shape = (case.batch, case.seq)
    step = case.seq // (case.batch + 1) if case.padding != "none" else 0
    mask = np.zeros(shape, dtype=np.int64)
    for i in range(case.batch):
        n = max(1, case.seq - i * step)
        if case.padding == "left":
            mask[i, case.seq - n:] = 1
        else:
            mask[i, :n] = 1
    pad = getattr(config, "pad_token_id", None) or 0
    allowed = np.setdiff1d(np.arange(config.vocab_size), [pad, getattr(config, "eos_token_id", None) or pad])
    ids = allowed[rng.integers(0, len(allowed), shape)].astype(np.int64)
    positions = np.where(mask == 0, 1, np.cumsum(mask, axis=-1) - 1).astype(np.int64)
    values = {"input_ids": np.where(mask == 1, ids, pad), "attention_mask": mask, "position_ids": positions}
    types = getattr(config, "type_vocab_size", 0) or 0
    if types > 0:
        values["token_type_ids"] = rng.integers(0, types, shape, dtype=np.int64) * mask
    return {name: values[name] for name in input_names}


def assert_same_feeds(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape, name
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


# -- inputs ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("vocab", [30522, 1500, 1001, 64])
@pytest.mark.parametrize("seed", [0, 3])
def test_bench_feeds_are_what_bench_drew_before(vocab, seed):
    feeds = make_feeds(4, 9, vocab, seed)
    assert_same_feeds(feeds, bench_feeds_before(4, 9, vocab, seed))
    low = min(1000, vocab - 1)
    assert feeds["input_ids"].min() >= low and feeds["input_ids"].max() < vocab


BERT = tiny_bert_config(pad_token_id=0)
NO_TYPES = tiny_bert_config(pad_token_id=3, eos_token_id=5, type_vocab_size=0, vocab_size=50)
DECODER_NAMES = ["input_ids", "attention_mask", "position_ids"]


@pytest.mark.parametrize("config, names", [(BERT, ["input_ids", "attention_mask", "token_type_ids"]),
                                           (NO_TYPES, DECODER_NAMES)], ids=["bert", "no-token-types"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.describe())
def test_validation_inputs_are_what_validation_made_before(config, names, case):
    for seed in (0, 2):
        assert_same_feeds(make_inputs(case, config, names, seed=seed),
                          validation_inputs_before(case, config, names, seed))


def test_validation_inputs_keep_pad_and_eos_out_of_real_tokens():
    case = InputCase(4, 33, "left")
    feeds = make_inputs(case, NO_TYPES, DECODER_NAMES, seed=1)
    mask, ids = feeds["attention_mask"], feeds["input_ids"]
    np.testing.assert_array_equal(mask.sum(axis=1), [33, 27, 21, 15])  # 33 - i * (33 // 5) tokens per row
    assert (mask[:, -1] == 1).all() and (ids[mask == 0] == 3).all()  # left padding, with the pad id
    assert not np.isin(ids[mask == 1], [3, 5]).any()
    np.testing.assert_array_equal(feeds["position_ids"][0], np.arange(33))
    with pytest.raises(Exception, match=r"token_type_ids"):  # the model has no segments
        make_inputs(case, NO_TYPES, ["input_ids", "token_type_ids"])


def test_attention_mask_rows():
    np.testing.assert_array_equal(attention_mask(3, 8, "right").sum(axis=1), [8, 6, 4])  # step 8 // 4
    np.testing.assert_array_equal(attention_mask(3, 8, "left")[:, 0], [1, 0, 0])
    assert attention_mask(2, 5).all()
    with pytest.raises(ValueError, match="padding"):
        attention_mask(2, 5, "middle")


def _graph(path, inputs: list) -> None:
    """A model whose outputs are its inputs (Identity), so ORT checks each feed's dtype and rank."""
    outs = [helper.make_tensor_value_info(f"out{i}", t, None) for i, (_, t, _) in enumerate(inputs)]
    nodes = [helper.make_node("Identity", [name], [f"out{i}"]) for i, (name, _, _) in enumerate(inputs)]
    ins = [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs]
    model = helper.make_model(helper.make_graph(nodes, "g", ins, outs), opset_imports=[helper.make_opsetid("", 13)],
                              ir_version=8)
    path.write_bytes(model.SerializeToString())


def test_dummy_inputs_of_an_encoder_export(tiny_export_root):
    session = open_session(tiny_export_root / "merged", SessionConfig(provider="cpu", warmup=False))
    feeds = session.dummy_feeds((3, 7))
    assert list(feeds) == ["input_ids", "attention_mask", "token_type_ids"]
    assert all(v.dtype == np.int64 and v.shape == (3, 7) for v in feeds.values())
    assert (feeds["input_ids"] == 1).all() and (feeds["attention_mask"] == 1).all()
    assert (feeds["token_type_ids"] == 0).all()
    assert np.isfinite(session.run(feeds)["logits"]).all()


def test_dummy_inputs_follow_the_graph(tmp_path):
    """Graph dtypes (int32, float16 past), a multi graph's adapter inputs, a KV cache's empty past,
    positions, and another tool's extra inputs; ORT runs them all."""
    B, T = "batch", "seq"
    _graph(tmp_path / "g.onnx", [
        ("input_ids", TensorProto.INT32, [B, T]), ("attention_mask", TensorProto.FLOAT, [B, T]),
        ("position_ids", TensorProto.INT64, [B, T]), ("past_key_values.0.key", TensorProto.FLOAT16, [B, 2, "past", 4]),
        ("extra_flag", TensorProto.INT64, [B, T]),
    ])
    _graph(tmp_path / "multi.onnx", [
        ("input_ids", TensorProto.INT64, [B, T]), ("adapter_index", TensorProto.INT64, [B]),
        ("layer.0.query.down", TensorProto.FLOAT, ["adapters", 32, "rank"]),
    ])
    session = inference_session(tmp_path / "g.onnx", [CPU_EP])
    feeds = dummy_inputs(session.get_inputs(), 2, 5)
    assert feeds["input_ids"].dtype == np.int32 and (feeds["input_ids"] == 1).all()
    assert feeds["attention_mask"].dtype == np.float32 and (feeds["attention_mask"] == 1).all()
    np.testing.assert_array_equal(feeds["position_ids"], [np.arange(5)] * 2)
    assert feeds["past_key_values.0.key"].shape == (2, 2, 0, 4)
    assert feeds["past_key_values.0.key"].dtype == np.float16
    assert (feeds["extra_flag"] == 1).all() and feeds["extra_flag"].shape == (2, 5)
    session.run(None, feeds)
    multi = inference_session(tmp_path / "multi.onnx", [CPU_EP])
    feeds = dummy_inputs(multi.get_inputs(), 3, 4)
    np.testing.assert_array_equal(feeds["adapter_index"], [0, 0, 0])
    assert feeds["layer.0.query.down"].shape == (1, 32, 1) and not feeds["layer.0.query.down"].any()
    multi.run(None, feeds)


def test_token_inputs_refuse_names_they_cannot_make():
    with pytest.raises(ValueError, match=r"\['pixel_values'\]"):
        token_inputs(1, 4, np.arange(10), names=["input_ids", "pixel_values"])


# -- one CUDA check -------------------------------------------------------------------------------------

def test_one_cuda_answer_for_exporters_serving_and_bench(tiny_export_root):
    """Validation (exporters), open_session (serving) and the bench's provider choice all follow
    cuda_status: CUDA where it really starts, else the CPU, and `cuda` names the reason it cannot."""
    usable, reason = cuda_status()
    expected = CUDA_EP if usable else CPU_EP
    model = tiny_export_root / "merged" / "model.onnx"
    assert OrtRunner(model, prefer_cuda=True).provider == expected
    assert OrtRunner(model, prefer_cuda=False).provider == CPU_EP
    assert open_session(model, SessionConfig(provider="auto", warmup=False)).provider == expected
    first = providers_for("auto")[0]
    assert (first[0] if isinstance(first, tuple) else first) == expected
    assert choose_providers(SessionConfig(provider="auto")) == providers_for("auto")
    if usable:
        assert open_session(model, SessionConfig(provider="cuda", warmup=False)).on_cuda
    else:
        assert reason and reason != "ok"
        for attempt in (lambda: providers_for("cuda"),
                        lambda: open_session(model, SessionConfig(provider="cuda", warmup=False))):
            with pytest.raises(ProviderUnavailableError, match=re.escape(reason.split("(")[0].strip())):
                attempt()


def test_profiled_op_times(tiny_export_root, tmp_path):
    model = tmp_path / "model.onnx"
    model.write_bytes((tiny_export_root / "merged" / "model.onnx").read_bytes())
    total, ops = op_times(model, make_feeds(2, 8, 30522, 0), ort.SessionOptions(), runs=2)
    assert total == pytest.approx(sum(ops.values())) and total > 0
    assert "MatMul" in ops and list(ops.values()) == sorted(ops.values(), reverse=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # the trace is removed
