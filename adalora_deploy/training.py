"""Training with AdaLoRA: a plain loop behind `train()` (what `adalora-deploy train` calls, DDP-aware
under torchrun), and a Hugging Face `Trainer` integration (`AdaLoraTrainer`, `AdaLoraCallback`).

Both add gamma * orth_penalty to the task loss and run the rank allocator once per optimizer step,
after optimizer.step() and before zero_grad(), on the gradients that step used (docs/method.md).
"""

from __future__ import annotations

import inspect
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback

from .allocator import RankAllocator
from .config import check_token_lengths
from .constants import LABELLED_TASKS, MODEL_CONFIG_FILE, SEQUENCE_CLASSIFICATION, TOKEN_CLASSIFICATION
from .data import Encoded, batches, collate, encode, load_splits
from .errors import CheckpointError, DivergedError
from .io import check_output_dir, check_tokenizer_files, read_json
from .model import AdaLoraModel, prepare_model, resolve_model_path
from .task_data import READERS, correct_and_total, load_task_splits
from .threads import usable_cores
from .train_config import TrainConfig

MAX_GRAD_NORM = 1.0
WARMUP_FRACTION = 0.06  # linear learning-rate warm-up, then linear decay to 0
EVAL_BATCH_SIZE = 128


@dataclass
class TrainResult:
    """What `train` returns: the trained model and allocator, per-step losses and the eval score."""

    model: AdaLoraModel
    allocator: RankAllocator
    losses: list[float]
    eval_accuracy: float
    eval_examples: int
    eval_source: str
    train_seconds: float
    checkpoint: Path | None = None
    budgets: list[int] = field(default_factory=list)
    rank: int = 0
    world_size: int = 1


# -- the plain loop -----------------------------------------------------------------------------


def train(progress: bool = True, save_stopped: bool = True, **kwargs) -> TrainResult:
    """Train a sequence classifier with AdaLoRA and write a checkpoint.

    A loss or gradient norm that turns non-finite stops training before that step is applied and
    raises DivergedError; its `model` is the last good state, which is also written to `out` (when
    given, `save_stopped` is true and at least one step completed) as a checkpoint whose config
    records `stopped_early`.

    Args:
        progress: show a tqdm bar with the loss and the current budget (rank 0 only).
        save_stopped: write the last good state to `out` when training diverges (the demo does not:
            its output directory is removed on any error).
        kwargs: the fields of TrainConfig (adalora_deploy/train_config.py), i.e. the flags of
            `adalora-deploy train` one to one.
    Returns:
        A TrainResult. Under torchrun every process returns one; only rank 0 writes `out`.
    """
    cfg = TrainConfig(**kwargs)
    if cfg.out is not None:
        check_output_dir(cfg.out, cfg.overwrite, (cfg.model, cfg.data, cfg.eval_data))  # before any work, not after
    check_base_lengths(cfg.model, {"--max-length": cfg.max_length})
    train_set, eval_set = _load_data(cfg)
    torch.set_num_threads(training_threads(cfg.threads))
    rank, world, owns_group = _init_distributed()
    try:
        model, tokenizer = _prepare(cfg, train_set)
        train_enc, eval_enc = (_encode(d, tokenizer, cfg.max_length) for d in (train_set, eval_set))
        allocator = RankAllocator(model, model.config, cfg.steps)
        start = time.perf_counter()
        stopped = None
        try:
            losses, budgets = fit(model, allocator, train_enc, cfg, (rank, world), progress and rank == 0)
        except DivergedError as err:
            stopped, losses, budgets = err, err.losses, err.budgets
            err.model = model
        seconds = time.perf_counter() - start
        if stopped is not None and not (save_stopped and cfg.out is not None and stopped.steps_done > 0):
            stopped.unsaved = " (no good step to keep)" if stopped.steps_done == 0 else " (no --out)" if cfg.out is None else ""
            raise stopped
        accuracy = evaluate(model, eval_enc)
        result = TrainResult(
            model, allocator, losses, accuracy, len(eval_set), eval_set.source, seconds, None, budgets, rank, world,
        )
        if cfg.out is not None:
            result.checkpoint = _save(result, cfg, tokenizer, train_set.source, rank, world, stopped)
        if stopped is not None:
            stopped.checkpoint = result.checkpoint
            raise stopped
        return result
    finally:
        if owns_group:
            torch.distributed.destroy_process_group()


def training_threads(requested: int | None) -> int:
    """`requested`, else torch's current count (OMP_NUM_THREADS or a caller's set_num_threads decide
    it) capped at the cores this process may use: torch counts every CPU of the machine, even those a
    cgroup quota or an affinity mask keeps from it."""
    return requested or min(torch.get_num_threads(), usable_cores())


