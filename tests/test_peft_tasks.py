"""PEFT AdaLoRA adapters of the token-level task types (TOKEN_CLS, QUESTION_ANS, CAUSAL_LM): trained
with PEFT's own allocator, saved, exported merged and factored (pruned), and compared with PEFT's
model loaded back by PeftModel.from_pretrained."""

from __future__ import annotations

import pytest
import torch

from adalora_deploy.errors import CheckpointError
from adalora_deploy.exporters import export
from adalora_deploy.runtime import Predictor

from .conftest import train_peft_adalora
from .tiny_decoders import save_tiny_decoder

pytestmark = pytest.mark.slow
ATOL = 1e-4
STEPS = 10


def _base(task_type: str, path):
    import transformers

    cls = {"TOKEN_CLS": "AutoModelForTokenClassification", "QUESTION_ANS": "AutoModelForQuestionAnswering",
           "CAUSAL_LM": "AutoModelForCausalLM"}[task_type]
    kwargs = {"num_labels": 3} if task_type == "TOKEN_CLS" else {}
    torch.manual_seed(0)  # the same fresh head every time: PEFT saves the trained one
    return getattr(transformers, cls).from_pretrained(path, **kwargs)


def _loss(task_type: str, model, x: torch.Tensor) -> torch.Tensor:
    if task_type == "TOKEN_CLS":
        return model(input_ids=x, labels=x % 3).loss
    if task_type == "QUESTION_ANS":
        return model(input_ids=x, start_positions=x[:, 0] % 12, end_positions=x[:, 1] % 12).loss
    return model(input_ids=x, labels=x).loss


def _train_peft(task_type: str, base_dir, targets: list[str], vocab: int, out):
    from peft import AdaLoraConfig, get_peft_model

    config = AdaLoraConfig(task_type=task_type, init_r=4, target_r=2, lora_alpha=8, total_step=STEPS, tinit=2,
                           tfinal=3, deltaT=1, target_modules=targets)
    model = get_peft_model(_base(task_type, base_dir), config)
    torch.manual_seed(1)
    x = torch.randint(3, vocab, (8, 12))
    return train_peft_adalora(model, STEPS, lambda m: _loss(task_type, m, x), out, lr=5e-2)


def _peft_model(task_type: str, base_dir, adapter):
    from peft import PeftModel

    return PeftModel.from_pretrained(_base(task_type, base_dir), adapter).eval()


@pytest.mark.parametrize("task_type, outputs", [
    ("TOKEN_CLS", ("logits",)), ("QUESTION_ANS", ("start_logits", "end_logits")),
])
def test_encoder_task_adapters_export_and_match_peft(tmp_path, tiny_bert_dir, task_type, outputs):
    from transformers import AutoTokenizer

    adapter = _train_peft(task_type, tiny_bert_dir, ["query", "value", "intermediate.dense"], 30522, tmp_path / "a")
    peft_model = _peft_model(task_type, tiny_bert_dir, adapter)
    out = export(adapter, tmp_path / "onnx", prune_ranks=True)
    tokenizer = AutoTokenizer.from_pretrained(out / "merged")
    batch = tokenizer(["who wrote it?", "a long and winding question about nothing"],
                      ["ada did", "none at all"], padding=True, return_tensors="pt")
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        # PEFT's own model with its adapter layers, called directly: PeftModelForQuestionAnswering.forward
        # (peft 0.21) drops token_type_ids, so on pairs it computes something the base model never would.
        want = peft_model.get_base_model()(**batch)
    for mode in ("merged", "factored"):
        got = Predictor.from_pretrained(out, mode=mode, provider="cpu").session.run(
            {k: v.numpy() for k, v in batch.items()})
        for name in outputs:
            diff = (torch.from_numpy(got[name]) - getattr(want, name))[real].abs().max()
            assert diff <= ATOL, (mode, name, float(diff))


def test_causal_lm_adapter_exports_and_generates_like_peft(tmp_path):
    base = save_tiny_decoder(tmp_path / "llama", "llama")
    adapter = _train_peft("CAUSAL_LM", base, ["q_proj", "v_proj", "down_proj"], 300, tmp_path / "a")
    peft_model = _peft_model("CAUSAL_LM", base, adapter)
    out = export(adapter, tmp_path / "onnx", prune_ranks=True)
    prompts = ["the quick brown fox", "red"]
    for mode in ("merged", "factored"):
        predictor = Predictor.from_pretrained(out, mode=mode, provider="cpu")
        tokenizer = predictor.tokenizer
        tokenizer.padding_side = "left"
        tokenizer.pad_token = tokenizer.eos_token
        batch = tokenizer(prompts, padding=True, return_tensors="pt", return_token_type_ids=False)
        with torch.no_grad():
            want = peft_model.generate(**batch, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        want = want[:, batch["input_ids"].shape[1]:].tolist()
        got = [g["token_ids"] for g in predictor.generate(prompts, max_new_tokens=12)]
        eos = tokenizer.eos_token_id
        assert got == [w[: w.index(eos) + 1] if eos in w else w for w in want], mode


def test_token_cls_adapter_without_head_is_refused(tmp_path, tiny_bert_dir):
    from safetensors.torch import load_file, save_file

    adapter = _train_peft("TOKEN_CLS", tiny_bert_dir, ["query"], 30522, tmp_path / "a")
    state = load_file(str(adapter / "adapter_model.safetensors"))
    save_file({k: v for k, v in state.items() if ".classifier." not in k}, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(CheckpointError, match="no saved task head for token-classification.*TOKEN_CLS"):
        export(adapter, tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()
