"""Training: the plain loop behind `train()` and the Hugging Face Trainer integration, on tiny models."""

import copy
import csv
import json
import random

import pytest
import torch
from safetensors.torch import load_file

from adalora_deploy.allocator import RankAllocator
from adalora_deploy.config import AdaLoraConfig
from adalora_deploy.errors import ConfigError, DivergedError, OutputExistsError
from adalora_deploy.model import AdaLoraModel, prepare_model
from adalora_deploy.training import AdaLoraTrainer, TrainConfig, train

from .conftest import ID2LABEL, minilm_tokenizer, save_tiny_bert

POSITIVE = ("good", "great", "fine", "nice", "superb")
NEGATIVE = ("bad", "awful", "poor", "dull", "boring")


def separable_rows(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Sentences of three sentiment words, all from one class: separable by the words alone."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = POSITIVE if i % 2 else NEGATIVE
        rows.append((" ".join(rng.choice(words) for _ in range(3)), "positive" if i % 2 else "negative"))
    return rows


def write_rows(path, rows) -> str:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("text", "label"))
        writer.writerows(rows)
    return str(path)


@pytest.fixture(scope="module")
def nodrop_bert_dir(tmp_path_factory):
    """A tiny BERT without dropout, so that two forward passes on equal inputs are equal. Its weights
    are drawn with std 0.1: at BERT's 0.02 a random 2-layer model's [CLS] output barely depends on
    the input (class means differ by ~0.002), and nothing would learn in a few steps."""
    return save_tiny_bert(
        tmp_path_factory.mktemp("nodrop") / "model", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        initializer_range=0.1,
    )


@pytest.fixture(scope="module")
def separable_csv(tmp_path_factory):
    return write_rows(tmp_path_factory.mktemp("data") / "separable.csv", separable_rows(400))


# -- config ---------------------------------------------------------------------------------------


def test_schedule_defaults_scale_with_steps():
    cfg = TrainConfig(steps=200)
    assert (cfg.tinit, cfg.tfinal, cfg.delta_t) == (20, 60, 2)
    assert TrainConfig(steps=5).delta_t == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"steps": 10, "tinit": 6, "tfinal": 4}, r"tinit \+ tfinal \(6 \+ 4 = 10\) must be < total_step \(10\)"),
        ({"init_r": 4, "target_r": 6}, r"target_r \(6\) must be between 0 and init_r \(4\)"),
        ({"steps": 0}, r"steps \(0\) must be >= 1"),
        ({"lr": 0.0}, r"lr \(0.0\) must be > 0"),
        ({"delta_t": 0}, r"delta_t \(0\) must be >= 1"),
        ({"importance": "random"}, "importance .* must be one of"),
    ],
)
def test_bad_config_names_value_and_fix(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**kwargs)


