"""Adapter layer, injection and checkpoint round trip on tiny models."""

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2Model
from transformers.pytorch_utils import Conv1D

from adalora_deploy.config import AdaLoraConfig
from adalora_deploy.errors import CheckpointError, ConfigError
from adalora_deploy.layers import SVDLinear, merge, merge_adapters, orthogonal_penalty
from adalora_deploy.model import AdaLoraModel, prepare_model

from .conftest import ID2LABEL, make_checkpoint


def test_forward_is_the_equation():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    m = SVDLinear(base, r=3, scaling=2.0)
    with torch.no_grad():
        m.lam.copy_(torch.tensor([0.5, -1.0, 2.0]))
    x = torch.randn(4, 6)
    expected = base(x) + 2.0 * x @ (m.P @ torch.diag(m.lam) @ m.Q).T
    torch.testing.assert_close(m(x), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(m.delta_weight(), 2.0 * m.P @ torch.diag(m.lam) @ m.Q, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_merge_equals_adapter(kind):
    torch.manual_seed(0)
    base = nn.Linear(6, 5) if kind == "linear" else Conv1D(5, 6)
    m = SVDLinear(base, r=3, scaling=1.5)
    with torch.no_grad():
        m.lam.normal_()
    x = torch.randn(2, 3, 6)
    torch.testing.assert_close(merge(m)(x), m(x), atol=1e-5, rtol=0)
    assert type(merge(m)) is type(base)


def test_init_is_identity_and_head_trainable(tiny_bert_dir):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2).eval()
    x = torch.randint(0, 30522, (3, 9))
    ref = base(x).logits
    model = prepare_model(base, AdaLoraConfig(init_r=4, target_r=2))
    torch.testing.assert_close(model(input_ids=x).logits, ref, atol=0, rtol=0)
    assert len(model.adapters) == 2 * 6  # 2 layers x (q, k, v, attn out, intermediate, out)
    trainable = {n for n, p in model.model.named_parameters() if p.requires_grad}
    assert "classifier.weight" in trainable
    assert not any("word_embeddings" in n or n.endswith("query.base.weight") for n in trainable)


def test_gpt2_conv1d_injection():
    torch.manual_seed(0)
    model = GPT2Model(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=50, n_positions=32)).eval()
    x = torch.randint(0, 50, (2, 7))
    ref = model(x).last_hidden_state
    adapted = prepare_model(model, AdaLoraConfig(init_r=3, target_r=1), task="feature-extraction")
    assert len(adapted.adapters) == 2 * 4
    torch.testing.assert_close(adapted(input_ids=x).last_hidden_state, ref, atol=0, rtol=0)
    for m in adapted.adapters.values():
        m.lam.data.normal_()
    out = adapted(input_ids=x).last_hidden_state
    torch.testing.assert_close(merge_adapters(adapted.model)(x).last_hidden_state, out, atol=1e-5, rtol=0)


def test_unknown_target_module_is_clear(tiny_bert_dir):
    with pytest.raises(ConfigError, match="nonexistent_proj"):
        prepare_model(str(tiny_bert_dir), AdaLoraConfig(target_modules=["query", "nonexistent_proj"]), num_labels=2)


def test_orthogonal_penalty_by_hand():
    torch.manual_seed(0)
    m = SVDLinear(nn.Linear(4, 3), r=2, scaling=1.0)
    eye = torch.eye(2)
    expected = torch.linalg.norm(m.P.T @ m.P - eye) + torch.linalg.norm(m.Q @ m.Q.T - eye)
    torch.testing.assert_close(orthogonal_penalty([m]), expected)
    with torch.no_grad():  # orthonormal P columns and Q rows: zero penalty
        m.P.copy_(torch.eye(3)[:, :2])
        m.Q.copy_(torch.eye(4)[:2])
    assert orthogonal_penalty([m]).item() == pytest.approx(0.0, abs=1e-7)


def test_checkpoint_round_trip(tmp_path, tiny_bert_dir):
    saved = make_checkpoint(tmp_path / "ckpt", tiny_bert_dir, ranks={0: 0, 3: 2})
    loaded = AdaLoraModel.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.ranks() == saved.ranks()
    assert loaded.ranks()[next(iter(loaded.adapters))] == 0
    assert loaded.model.config.id2label == ID2LABEL
    x = torch.randint(0, 30522, (2, 11))
    torch.testing.assert_close(loaded(input_ids=x).logits, saved(input_ids=x).logits, atol=0, rtol=0)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == sorted(
        ["adapter.safetensors", "adalora_config.json", "fingerprint.safetensors", "special_tokens_map.json", "tokenizer.json",
         "tokenizer_config.json", "vocab.txt"]
    )


def test_checkpoint_refuses_mismatched_base(tmp_path, tiny_bert_dir):
    from .conftest import save_tiny_bert

    make_checkpoint(tmp_path / "ckpt", tiny_bert_dir)
    other = save_tiny_bert(tmp_path / "wider", hidden_size=48)
    with pytest.raises(CheckpointError, match="does not match its base model"):
        AdaLoraModel.from_pretrained(tmp_path / "ckpt", base=str(other))


def test_truncated_checkpoint_is_clear(tmp_path, tiny_bert_dir):
    make_checkpoint(tmp_path / "ckpt", tiny_bert_dir)
    f = tmp_path / "ckpt" / "adapter.safetensors"
    f.write_bytes(f.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        AdaLoraModel.from_pretrained(tmp_path / "ckpt")


def test_save_refuses_non_empty_out(tmp_path, tiny_bert_dir):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("user data")
    model = prepare_model(str(tiny_bert_dir), AdaLoraConfig(init_r=2, target_r=1), num_labels=2)
    from adalora_deploy.errors import OutputExistsError

    with pytest.raises(OutputExistsError, match="--overwrite"):
        model.save_pretrained(tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "user data"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary directory left behind


