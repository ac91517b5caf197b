"""Shared fixtures: tiny models built from configs (nothing downloaded), with the packaged MiniLM's
real WordPiece tokenizer, and checkpoints with known ranks."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ID2LABEL = {0: "rotten", 1: "fresh"}


def train_peft_adalora(model, steps: int, loss_fn, out, lr: float):
    """PEFT's own AdaLoRA loop on a PeftModel (backward, step, update_and_allocate, zero_grad), then
    save_pretrained(out). loss_fn(model) gives each step's loss."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step in range(steps):
        loss_fn(model).backward()
        optimizer.step()
        model.base_model.update_and_allocate(step)
        optimizer.zero_grad()
    model.save_pretrained(out)
    return out


def tiny_bert_config(**overrides):
    from transformers import BertConfig

    kwargs = dict(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=128, hidden_act="gelu",
    )
    kwargs.update(overrides)
    return BertConfig(**kwargs)


def minilm_tokenizer():
    from transformers import AutoTokenizer

    from adalora_deploy.model import resolve_model_path

    return AutoTokenizer.from_pretrained(resolve_model_path(None))


def save_tiny_bert(path: Path, seed: int = 0, **overrides) -> Path:
    """A tiny BertModel (the base, like MiniLM: no head) with the MiniLM tokenizer, saved to `path`."""
    from transformers import BertModel

    torch.manual_seed(seed)
    BertModel(tiny_bert_config(**overrides)).save_pretrained(path)
    minilm_tokenizer().save_pretrained(path)
    return path


def make_checkpoint(path: Path, base_dir: Path, ranks: dict[int, int] | None = None, seed: int = 0, **cfg):
    """Save an AdaLoRA checkpoint over `base_dir` with non-zero lam and known masks.

    `ranks` maps adapter index (registration order) -> effective rank; others keep rank init_r.
    Masked triplets get lam = 0, exactly as the allocator leaves them.
    """
    from adalora_deploy.config import AdaLoraConfig
    from adalora_deploy.model import prepare_model

    cfg = {"init_r": 4, "target_r": 2, "alpha": 8.0, **cfg}
    model = prepare_model(
        str(base_dir), AdaLoraConfig(**cfg), num_labels=2, id2label=ID2LABEL,
        label2id={v: k for k, v in ID2LABEL.items()},
    )
    torch.manual_seed(seed)
    with torch.no_grad():
        for i, m in enumerate(model.adapters.values()):
            m.lam.normal_(0.0, 0.5)
            keep = (ranks or {}).get(i, m.r)
            m.mask.zero_()
            m.mask[torch.randperm(m.r)[:keep]] = True
            m.lam.mul_(m.mask)
        model.model.classifier.weight.normal_(0.0, 0.5)
    model.eval()
    model.save_pretrained(path, tokenizer=minilm_tokenizer(), steps_done=10)
    return model


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert") / "model")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_bert_dir) -> Path:
    """A checkpoint with init_r 4: adapter 0 at rank 0, adapter 1 at rank 1, adapter 2 at rank 3."""
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint"
    make_checkpoint(path, tiny_bert_dir, ranks={0: 0, 1: 1, 2: 3})
    return path


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_export_root(tmp_path_factory, tiny_checkpoint) -> Path:
    """Export root of `tiny_checkpoint`: merged/ and factored/ (ranks pruned), by the package's exporter."""
    from adalora_deploy.exporters import export

    return Path(export(tiny_checkpoint, tmp_path_factory.mktemp("export") / "onnx", mode="both", prune_ranks=True))


# Labelled rows for int8 exports' evaluation. 24 rows: one evaluation batch, so that int8's per-batch
# activation scales are the same for the export's evaluation and the Predictor's (dynamic quantization
# depends on what shares a batch).
EVAL_TEXTS = [
    "a quietly devastating film", "the plot never comes together", "sharp, funny and humane",
    "a tedious mess from start to finish", "one of the year's best", "flat jokes and flatter acting",
    "it earns every tear", "overlong and underwritten", "a small miracle of a movie", "dull",
    "the cast is uniformly excellent", "nothing here feels alive", "smart and surprisingly moving",
    "an incoherent, noisy bore", "a delight", "lazy sequel filmmaking at its worst",
    "beautifully shot and acted", "the script is a disaster", "warm, witty, wise",
    "i wanted my two hours back", "a triumph of craft", "predictable from the first scene",
    "funny in all the right places", "painfully slow",
]


@pytest.fixture(scope="session")
def tiny_eval_csv(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("eval") / "eval.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i, text in enumerate(EVAL_TEXTS):
            writer.writerow([text, ID2LABEL[i % 2]])
    return path
