"""ONNX Runtime, in one place: whether CUDA really starts, which providers a session gets, opening a
session, and the token inputs a graph is fed for validation, benchmarks and warm-up.

Torch-free (numpy and onnxruntime only), so that the serving path, the exporters and the benchmarks
all import it and get one answer (tests/test_layers.py keeps it so).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import numpy as np

from .constants import ADAPTER_INDEX_INPUT, PAST_PREFIX
from .errors import AdaLoraDeployError, CheckpointError

CUDA_EP = "CUDAExecutionProvider"
CPU_EP = "CPUExecutionProvider"
PROVIDERS = ("auto", "cuda", "cpu")

# ONNX Runtime graph optimisers that CPU-only sessions turn off. SkipLayerNormFusion folds the residual
# Add (+ bias Add) + LayerNormalization into SkipLayerNormalization, whose CPU kernel in onnxruntime
# 1.31 is slower than the ops it replaces: MiniLM's merged graph ran 1.08x (1 x 128) and 1.04x
# (32 x 128) Optimum's plain export with it, 0.98x and 0.97x without (benchmarks/latency_cpu_notes.md).
# On CUDA the fused kernel pays, so sessions that may run on CUDA keep it.
CPU_DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)

# A one-node ONNX model (y = Relu(x), x and y float [1], opset 13, IR version 8), serialized, to find
# out whether an execution provider really starts. Written out as bytes so that serving needs no `onnx`
# package; tests/test_layers.py checks it against onnx.helper's build of the same model.
PROBE_MODEL = (
    b'\x08\x08:7\n\x0c\n\x01x\x12\x01y"\x04Relu\x12\x05probeZ\x0f\n\x01x\x12\n\n\x08\x08\x01\x12\x04\n\x02\x08'
    b'\x01b\x0f\n\x01y\x12\n\n\x08\x08\x01\x12\x04\n\x02\x08\x01B\x04\n\x00\x10\r'
)


class ProviderUnavailableError(AdaLoraDeployError):
    """An execution provider was asked for explicitly but ONNX Runtime cannot start it here."""


class ExportDirError(CheckpointError):
    """An export directory is missing, incomplete or corrupt."""


@functools.lru_cache(maxsize=8)
def cuda_status(device_id: int = 0) -> tuple[bool, str]:
    """(usable, reason): whether ONNX Runtime can start its CUDA provider on `device_id`.

    onnxruntime-gpu lists CUDAExecutionProvider as available even where the CUDA libraries or the
    GPU are missing; it then falls back to CPU with a logged error. Only creating a session and
    reading back its providers tells the truth, so we do that once on a one-node model.
    """
    import onnxruntime as ort

    if CUDA_EP not in ort.get_available_providers():
        return False, "this onnxruntime build has no CUDA provider (install onnxruntime-gpu)"
    ort.set_default_logger_severity(4)  # the failed library load is expected here: keep it quiet
    try:
        probe = ort.InferenceSession(PROBE_MODEL, providers=[(CUDA_EP, {"device_id": device_id})])
        started = probe.get_providers()[0] == CUDA_EP
    except Exception as err:  # ORT raises its own Fail/RuntimeException types here
        return False, f"ONNX Runtime failed to start CUDA ({str(err).splitlines()[0]})"
    finally:
        ort.set_default_logger_severity(2)
    if not started:
        return False, "ONNX Runtime could not start CUDA (no GPU, or CUDA 13 / cuDNN 9 libraries missing)"
    return True, "ok"


def providers_for(provider: str, device_id: int = 0, cuda_options: dict | None = None) -> list:
    """The provider list for a session: "cpu" -> CPU; "auto" -> CUDA (then CPU) when `cuda_status` says
    it starts, else CPU; "cuda" -> CUDA, or ProviderUnavailableError with the reason.

    Args:
        provider: "auto", "cuda" or "cpu".
        device_id: the CUDA device.
        cuda_options: more CUDA provider options (e.g. the arena strategy).
    """
    if provider not in PROVIDERS:
        raise ValueError(f"provider {provider!r} is not one of {', '.join(PROVIDERS)}")
    if provider == "cpu":
        return [CPU_EP]
    usable, reason = cuda_status(device_id)
    if usable:
        return [(CUDA_EP, {"device_id": device_id, **(cuda_options or {})}), CPU_EP]
    if provider == "cuda":
        raise ProviderUnavailableError(f"--provider cuda: {reason}; use --provider auto or cpu")
    return [CPU_EP]


def disabled_optimizers(providers: list) -> list[str]:
    """Graph optimisers to turn off for a session on `providers`: CPU_DISABLED_OPTIMIZERS when only
    the CPU provider runs, none when CUDA may take the graph."""
    names = [p[0] if isinstance(p, tuple) else p for p in providers]
    return list(CPU_DISABLED_OPTIMIZERS) if names == [CPU_EP] else []


def inference_session(path: str | os.PathLike, providers: list, options=None,
                      disabled: Sequence[str] | None = None):
    """An onnxruntime.InferenceSession on a model file.

    Args:
        path: the .onnx file.
        providers: e.g. from `providers_for`.
        options: onnxruntime.SessionOptions; None: ONNX Runtime's defaults, warnings not logged.
        disabled: graph optimisers to turn off; None: `disabled_optimizers(providers)`.

    Returns:
        The session; `get_providers()[0]` is the provider that really runs (ORT may fall back).
        A file ONNX Runtime cannot load raises ExportDirError, naming it.
    """
    import onnxruntime as ort

    if options is None:
        options = ort.SessionOptions()
        options.log_severity_level = 3  # fused graphs' harmless "unused initializer" warnings
    disabled = disabled_optimizers(providers) if disabled is None else list(disabled)
    try:
        return ort.InferenceSession(str(path), options, providers=providers, disabled_optimizers=disabled)
    except Exception as err:  # InvalidProtobuf, Fail, ...: ORT's exception types are not public
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ExportDirError(f"{path} could not be loaded by ONNX Runtime ({first}): re-export it") from err


# -- inputs ---------------------------------------------------------------------------------------

PADDINGS = ("none", "right", "left")


def attention_mask(batch: int, seq: int, padding: str = "none") -> np.ndarray:
    """(batch, seq) int64 mask. With "right" or "left" padding, row i keeps seq - i * (seq // (batch + 1))
    tokens (at least 1) on that side, so the rows of a batch differ in length; "none" is all ones."""
    if padding not in PADDINGS:
        raise ValueError(f"padding {padding!r} is not one of {', '.join(PADDINGS)}")
    step = seq // (batch + 1) if padding != "none" else 0
    mask = np.zeros((batch, seq), dtype=np.int64)  # (B, T)
    for i in range(batch):
        n = max(1, seq - i * step)
        if padding == "left":
            mask[i, seq - n:] = 1
        else:
            mask[i, :n] = 1
    return mask


def position_ids(mask: np.ndarray) -> np.ndarray:
    """transformers' generate(): cumsum(mask) - 1, and 1 on padded positions."""
    positions = np.cumsum(mask, axis=-1) - 1  # (B, T)
    return np.where(mask == 0, 1, positions).astype(np.int64)


TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def token_inputs(batch: int, seq: int, token_ids: np.ndarray, *, seed: int = 0, padding: str = "none",
                 pad_id: int = 0, type_vocab_size: int = 1, names: Sequence[str] = TEXT_INPUTS
                 ) -> dict[str, np.ndarray]:
    """Random int64 inputs of shape (batch, seq), for the graph input `names`, in that order.

    input_ids are drawn uniformly from `token_ids` (seeded) and hold `pad_id` where the attention mask
    (see `attention_mask`) is 0; token_type_ids are uniform in [0, type_vocab_size) on real tokens and 0 on
    padding; position_ids follow the mask. With type_vocab_size 0 (the model has no segments) a graph
    input token_type_ids cannot be made. A name it cannot make raises ValueError listing them.
    """
    rng = np.random.default_rng(seed)
    shape = (batch, seq)
    mask = attention_mask(batch, seq, padding)
    ids = np.asarray(token_ids)[rng.integers(0, len(token_ids), shape)].astype(np.int64)  # (B, T)
    values = {"input_ids": np.where(mask == 1, ids, pad_id), "attention_mask": mask,
              "position_ids": position_ids(mask)}
    if type_vocab_size > 0:
        values["token_type_ids"] = rng.integers(0, type_vocab_size, shape, dtype=np.int64) * mask
    unknown = [name for name in names if name not in values]
    if unknown:
        raise ValueError(f"cannot generate inputs for graph inputs {unknown}")
    return {name: values[name] for name in names}


def dummy_inputs(graph_inputs: Sequence, batch: int, seq: int) -> dict[str, np.ndarray]:
    """Inputs for every input of a session (`session.get_inputs()`), for warm-up and smoke runs: token
    id 1 everywhere, full attention, segment 0, positions 0..seq-1; an empty past for a KV-cache graph;
    on a multi graph, adapter 0 for every row and one all-zero adapter (rank dimensions 1). Each input
    gets the graph's dtype (int64, other integers int32, else float32)."""
    inputs = list(graph_inputs)
    multi = any(node.name == ADAPTER_INDEX_INPUT for node in inputs)
    text = token_inputs(batch, seq, np.array([1]), type_vocab_size=1, names=("position_ids", *TEXT_INPUTS))
    past = empty_past(inputs, batch)
    feeds = {}
    for node in inputs:
        if node.name in past:
            feeds[node.name] = past[node.name]
        elif multi and node.name == ADAPTER_INDEX_INPUT:
            feeds[node.name] = np.zeros(batch, dtype=np.int64)
        elif multi and "int" not in node.type:  # a multi graph's stacked factors and heads
            feeds[node.name] = np.zeros([d if isinstance(d, int) else 1 for d in node.shape], np.float32)
        elif node.name in text:
            feeds[node.name] = text[node.name].astype(_dtype(node.type))
        else:  # an input of another tool's graph: ones if integer, else zeros
            feeds[node.name] = np.full((batch, seq), 1 if "int" in node.type else 0, _dtype(node.type))
    return feeds


def empty_past(graph_inputs: Sequence, batch: int) -> dict[str, np.ndarray]:
    """A KV-cache graph's past inputs (past_key_values.*, (batch, heads, past, head_dim)) at past length 0:
    the first step of generation. Float16 where the graph takes float16, else float32."""
    return {
        node.name: np.zeros((batch, node.shape[1], 0, node.shape[3]),
                            np.float16 if node.type == "tensor(float16)" else np.float32)
        for node in graph_inputs if node.name.startswith(PAST_PREFIX)
    }


def _dtype(onnx_type: str) -> type:
    if onnx_type == "tensor(int64)":
        return np.int64
    return np.int32 if "int" in onnx_type else np.float32
