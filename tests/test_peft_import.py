"""PEFT AdaLoRA adapters: lora_A/E/B -> Q/lam/P, rank_pattern and PEFT's scaling honoured, the head
kept, and the exported ONNX logits equal to the PEFT model's (loaded back with PeftModel)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adalora_deploy.errors import CheckpointError
from adalora_deploy.exporters import export
from adalora_deploy.peft_import import load_peft_adapter, read_peft_adapter

from .conftest import train_peft_adalora

pytestmark = pytest.mark.slow
INIT_R, ALPHA = 4, 8
TARGETS = ["query", "value", "intermediate.dense"]


def _seq_cls(base_dir: Path):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)  # the same fresh head every time: PEFT saves the trained one
    return AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=2)


@pytest.fixture(scope="module")
def peft_adapter(tmp_path_factory, tiny_bert_dir) -> Path:
    """A tiny PEFT AdaLoRA model trained for 12 steps with update_and_allocate, then saved."""
    from peft import AdaLoraConfig, get_peft_model

    config = AdaLoraConfig(task_type="SEQ_CLS", init_r=INIT_R, target_r=2, lora_alpha=ALPHA, total_step=12, tinit=2,
                           tfinal=3, deltaT=1, target_modules=TARGETS)
    model = get_peft_model(_seq_cls(tiny_bert_dir), config)
    torch.manual_seed(1)
    x, y = torch.randint(0, 30522, (8, 12)), torch.randint(0, 2, (8,))
    out = tmp_path_factory.mktemp("peft") / "adapter"
    return train_peft_adalora(model, 12, lambda m: m(input_ids=x, labels=y).loss, out, lr=2e-2)


@pytest.fixture(scope="module")
def peft_model(peft_adapter, tiny_bert_dir):
    from peft import PeftModel

    return PeftModel.from_pretrained(_seq_cls(tiny_bert_dir), peft_adapter).eval()


def test_rank_pattern_is_non_trivial(peft_adapter):
    pattern = json.loads((peft_adapter / "adapter_config.json").read_text())["rank_pattern"]
    kept = [sum(v) for v in pattern.values()]
    assert len(pattern) == 2 * len(TARGETS) and min(kept) < INIT_R and sum(kept) < INIT_R * len(pattern)


def test_tensors_map_to_triplets_at_their_pattern_positions(peft_adapter):
    adapter = read_peft_adapter(peft_adapter)
    config = json.loads((peft_adapter / "adapter_config.json").read_text())
    state = load_file(str(peft_adapter / "adapter_model.safetensors"))
    assert adapter.scaling == pytest.approx(ALPHA / (INIT_R + 1e-5), rel=1e-12)  # PEFT's ranknum + 1e-5
    for key, pattern in config["rank_pattern"].items():
        module = key[: -len(".lora_E")]
        keep = torch.tensor(pattern).nonzero().flatten()
        A, E, B = (state[f"base_model.model.{module}.{k}"] for k in ("lora_A", "lora_E", "lora_B"))
        assert torch.equal(adapter.tensors[f"{module}.mask"], torch.tensor(pattern))
        assert torch.equal(adapter.tensors[f"{module}.Q"][keep], A)
        assert torch.equal(adapter.tensors[f"{module}.lam"][keep], E.flatten())
        assert torch.equal(adapter.tensors[f"{module}.P"][:, keep], B)
        dropped = (~torch.tensor(pattern)).nonzero().flatten()
        assert (adapter.tensors[f"{module}.lam"][dropped] == 0).all()
    assert torch.equal(adapter.tensors["classifier.weight"], state["base_model.model.classifier.weight"])
    assert adapter.task == "sequence-classification" and adapter.head_modules == ["classifier"]


def test_imported_model_equals_peft_model_in_pytorch(peft_adapter, peft_model, tiny_bert_dir):
    ours = load_peft_adapter(peft_adapter)
    x = torch.randint(0, 30522, (3, 11))
    mask = torch.ones_like(x)
    mask[2, 5:] = 0
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=x, attention_mask=mask).logits,
                                   peft_model(input_ids=x, attention_mask=mask).logits, atol=1e-5, rtol=0)


def test_exported_onnx_logits_equal_peft_logits(tmp_path, peft_adapter, peft_model):
    from optimum.onnxruntime import ORTModelForSequenceClassification
    from transformers import AutoTokenizer

    out = export(peft_adapter, tmp_path / "onnx", prune_ranks=True)
    tokenizer = AutoTokenizer.from_pretrained(out / "merged")
    batch = tokenizer(["a film", "nothing works in this long and tired sequel"], padding=True, return_tensors="pt")
    with torch.no_grad():
        want = peft_model(**batch).logits
    for mode in ("merged", "factored"):
        got = ORTModelForSequenceClassification.from_pretrained(out / mode, provider="CPUExecutionProvider")(**batch).logits
        torch.testing.assert_close(torch.as_tensor(got), want, atol=1e-4, rtol=0)
        manifest = json.loads((out / mode / "adalora_manifest.json").read_text())
        assert manifest["source"]["kind"] == "peft-adalora"
    pattern = json.loads((peft_adapter / "adapter_config.json").read_text())["rank_pattern"]
    ranks_after = json.loads((out / "factored" / "adalora_manifest.json").read_text())["ranks_after"]
    assert ranks_after == {k[: -len(".lora_E")]: sum(v) for k, v in pattern.items()}


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_plain_lora_adapter_is_refused(tmp_path, tiny_bert_dir):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_seq_cls(tiny_bert_dir), LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query"]))
    model.save_pretrained(tmp_path / "lora")
    with pytest.raises(CheckpointError, match="PEFT LORA adapter; only AdaLoRA adapters"):
        export(tmp_path / "lora", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_rank_pattern_that_does_not_match_the_weights_is_refused(tmp_path, peft_adapter):
    broken = _copy(peft_adapter, tmp_path / "broken")
    config = json.loads((broken / "adapter_config.json").read_text())
    key = next(iter(config["rank_pattern"]))
    config["rank_pattern"][key] = [True] * INIT_R if sum(config["rank_pattern"][key]) < INIT_R else [False] * INIT_R
    (broken / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="do not belong together"):
        read_peft_adapter(broken)


def test_pickled_weights_only_are_refused(tmp_path, peft_adapter):
    broken = _copy(peft_adapter, tmp_path / "bin")
    (broken / "adapter_model.safetensors").rename(broken / "adapter_model.bin")
    with pytest.raises(CheckpointError, match="safe_serialization=True"):
        read_peft_adapter(broken)


def test_adapter_without_head_cannot_export_classification(tmp_path, peft_adapter):
    broken = _copy(peft_adapter, tmp_path / "nohead")
    state = load_file(str(broken / "adapter_model.safetensors"))
    save_file({k: v for k, v in state.items() if ".classifier." not in k}, str(broken / "adapter_model.safetensors"))
    with pytest.raises(CheckpointError, match="no saved task head for sequence-classification"):
        load_peft_adapter(broken)
