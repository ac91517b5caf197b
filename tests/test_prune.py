"""prune(): masked triplets dropped, P/Q sliced per module, the model's function unchanged."""

import pytest
import torch
from torch import nn

from adalora_deploy.errors import CheckpointError
from adalora_deploy.layers import SVDLinear, svd_modules
from adalora_deploy.model import AdaLoraModel
from adalora_deploy.prune import prune, pruned_model


def _triplets(name: str, d_out: int, d_in: int, mask: list[bool], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    m = torch.tensor(mask)
    lam = torch.randn(len(mask), generator=g) * m  # masked lam exactly 0, as the allocator leaves it
    return {
        f"{name}.P": torch.randn(d_out, len(mask), generator=g), f"{name}.lam": lam,
        f"{name}.Q": torch.randn(len(mask), d_in, generator=g), f"{name}.mask": m,
    }


@pytest.fixture
def tensors() -> dict[str, torch.Tensor]:
    return {
        **_triplets("enc.q", 5, 3, [True, False, True, False], seed=0),
        **_triplets("enc.ffn", 7, 5, [False, False, False, False], seed=1),
        **_triplets("enc.o", 3, 5, [True, True, True, True], seed=2),
        "classifier.weight": torch.randn(2, 3),
    }


@pytest.mark.parametrize(
    ("name", "keep"), [("enc.q", [0, 2]), ("enc.o", [0, 1, 2, 3])],
)
def test_kept_triplets_are_sliced_in_order(tensors, name, keep):
    out = prune(tensors)
    idx = torch.tensor(keep)
    assert torch.equal(out.tensors[f"{name}.P"], tensors[f"{name}.P"][:, idx])
    assert torch.equal(out.tensors[f"{name}.lam"], tensors[f"{name}.lam"][idx])
    assert torch.equal(out.tensors[f"{name}.Q"], tensors[f"{name}.Q"][idx])
    assert out.tensors[f"{name}.mask"].all() and out.tensors[f"{name}.mask"].numel() == len(keep)


def test_ranks_params_and_rank_zero_module(tensors):
    out = prune(tensors)
    assert out.ranks_before == {"enc.q": 4, "enc.ffn": 4, "enc.o": 4}
    assert out.ranks_after == {"enc.q": 2, "enc.ffn": 0, "enc.o": 4}
    assert not any(k.startswith("enc.ffn.") for k in out.tensors)  # rank 0: the branch is gone
    assert torch.equal(out.tensors["classifier.weight"], tensors["classifier.weight"])  # passed through
    # a triplet holds a P column (d_out), a Q row (d_in) and lam
    assert out.params_before == 4 * (5 + 3 + 1) + 4 * (7 + 5 + 1) + 4 * (3 + 5 + 1)
    assert out.params_after == 2 * (5 + 3 + 1) + 0 + 4 * (3 + 5 + 1)


def test_pruned_branch_computes_the_same_product(tensors):
    out = prune(tensors)
    full = tensors["enc.q.P"] @ torch.diag(tensors["enc.q.lam"]) @ tensors["enc.q.Q"]
    sliced = out.tensors["enc.q.P"] @ torch.diag(out.tensors["enc.q.lam"]) @ out.tensors["enc.q.Q"]
    torch.testing.assert_close(sliced, full, atol=1e-6, rtol=0)


def test_masked_triplet_with_nonzero_lam_is_refused(tensors):
    tensors["enc.q.lam"][1] = 0.25  # mask says pruned, lam says active
    tensors["enc.ffn.lam"][3] = -1.0
    with pytest.raises(CheckpointError, match=r"enc.q triplets \[1\].*enc.ffn triplets \[3\]"):
        prune(tensors)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("enc.q.mask", torch.ones(4), "1-D bool"),
        ("enc.q.Q", torch.randn(3, 3), "inconsistent triplet shapes"),
    ],
)
def test_inconsistent_tensors_are_refused(tensors, key, value, message):
    tensors[key] = value
    with pytest.raises(CheckpointError, match=message):
        prune(tensors)


def test_missing_triplet_part_is_refused(tensors):
    del tensors["enc.o.Q"]
    with pytest.raises(CheckpointError, match="missing enc.o.Q"):
        prune(tensors)


def test_pruned_model_matches_unpruned_masked_model(tiny_checkpoint):
    model = AdaLoraModel.from_pretrained(tiny_checkpoint).eval()
    ranks = model.ranks()
    pruned = prune(model.adapter_state_dict())
    small = pruned_model(model.model, pruned).eval()
    for name, module in svd_modules(model.model).items():  # the input model is left as it was
        assert module.r == model.config.init_r
        new = small.get_submodule(name)
        if ranks[name] == 0:
            assert type(new) is nn.Linear  # no branch at all
        else:
            assert isinstance(new, SVDLinear) and new.r == ranks[name] and new.scaling == module.scaling
    assert sorted(ranks.values())[:3] == [0, 1, 3]  # the fixture's ranks are really exercised
    x = torch.randint(0, 30522, (3, 13))
    mask = torch.ones_like(x)
    mask[1, 9:] = 0
    with torch.no_grad():
        want = model(input_ids=x, attention_mask=mask).logits
        got = small(input_ids=x, attention_mask=mask).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
