"""Typed, validated configuration for AdaLoRA training (the method: docs/method.md)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from .architectures import architecture
from .constants import (
    CAUSAL_LM,
    FEATURE_EXTRACTION,
    QUESTION_ANSWERING,
    SEQUENCE_CLASSIFICATION,
    TOKEN_CLASSIFICATION,
)
from .errors import ConfigError

IMPORTANCE_METRICS = ("sensitivity-uncertainty", "sensitivity", "magnitude")

# Trained in full beside the adapters, per task (the task head).
DEFAULT_MODULES_TO_SAVE: dict[str, list[str]] = {
    SEQUENCE_CLASSIFICATION: ["classifier", "score"],
    FEATURE_EXTRACTION: [],
    TOKEN_CLASSIFICATION: ["classifier", "score"],  # score: Llama-style heads
    QUESTION_ANSWERING: ["qa_outputs"],
    CAUSAL_LM: [],  # the LM head is part of the base weights (often tied to the embeddings)
}


@dataclass
class AdaLoraConfig:
    """Everything the adapter and the rank allocator need.

    Args:
        target_modules: module-path suffixes to adapt; None takes the architecture table's defaults
            (adalora_deploy.architectures).
        modules_to_save: module-path suffixes trained in full (the task head).
        init_r: initial rank of every adapted module.
        target_r: average final rank; the final budget is target_r * number of modules.
        alpha: scaling numerator; s = alpha / init_r, kept after pruning.
        dropout: dropout on the adapter branch input.
        tinit: warm-up steps at the full budget b0.
        tfinal: final steps with the mask fixed.
        delta_t: steps between two allocations in the budgeting phase.
        beta1: EMA coefficient of the sensitivity.
        beta2: EMA coefficient of the uncertainty.
        orth_reg: gamma, the weight of the orthogonality penalty.
        importance: "sensitivity-uncertainty" (the paper), "sensitivity" or "magnitude" (|lam|).
        total_step: T, the number of optimizer steps the schedule spans.
    """

    target_modules: list[str] | None = None
    modules_to_save: list[str] | None = None
    init_r: int = 12
    target_r: int = 4
    alpha: float = 32.0
    dropout: float = 0.0
    tinit: int = 0
    tfinal: int = 0
    delta_t: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg: float = 0.1
    importance: str = "sensitivity-uncertainty"
    total_step: int | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        self._check_types()
        if self.init_r < 1:
            raise ConfigError(f"init_r ({self.init_r}) must be >= 1")
        if not 0 <= self.target_r <= self.init_r:
            raise ConfigError(
                f"target_r ({self.target_r}) must be between 0 and init_r ({self.init_r}): "
                "lower target_r or raise init_r"
            )
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not 0.0 < value < 1.0:
                raise ConfigError(f"{name} ({value}) must be in the open interval (0, 1), e.g. 0.85")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout ({self.dropout}) must be in [0, 1)")
        if self.orth_reg < 0:
            raise ConfigError(f"orth_reg ({self.orth_reg}) must be >= 0 (0 turns the penalty off)")
        if self.importance not in IMPORTANCE_METRICS:
            raise ConfigError(f"importance ({self.importance!r}) must be one of {', '.join(IMPORTANCE_METRICS)}")
        if self.delta_t < 1:
            raise ConfigError(f"delta_t ({self.delta_t}) must be >= 1")
        if self.tinit < 0 or self.tfinal < 0:
            raise ConfigError(f"tinit ({self.tinit}) and tfinal ({self.tfinal}) must be >= 0")
        if self.total_step is not None:
            self.check_schedule(self.total_step)

    def _check_types(self) -> None:
        # A hand-edited checkpoint config must fail here in one line, not deep in torch.
        for name in ("init_r", "target_r", "tinit", "tfinal", "delta_t", "total_step"):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool)) and not (name == "total_step" and value is None):
                raise ConfigError(f"{name} ({value!r}) must be an integer")
        for name in ("alpha", "dropout", "beta1", "beta2", "orth_reg"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ConfigError(f"{name} ({value!r}) must be a finite number")
        for name in ("target_modules", "modules_to_save"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                raise ConfigError(f"{name} ({value!r}) must be a list of module-name strings")
        if not isinstance(self.importance, str) or not isinstance(self.extra, dict):
            raise ConfigError(f"importance ({self.importance!r}) must be a string and extra a JSON object")

    def check_schedule(self, total_step: int) -> None:
        """Raise ValueError unless the budgeting phase (tinit, T - tfinal] is non-empty."""
        if total_step < 1:
            raise ConfigError(f"total_step ({total_step}) must be >= 1")
        if self.tinit + self.tfinal >= total_step:
            raise ConfigError(
                f"tinit + tfinal ({self.tinit} + {self.tfinal} = {self.tinit + self.tfinal}) must be < "
                f"total_step ({total_step}): the budgeting phase would be empty; lower tinit/tfinal or "
                "train longer"
            )

    @property
    def scaling(self) -> float:
        """s = alpha / init_r (docs/method.md); unchanged by pruning."""
        return self.alpha / self.init_r

    def resolve_target_modules(self, model_type: str) -> list[str]:
        if self.target_modules:
            return list(self.target_modules)
        return list(architecture(model_type).target_modules)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> AdaLoraConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"the AdaLoRA config must be a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown AdaLoRA config keys: {', '.join(unknown)}")
        return cls(**data)


def max_positions(model_config: dict) -> int | None:
    """Most tokens a model takes, from its config.json: max_position_embeddings (less the padding
    offset of RoBERTa-style embeddings) or n_positions; None when the config does not bound it
    (relative positions, or no such field)."""
    if model_config.get("position_biased_input") is False:  # DeBERTa-v2: relative positions only
        return None
    n = model_config.get("max_position_embeddings") or model_config.get("n_positions")
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        return None
    return n - 2 if model_config.get("model_type") in ("roberta", "xlm-roberta", "camembert") else n


def check_token_lengths(lengths: dict[str, int], model_config: dict, model: str) -> None:
    """Refuse token lengths (flag name -> value) above what `model` can take, before any work."""
    limit = max_positions(model_config)
    for flag, value in lengths.items():
        if limit is not None and value > limit:
            raise ConfigError(f"{flag} {value} is above the {limit} positions of model {model}: use at most {limit}")
