"""Checks every export against PyTorch: output names, shapes and values, on generated
inputs of several batch sizes and sequence lengths, padded on either side. Every failure is collected;
`ValidationReport.raise_if_failed` then raises one ExportValidationError that lists them all.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from adalora_deploy.ort import inference_session, providers_for, token_inputs

from .errors import ExportValidationError


@dataclass(frozen=True)
class InputCase:
    """One generated batch: `padding` is "none", "right" (tokenizer default) or "left"."""

    batch: int
    seq: int
    padding: str

    def describe(self) -> str:
        return f"batch {self.batch} x seq {self.seq}, {self.padding} padding"


CASES = (InputCase(1, 8, "none"), InputCase(2, 17, "right"), InputCase(4, 33, "right"), InputCase(3, 12, "left"))


def make_inputs(case: InputCase, config, input_names: list[str], seed: int = 0) -> dict[str, np.ndarray]:
    """Random token ids with the case's padding, for the graph's input names, as the model expects them:
    padding with the config's pad id, segment ids only where the model has token types
    (type_vocab_size > 0; DeBERTaV3 has none) and position ids from the mask."""
    pad = getattr(config, "pad_token_id", None) or 0
    # Real tokens are never pad or EOS: decoder heads find a row's last token by looking for the pad id.
    allowed = np.setdiff1d(np.arange(config.vocab_size), [pad, getattr(config, "eos_token_id", None) or pad])
    try:
        return token_inputs(case.batch, case.seq, allowed, seed=seed, padding=case.padding, pad_id=pad,
                            type_vocab_size=getattr(config, "type_vocab_size", 0) or 0, names=input_names)
    except ValueError as err:
        raise ExportValidationError([f"validation: {err}"]) from err


@torch.no_grad()
def torch_output(module: torch.nn.Module, inputs: dict[str, np.ndarray], output: str) -> np.ndarray:
    """The named output of a transformers model, in fp32 numpy."""
    outputs = module(**{k: torch.from_numpy(v) for k, v in inputs.items()})
    return getattr(outputs, output).float().numpy()


@dataclass
class Probe:
    """One validation input: the graph's feeds, how PyTorch computes the reference outputs from a
    module, and which part of the outputs counts (e.g. only unpadded positions of a decoder).

    Attributes:
        case: what the input is, for reports.
        feeds: the ONNX graph's inputs.
        reference: module -> {output name: fp32 array}.
        keep: {output name: array} -> the same with ignored positions zeroed (identity by default).
    """

    case: InputCase
    feeds: dict[str, np.ndarray]
    reference: Callable[[torch.nn.Module], dict[str, np.ndarray]]
    keep: Callable[[dict], dict] = lambda outputs: outputs


def plain_probes(config, input_names: list[str], outputs: tuple[str, ...]) -> list[Probe]:
    """One probe per CASES entry: the module called on the feeds, as the graph is."""
    probes = []
    for i, case in enumerate(CASES):
        feeds = make_inputs(case, config, input_names, seed=i)
        probes.append(Probe(case, feeds, lambda m, x=feeds: {o: torch_output(m, x, o) for o in outputs}))
    return probes


class OrtRunner:
    """An ONNX Runtime session over one exported graph (CUDA for fp16 when a GPU exists, else CPU)."""

    def __init__(self, path: Path, prefer_cuda: bool = False):
        self.session = inference_session(path, providers_for("auto" if prefer_cuda else "cpu"))
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.provider = self.session.get_providers()[0]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self.session.run(None, inputs)
        return {name: np.asarray(v, dtype=np.float32) for name, v in zip(self.output_names, values, strict=True)}


def _finite(x: float) -> float | str:
    return float(x) if math.isfinite(x) else str(x)  # JSON has no NaN


@dataclass
class Check:
    """One comparison (e.g. "factored: ONNX Runtime vs PyTorch") over all input cases."""

    name: str
    atol: float
    cases: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def compare(self, case: InputCase, got: np.ndarray, want: np.ndarray, output: str | None = None) -> None:
        where = case.describe() + (f", {output}" if output else "")
        if got.shape != want.shape:
            self.problems.append(f"{self.name}: {where}: shape {got.shape} != expected {want.shape}")
            return
        diff = float(np.max(np.abs(got - want))) if got.size else 0.0
        record = {"batch": case.batch, "seq": case.seq, "padding": case.padding, "max_abs_diff": _finite(diff)}
        self.cases.append(record if output is None else {**record, "output": output})
        if not diff <= self.atol:  # also catches NaN
            self.problems.append(f"{self.name}: {where}: max abs diff {diff:.3g} > atol {self.atol:g}")

    def compare_all(self, case: InputCase, got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
        """compare() per output; the output name is recorded only when there are several."""
        for name, expected in want.items():
            self.compare(case, got[name], expected, name if len(want) > 1 else None)

    @property
    def max_abs_diff(self) -> float:
        diffs = [c["max_abs_diff"] for c in self.cases]
        return max((float(d) for d in diffs), default=0.0)

    def to_dict(self) -> dict:
        return {"atol": self.atol, "max_abs_diff": _finite(self.max_abs_diff), "passed": not self.problems,
                "cases": self.cases}


@dataclass
class ValidationReport:
    """All checks of one export; raises once, at the end, with every failure."""

    checks: dict[str, Check] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    inputs: int = 0  # validation input batches (a decoder has a prefill and a decode one per case)

    def check(self, key: str, name: str, atol: float) -> Check:
        self.checks[key] = Check(name, atol)
        return self.checks[key]

    def expect_outputs(self, mode: str, runner: OrtRunner, expected: str) -> None:
        if expected not in runner.output_names:
            self.problems.append(f"{mode}: graph outputs {runner.output_names} lack {expected!r}")

    def failures(self) -> list[str]:
        return self.problems + [p for c in self.checks.values() for p in c.problems]

    def raise_if_failed(self) -> None:
        if self.failures():
            raise ExportValidationError(self.failures())

    def figures(self, keys: list[str]) -> dict:
        return {k: self.checks[k].to_dict() for k in keys if k in self.checks}