def _load_data(cfg: TrainConfig):
    if cfg.task in READERS:
        return load_task_splits(cfg.task, cfg.data, cfg.eval_data)
    return load_splits(cfg.data, cfg.eval_data)


def _encode(dataset, tokenizer, max_length: int):
    return dataset.encode(tokenizer, max_length) if hasattr(dataset, "encode") else encode(dataset, tokenizer, max_length)


def _collate(encoded, rows: list[int]) -> dict:
    return encoded.collate(rows) if hasattr(encoded, "collate") else collate(encoded, rows)


def _prepare(cfg: TrainConfig, train_set) -> tuple[AdaLoraModel, object]:
    torch.manual_seed(cfg.seed)  # the task head and P, Q are drawn here
    labels = {}
    if cfg.task in LABELLED_TASKS:
        labels = {"num_labels": train_set.num_labels, "id2label": train_set.id2label, "label2id": train_set.label2id}
    model = prepare_model(cfg.model, cfg.adalora_config(), cfg.task, **labels)
    if model.modules_to_save:
        print(f"note: trained in full beside the adapter: {', '.join(model.modules_to_save)}")
    tokenizer = load_base_tokenizer(cfg.model)
    use_eos_as_pad(tokenizer, model.model.config)
    fit_tokenizer_inputs(tokenizer, model.model)
    if cfg.task == TOKEN_CLASSIFICATION and not _takes_words(tokenizer):
        # Byte-level BPE (GPT-2, RoBERTa) marks word starts with a space: words need add_prefix_space.
        tokenizer = load_base_tokenizer(cfg.model, add_prefix_space=True)
    return model, tokenizer


def _takes_words(tokenizer) -> bool:
    try:
        tokenizer([["a", "b"]], is_split_into_words=True)
    except (AssertionError, ValueError):  # GPT-2/RoBERTa tokenizers assert add_prefix_space
        return False
    return True


def use_eos_as_pad(tokenizer, config) -> None:
    """Decoders often ship without a pad token: pad with EOS (padding is masked out anyway), in the
    tokenizer and in the model config (saved as the checkpoint's pad_token_id and in every exported
    config.json), so that batches, sequence-classification heads and exports agree."""
    config_pad = getattr(config, "pad_token_id", None)
    if tokenizer.pad_token is None and config_pad is not None and 0 <= config_pad < len(tokenizer):
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(config_pad)  # the id the model was built with
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        print(f"note: the tokenizer has no pad token; using EOS {tokenizer.eos_token!r} as the pad token")
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        config.pad_token_id = tokenizer.pad_token_id


def fit_tokenizer_inputs(tokenizer, model: torch.nn.Module) -> None:
    """Make the tokenizer produce only what the model reads: no token_type_ids for a model without
    token types (DistilBERT, decoders, DeBERTaV3's type_vocab_size 0). Saved with the tokenizer, so the
    export, the Predictor and pipelines feed the same inputs."""
    takes_types = "token_type_ids" in inspect.signature(model.forward).parameters
    if not takes_types or not getattr(model.config, "type_vocab_size", 0):
        tokenizer.model_input_names = [n for n in tokenizer.model_input_names if n != "token_type_ids"]
        tokenizer.init_kwargs["model_input_names"] = tokenizer.model_input_names  # written to tokenizer_config.json


