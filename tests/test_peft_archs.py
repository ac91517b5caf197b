"""PEFT AdaLoRA adapters (SEQ_CLS, FEATURE_EXTRACTION) on the families beyond BERT: exported and compared
with PEFT's own model; a DeBERTa adapter whose pooler PEFT left unsaved is refused, naming it."""

from __future__ import annotations

import pytest
import torch

from adalora_deploy.errors import CheckpointError
from adalora_deploy.exporters import export

from .conftest import train_peft_adalora
from .test_architectures import _save_base

pytestmark = pytest.mark.slow
ATOL = 1e-4
STEPS = 6
AUTO = {"SEQ_CLS": "AutoModelForSequenceClassification", "FEATURE_EXTRACTION": "AutoModel"}
OUTPUT = {"SEQ_CLS": "logits", "FEATURE_EXTRACTION": "last_hidden_state"}


def _base(task_type: str, path):
    import transformers

    torch.manual_seed(0)  # the same fresh head every time: PEFT saves the trained one
    kwargs = {"num_labels": 3} if task_type == "SEQ_CLS" else {}
    return getattr(transformers, AUTO[task_type]).from_pretrained(path, **kwargs)


def _train_peft(task_type: str, base_dir, out, modules_to_save=None):
    from peft import AdaLoraConfig, get_peft_model

    model = _base(task_type, base_dir)
    targets = ["q_proj", "v_proj", "down_proj"] if model.config.model_type != "deberta-v2" else [
        "query_proj", "value_proj", "intermediate.dense"]
    config = AdaLoraConfig(task_type=task_type, init_r=4, target_r=2, lora_alpha=8, total_step=STEPS, tinit=1,
                           tfinal=2, deltaT=1, target_modules=targets, modules_to_save=modules_to_save)
    model = get_peft_model(model, config)
    torch.manual_seed(1)
    x = torch.randint(3, 290, (4, 10))

    def loss(m):
        if task_type == "SEQ_CLS":
            return m(input_ids=x, labels=x[:, 0] % 3).loss
        return m(input_ids=x).last_hidden_state.pow(2).mean()

    return train_peft_adalora(model, STEPS, loss, out, lr=5e-2)


def _base_dir(tmp_path, model_type):
    import json

    base = _save_base(tmp_path / "base", model_type)
    config = json.loads((base / "config.json").read_text())
    config["pad_token_id"] = config.get("pad_token_id") or config["eos_token_id"]  # PEFT users must set one too
    (base / "config.json").write_text(json.dumps(config))
    return base


@pytest.mark.parametrize("model_type, task_type, modules_to_save", [
    ("deberta-v2", "SEQ_CLS", ["classifier", "pooler"]),
    ("qwen2", "SEQ_CLS", None),
    ("llama", "FEATURE_EXTRACTION", None),
])
def test_peft_adapter_exports_and_matches_peft(tmp_path, model_type, task_type, modules_to_save):
    import onnxruntime as ort
    from peft import PeftModel

    base = _base_dir(tmp_path, model_type)
    adapter = _train_peft(task_type, base, tmp_path / "adapter", modules_to_save)
    peft_model = PeftModel.from_pretrained(_base(task_type, base), adapter).eval()
    out = export(adapter, tmp_path / "onnx", mode="both", prune_ranks=True)
    x = torch.randint(3, 290, (2, 9))
    mask = torch.ones_like(x)
    with torch.no_grad():
        want = getattr(peft_model(input_ids=x, attention_mask=mask), OUTPUT[task_type]).numpy()
    for mode in ("merged", "factored"):
        session = ort.InferenceSession(str(out / mode / "model.onnx"), providers=["CPUExecutionProvider"])
        feeds = {"input_ids": x.numpy(), "attention_mask": mask.numpy(),
                 "position_ids": (mask.cumsum(-1) - 1).numpy()}
        names = [i.name for i in session.get_inputs()]
        got = session.run([OUTPUT[task_type]], {k: v for k, v in feeds.items() if k in names})[0]
        assert abs(got - want).max() <= ATOL


def test_deberta_adapter_without_its_pooler_is_refused(tmp_path):
    base = _base_dir(tmp_path, "deberta-v2")
    adapter = _train_peft("SEQ_CLS", base, tmp_path / "adapter")  # PEFT's default saves only the classifier
    with pytest.raises(CheckpointError, match=r"does not hold pooler\.dense.*modules_to_save=\['classifier', 'pooler'\]"):
        export(adapter, tmp_path / "onnx", mode="merged")
    assert not (tmp_path / "onnx").exists()