def test_non_empty_out_refused_before_any_work(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    # The data path does not exist either: the refusal must come first, before data or model loading.
    with pytest.raises(OutputExistsError, match="exists and is not empty"):
        train(progress=False, data=str(tmp_path / "missing.csv"), out=str(out))
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


# -- the plain loop -------------------------------------------------------------------------------


@pytest.mark.slow
def test_train_learns_and_checkpoint_round_trips(tmp_path, nodrop_bert_dir, separable_csv):
    out = tmp_path / "ckpt"
    result = train(
        progress=False, model=str(nodrop_bert_dir), data=separable_csv, steps=60, batch_size=16, lr=1e-2,
        init_r=4, target_r=2, tinit=10, tfinal=20, delta_t=2, out=str(out),
    )
    first, last = sum(result.losses[:10]) / 10, sum(result.losses[-10:]) / 10
    assert last < 0.2 * first, (first, last)
    assert result.eval_accuracy >= 0.9 and result.eval_examples == 40
    n = len(result.model.adapters)
    assert result.budgets[0] == 4 * n and result.budgets[-1] == 2 * n
    assert sum(result.model.ranks().values()) == 2 * n  # the final budget, met exactly

    loaded = AdaLoraModel.from_pretrained(out).eval()
    assert loaded.ranks() == result.model.ranks()
    for name, m in result.model.adapters.items():
        twin = loaded.adapters[name]
        assert torch.equal(twin.mask, m.mask) and torch.equal(twin.lam, m.lam), name
        assert torch.equal(m.lam[~m.mask], torch.zeros_like(m.lam[~m.mask]))  # pruned triplets have lam = 0
    assert all((m.lam[m.mask] != 0).all() for m in result.model.adapters.values())  # kept triplets trained
    x = minilm_tokenizer()(["good great fine", "bad awful dull"], return_tensors="pt", padding=True)
    torch.testing.assert_close(loaded(**x).logits, result.model.eval()(**x).logits, atol=1e-6, rtol=0)

    import json

    meta = json.loads((out / "adalora_config.json").read_text())
    assert meta["eval_accuracy"] == result.eval_accuracy and meta["steps_done"] == 60
    assert meta["train"]["data"] == separable_csv and meta["id2label"] == {"0": "negative", "1": "positive"}
    assert (out / "tokenizer.json").is_file()


def test_allocator_sees_the_steps_gradients(monkeypatch, nodrop_bert_dir, separable_csv):
    """In `fit`, update_and_allocate(step) runs once per step, 1..T, while that step's grads are set."""
    seen = []
    original = RankAllocator.update_and_allocate

    def recording(self, step):
        seen.append((step, all(m.lam.grad is not None and m.lam.grad.abs().sum() > 0 for m in self.modules.values())))
        return original(self, step)

    monkeypatch.setattr(RankAllocator, "update_and_allocate", recording)
    train(progress=False, model=str(nodrop_bert_dir), data=separable_csv, steps=6, batch_size=4,
          init_r=2, target_r=1, tinit=1, tfinal=1)
    assert seen == [(step, True) for step in range(1, 7)]


def test_a_diverged_run_keeps_the_last_weights_whose_loss_was_finite(monkeypatch, tmp_path, nodrop_bert_dir, separable_csv):
    """After step 3 is applied, one lam is set to inf: the gradient norm at step 4 is NaN, so the weights
    after step 3 are bad; the run must stop there and save exactly the weights after step 2 (which gave
    step 3 its finite loss and gradients), masks and head included, marked stopped early."""
    after = {}  # step -> the saved tensors after that step (allocation included)
    original_init, original_update = RankAllocator.__init__, RankAllocator.update_and_allocate

    def init(self, model, *args):
        original_init(self, model, *args)
        self.whole = model

    def update(self, step):
        budget = original_update(self, step)
        after[step] = {k: v.clone() for k, v in self.whole.adapter_state_dict().items()}
        if step == 3:
            with torch.no_grad():
                next(iter(self.modules.values())).lam[0] = float("inf")
        return budget

    monkeypatch.setattr(RankAllocator, "__init__", init)
    monkeypatch.setattr(RankAllocator, "update_and_allocate", update)
    out = tmp_path / "ckpt"
    with pytest.raises(DivergedError) as caught:
        train(progress=False, model=str(nodrop_bert_dir), data=separable_csv, steps=20, batch_size=4, init_r=2,
              target_r=1, tinit=1, tfinal=2, delta_t=1, out=str(out))
    err = caught.value
    assert (err.step, err.steps_done, err.checkpoint, sorted(after)) == (4, 2, out, [1, 2, 3])
    assert not torch.equal(after[2][next(k for k in after[2] if k.endswith(".lam"))],
                           after[1][next(k for k in after[1] if k.endswith(".lam"))])  # the steps did move lam
    saved = load_file(out / "adapter.safetensors")
    assert saved.keys() == after[2].keys() and all(torch.equal(saved[k], after[2][k]) for k in saved)
    assert all(torch.equal(v, after[2][k]) for k, v in err.model.adapter_state_dict().items())
    meta = json.loads((out / "adalora_config.json").read_text())
    assert meta["steps_done"] == 2 and meta["stopped_early"] == {
        "steps_done": 2, "steps_planned": 20, "reason": "the gradient norm became nan at step 4"}
    assert f"the last good state (after step 2) is in {out}" in str(err)


# -- Hugging Face Trainer -------------------------------------------------------------------------


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def tokenized(rows):
    tok = minilm_tokenizer()
    label2id = {"negative": 0, "positive": 1}
    return [{**tok(text), "labels": label2id[label]} for text, label in rows], tok


def trainer_args(tmp_path, **overrides):
    from transformers import TrainingArguments

    kwargs = dict(
        output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=4, learning_rate=1e-2, use_cpu=True,
        report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0,
        dataloader_num_workers=0,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def tiny_adalora(path, **cfg) -> AdaLoraModel:
    cfg = {"init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 1, "delta_t": 1, **cfg}
    return prepare_model(str(path), AdaLoraConfig(**cfg), num_labels=2, id2label=ID2LABEL,
                         label2id={v: k for k, v in ID2LABEL.items()})


def test_trainer_allocates_once_per_optimizer_step_with_accumulation(tmp_path, nodrop_bert_dir):
    from transformers import DataCollatorWithPadding

    rows, tok = tokenized(separable_rows(48))
    model = tiny_adalora(nodrop_bert_dir)
    steps, accumulation = 5, 3
    allocator = RankAllocator(model, model.config, steps)
    calls, forwards = [], []
    original = allocator.update_and_allocate

    def recording(step):  # records, then runs the real allocator
        calls.append((step, [m.lam.grad.clone() for m in model.adapters.values()]))
        return original(step)

    allocator.update_and_allocate = recording
    model.model.register_forward_hook(lambda *_: forwards.append(1))
    args = trainer_args(tmp_path, gradient_accumulation_steps=accumulation, max_steps=steps,
                        logging_strategy="steps", logging_steps=1)
    trainer = AdaLoraTrainer(model, args, allocator=allocator, train_dataset=ListDataset(rows),
                             data_collator=DataCollatorWithPadding(tok))
    trainer.train()
    assert len(forwards) == steps * accumulation  # 15 micro-batches ...
    assert [step for step, _ in calls] == list(range(1, steps + 1))  # ... but 5 allocations, steps 1..5
    assert all(any(g.abs().sum() > 0 for g in grads) for _, grads in calls)  # before zero_grad
    assert sum(model.ranks().values()) == allocator.bT
    logged = [(h["step"], h["budget"]) for h in trainer.state.log_history if "loss" in h]
    assert logged == [(step, allocator.budget(step)) for step in range(1, steps + 1)]


def summed_ce(outputs, labels, num_items_in_batch=None):
    """A user loss as Trainer expects one under accumulation: summed, divided by the step's items."""
    return torch.nn.functional.cross_entropy(outputs.logits, labels, reduction="sum") / num_items_in_batch


@pytest.mark.parametrize("loss_func", [None, summed_ce], ids=["model-loss", "compute_loss_func"])
def test_trainer_gradient_is_task_loss_plus_penalty(tmp_path, nodrop_bert_dir, loss_func):
    """The gradients of one optimizer step over 2 accumulated micro-batches equal those of
    mean cross-entropy over all 8 examples + gamma * orth_penalty, computed by hand, whether
    the model computes the loss (Trainer divides it by the accumulation steps) or a
    compute_loss_func does (Trainer leaves it as it is)."""
    from transformers import DataCollatorWithPadding

    rows, tok = tokenized(separable_rows(8))
    model = tiny_adalora(nodrop_bert_dir, orth_reg=0.3)
    torch.manual_seed(1)
    with torch.no_grad():
        for m in model.adapters.values():
            m.lam.normal_(0.0, 1.0)  # lam = 0 would leave dL/dP = dL/dQ = 0 from the task loss
    reference = copy.deepcopy(model)

    batch = DataCollatorWithPadding(tok)(rows)
    loss = reference(**batch).loss + 0.3 * reference.orth_penalty()
    loss.backward()
    expected = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}

    captured = {}
    allocator = RankAllocator(model, model.config, 3)
    original = allocator.update_and_allocate

    def capture(step):
        captured.update({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        return original(step)

    allocator.update_and_allocate = capture
    args = trainer_args(tmp_path, gradient_accumulation_steps=2, max_steps=1, max_grad_norm=0.0)
    AdaLoraTrainer(model, args, allocator=allocator, train_dataset=ListDataset(rows), compute_loss_func=loss_func,
                   data_collator=DataCollatorWithPadding(tok)).train()
    assert captured.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(captured[name], grad, atol=1e-6, rtol=1e-4, msg=name)