def load_base_tokenizer(name_or_path: str | None, **kwargs):
    """The base model's tokenizer (the packaged MiniLM's for None); kwargs go to from_pretrained."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    check_tokenizer_files(path, "copy the base model's tokenizer files into it")
    try:
        return AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError, TypeError) as err:
        raise CheckpointError(
            f"no usable tokenizer for model {name_or_path!r} ({str(err).splitlines()[0][:160]}): pass a model "
            "directory with tokenizer files") from None


load_tokenizer = load_base_tokenizer  # the name earlier releases documented; kept for their users


def _init_distributed() -> tuple[int, int, bool]:
    """(rank, world_size, whether we created the process group); gloo under torchrun."""
    import torch.distributed as dist

    owns = False
    if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
        owns = True
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), owns
    return 0, 1, owns


def _wrap(model: AdaLoraModel, world: int) -> torch.nn.Module:
    if world == 1:
        return model
    # broadcast_buffers=False: the masks are buffers, and every rank must reach the same masks from
    # the same all-reduced gradients, not by copying rank 0's.
    return torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)


def fit(
    model: AdaLoraModel, allocator: RankAllocator, encoded: Encoded, cfg: TrainConfig,
    shard: tuple[int, int] = (0, 1), progress: bool = True,
) -> tuple[list[float], list[int]]:
    """The training loop: forward, loss + gamma * penalty, backward, clip, step, allocate, zero_grad.

    Args:
        model: the adapted model (trained in place).
        allocator: its rank allocator, called once per optimizer step with the 1-based step.
        encoded: tokenised training rows.
        cfg: steps, batch_size, lr, seed, orth_reg.
        shard: (rank, world_size) under torchrun: each rank draws its batches from its own rows.
        progress: show the tqdm bar.
    Returns:
        (task loss per step on this rank's batch, budget after each step).
    """
    from transformers import get_linear_schedule_with_warmup

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    scheduler = get_linear_schedule_with_warmup(optimizer, round(WARMUP_FRACTION * cfg.steps), cfg.steps)
    net = _wrap(model, shard[1])
    gamma = model.config.orth_reg
    model.train()
    losses, budgets = [], []
    good = None  # a copy of the last weights whose loss and gradients were finite
    bar = tqdm(total=cfg.steps, desc="train", disable=not progress, dynamic_ncols=True)
    try:
        for step, rows in enumerate(batches(len(encoded), cfg.batch_size, cfg.seed, shard, encoded.lengths), start=1):
            loss = net(**_collate(encoded, rows)).loss
            total = loss + gamma * model.orth_penalty() if gamma > 0 else loss
            _stop_unless_finite(total, "loss", step, cfg, model, good, losses, budgets)
            total.backward()  # under DDP the gradients are all-reduced when this returns
            grad_norm = torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            _stop_unless_finite(grad_norm, "gradient norm", step, cfg, model, good, losses, budgets)
            good = _keep_copy(model, good)  # the weights after step - 1, checked on this step's batch
            optimizer.step()
            scheduler.step()
            budget = allocator.update_and_allocate(step)
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            budgets.append(budget)
            bar.update()
            bar.set_postfix(loss=f"{_smoothed(losses):.4f}", budget=budgets[-1])
            if step == cfg.steps:
                break
    finally:
        bar.close()  # before any error line, so that it stands on its own line
    return losses, budgets


def _keep_copy(model: AdaLoraModel, copy: dict | None) -> dict:
    live = model.adapter_tensors()
    if copy is None:
        return {k: v.clone() for k, v in live.items()}
    for k, v in live.items():
        copy[k].copy_(v)
    return copy


def _stop_unless_finite(
    value: torch.Tensor, what: str, step: int, cfg: TrainConfig, model: AdaLoraModel, good: dict | None,
    losses: list, budgets: list,
) -> None:
    # The weights after step - 1 gave this non-finite value, so they are not good either: the model goes
    # back to the copy taken before that step was applied (after step - 2, whose loss and gradients were
    # checked finite at step - 1). No checkpoint of NaNs or of overflowing weights is written.
    if torch.isfinite(value):
        return
    err = DivergedError(what, value.item(), step, cfg.steps, cfg.lr)
    err.steps_done = max(step - 2, 0)
    if good is not None:
        model.load_adapter_state(good)
    err.losses, err.budgets = losses[:err.steps_done], budgets[:err.steps_done]
    raise err


def check_base_lengths(model: str | None, lengths: dict[str, int]) -> None:
    """Refuse token lengths above the base model's positions (read from its config.json, without
    loading weights); hub ids are checked when the model loads."""
    config_file = Path(resolve_model_path(model)) / MODEL_CONFIG_FILE
    if config_file.is_file():
        check_token_lengths(lengths, read_json(config_file, "model config"), model or "MiniLM")


def _smoothed(losses: list[float], window: int = 20) -> float:
    tail = losses[-window:]
    return sum(tail) / len(tail)


@torch.no_grad()
def evaluate(model: torch.nn.Module, encoded: Encoded, batch_size: int = EVAL_BATCH_SIZE) -> float:
    """Accuracy of `model` on tokenised rows (batched by length, so little padding): of the class
    (sequence classification), of the labelled tokens (token classification), of the next token on
    the loss positions (causal LM), or of the exact answer span (question answering)."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(encoded)), key=lambda i: len(encoded.input_ids[i]))
    correct = counted = 0
    task = getattr(model, "task", SEQUENCE_CLASSIFICATION)
    for start in range(0, len(order), batch_size):
        batch = _collate(encoded, order[start:start + batch_size])
        if task in READERS:
            hits, n = correct_and_total(task, model(**batch), batch)
        else:
            labels = batch.pop("labels")  # (B,)
            hits, n = (model(**batch).logits.argmax(dim=-1) == labels).sum().item(), len(labels)
        correct, counted = correct + hits, counted + n
    model.train(was_training)
    return correct / max(counted, 1)


def _save(result: TrainResult, cfg: TrainConfig, tokenizer, source: str, rank: int, world: int,
          stopped: DivergedError | None = None) -> Path:
    out = Path(cfg.out)
    steps_done = cfg.steps if stopped is None else stopped.steps_done
    if rank == 0:
        extra = {
            "eval_accuracy": result.eval_accuracy, "eval_examples": result.eval_examples,
            "eval_source": result.eval_source, "train_source": source, "world_size": world,
            "train_seconds": round(result.train_seconds, 3), "train": cfg.run_summary(),
            "pad_token": {"token": tokenizer.pad_token, "id": tokenizer.pad_token_id,
                          "is_eos": tokenizer.pad_token is not None and tokenizer.pad_token == tokenizer.eos_token},
        }
        if stopped is not None:
            extra["stopped_early"] = {"steps_done": steps_done, "steps_planned": cfg.steps,
                                      "reason": f"the {stopped.what} became {stopped.value} at step {stopped.step}"}
        result.model.save_pretrained(out, tokenizer, steps_done=steps_done, extra=extra, overwrite=cfg.overwrite)
    if world > 1:
        torch.distributed.barrier()
    return out


# -- Hugging Face Trainer integration ------------------------------------------------------------


class AdaLoraCallback(TrainerCallback):
    """Runs the rank allocator once per optimizer step inside a `transformers.Trainer`.

    `on_optimizer_step` is the hook that sees the step's gradients: in transformers 4.57 the
    Trainer calls it after clipping and optimizer.step() and before model.zero_grad(), once per
    optimizer step whatever the gradient accumulation. `state.global_step` is incremented just
    after it, so the 1-based step it completes is global_step + 1.

    Args:
        model: the AdaLoraModel being trained.
        allocator: a ready allocator, or None to build one over `state.max_steps` at train begin.
    """

    def __init__(self, model: AdaLoraModel, allocator: RankAllocator | None = None):
        self.adalora = model
        self.allocator = allocator
        self.budget: int | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if self.allocator is None:
            self.allocator = RankAllocator(self.adalora, self.adalora.config, state.max_steps)

    def on_optimizer_step(self, args, state, control, **kwargs):
        step = state.global_step + 1
        self.budget = self.allocator.update_and_allocate(step)


def _accepts_loss_kwargs(model: torch.nn.Module) -> bool:
    # The same test Trainer.__init__ applies to the model it is given.
    if hasattr(model, "accepts_loss_kwargs"):
        return bool(model.accepts_loss_kwargs)
    params = inspect.signature(model.forward).parameters.values()
    return any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params)


class AdaLoraTrainer(Trainer):
    """A `transformers.Trainer` that trains an AdaLoraModel: it adds gamma * orth_penalty to
    whatever loss `compute_loss` produces and runs the allocator through an AdaLoraCallback.

    Args:
        model: the AdaLoraModel; the Trainer itself drives the wrapped transformers model, so
            its forward signature, label names and saving work as usual.
        allocator: optional ready RankAllocator (else built at train begin over max_steps).
        args, kwargs: as for `transformers.Trainer`.
    """

    def __init__(self, model: AdaLoraModel, *args, allocator: RankAllocator | None = None, **kwargs):
        super().__init__(model.model, *args, **kwargs)
        self.adalora = model
        self.adalora_callback = AdaLoraCallback(model, allocator)
        self.add_callback(self.adalora_callback)
        self.model_accepts_loss_kwargs = _accepts_loss_kwargs(model.model)

    @property
    def allocator(self) -> RankAllocator | None:
        return self.adalora_callback.allocator

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Trainer's logging, with the current budget beside the loss."""
        if self.adalora_callback.budget is not None:
            logs["budget"] = self.adalora_callback.budget
        super().log(logs, start_time)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        gamma = self.adalora.config.orth_reg
        if model.training and gamma > 0:
            loss = loss + self._penalty_weight(num_items_in_batch) * gamma * self.adalora.orth_penalty()
        return (loss, outputs) if return_outputs else loss

    def _penalty_weight(self, num_items_in_batch) -> float:
        # Trainer.training_step (4.57) divides the loss by the accumulation steps unless the model
        # normalises by num_items_in_batch itself; either way the penalty must count once per step.
        divided = (not self.model_accepts_loss_kwargs or num_items_in_batch is None) and self.compute_loss_func is None
        accumulation = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        return 1.0 if divided else 1.0 / accumulation

