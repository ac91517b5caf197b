"""`export --quantize int8`: ONNX Runtime's dynamic int8 quantization of the fused graph, judged by
task accuracy.

The fused fp32 graph (validated against PyTorch first) goes through onnxruntime.quantization's
`quantize_dynamic`: weights int8, symmetric, per output channel; activations uint8, quantized at run
time per tensor. Fused Attention becomes QAttention, MatMul + bias becomes DynamicQuantizeMatMul when
ONNX Runtime loads it, EmbedLayerNormalization keeps its tables in uint8 (QEmbedLayerNormalization).
Logits can no longer match PyTorch to 1e-4, so the int8 graph is judged on labelled data instead:
fp32 and int8 accuracy and the rate at which their predictions agree, with a limit on the drop.
The format and the figures are described in docs/quantization.md.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from adalora_deploy.data import BUILTIN_SETS, TextDataset, heldout_split, load_dataset

from .errors import ExportError
from .graph import EXTERNAL_DATA_BYTES, LABEL_PREFIX
from .options import ExportConfig
from .specs import INT8_FUSIONS, FusionSpec

DEFAULT_MAX_ACCURACY_DROP = ExportConfig.max_accuracy_drop  # accuracy points (percent)
EVAL_BATCH = 32


@dataclass(frozen=True)
class QuantizeSpec:
    """One `--quantize` scheme.

    Attributes:
        name: the flag value.
        op_types: the ops ONNX Runtime's dynamic quantizer rewrites (its IntegerOps registry):
            MatMul -> MatMulInteger (DynamicQuantizeMatMul once loaded), Attention -> QAttention,
            EmbedLayerNormalization -> QEmbedLayerNormalization, Gather of an embedding table
            (unfused graphs) -> uint8 table. Without the embedding tables the file would stay at ~0.65x
            fp32 for MiniLM, whose word embeddings are half of its weights.
        per_channel: one weight scale per output channel (ORT supports it for MatMul and QAttention).
        branches_default: quantize the factored graph's low-rank branch MatMuls too, unless asked
            otherwise (--quantize-branches); chosen by measurement (docs/quantization.md).
        fusions: the transformer fusions applied before quantizing (specs.INT8_FUSIONS: no BiasGelu).
    """

    name: str
    op_types: tuple[str, ...]
    per_channel: bool
    branches_default: bool
    fusions: FusionSpec


QUANTIZATIONS = {
    "int8": QuantizeSpec(
        "int8", ("MatMul", "Attention", "EmbedLayerNormalization", "Gather"), per_channel=True,
        branches_default=True, fusions=INT8_FUSIONS,
    ),
}


def quantize_spec(name: str) -> QuantizeSpec:
    if name not in QUANTIZATIONS:
        raise ExportError(f"unknown quantization {name!r}: choose one of {', '.join(QUANTIZATIONS)} (--quantize)")
    return QUANTIZATIONS[name]


@contextlib.contextmanager
def _quiet_quantizer():
    # quantize_dynamic logs a pre-processing advice on the root logger for every call; the graph is
    # already fused and shape-annotated by ONNX Runtime's transformer optimizer.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def branch_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the low-rank branch MatMuls (down and up) of a labelled factored graph."""
    return [n.name for n in model.graph.node if n.name.startswith(LABEL_PREFIX) and n.op_type == "MatMul"]


def quantize_graph(fp32_path: Path, out_path: Path, spec: QuantizeSpec, exclude: list[str]) -> onnx.ModelProto:
    """Dynamic int8 quantization of `fp32_path` into `out_path` with ONNX Runtime's quantizer.

    Args:
        fp32_path: the fused fp32 model.onnx.
        out_path: where to write the quantized graph.
        spec: the scheme (op types, per-channel).
        exclude: node names to leave in fp32 (e.g. the low-rank branches).

    Returns:
        The quantized graph as loaded from `out_path`.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet_quantizer():
        quantize_dynamic(
            str(fp32_path), str(out_path), op_types_to_quantize=list(spec.op_types), per_channel=spec.per_channel,
            weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
            use_external_data_format=fp32_path.stat().st_size > EXTERNAL_DATA_BYTES,
            # shape inference stops at ORT's contrib ops (Attention, ...); their outputs are float
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    return onnx.load(str(out_path))


def quantization_record(
    spec: QuantizeSpec, branches: str | None, kept: list[str], fp32_path: Path, int8_path: Path, evaluation: dict,
) -> dict:
    """The manifest's "quantization" section (docs/quantization.md), before the int8 file replaces fp32."""
    sizes = {"fp32_bytes": fp32_path.stat().st_size, "int8_bytes": int8_path.stat().st_size}
    return {
        "scheme": spec.name,
        "tool": "onnxruntime.quantization.quantize_dynamic",
        "weights": "int8, symmetric, " + ("per output channel" if spec.per_channel else "per tensor"),
        "activations": "uint8, dynamic (scale and zero point computed per tensor at run time)",
        "op_types": list(spec.op_types),
        "branches": branches,
        "fp32_nodes_kept": kept,
        **sizes, "size_ratio": round(sizes["int8_bytes"] / sizes["fp32_bytes"], 4),
        "evaluation": evaluation,
    }


# -- evaluation data --------------------------------------------------------------------------------


@dataclass
class EvalSet:
    """Labelled rows the int8 graph is judged on, and how to tokenise them."""

    dataset: TextDataset
    max_length: int
    origin: str  # "--eval-data" or "checkpoint held-out split"


def _checkpoint_heldout(train: dict, id2label: dict[int, str]) -> TextDataset | None:
    """The held-out rows `train` scored the checkpoint on, when its data can still be read."""
    data, eval_data = train.get("data"), train.get("eval_data")
    if eval_data and Path(eval_data).is_file():
        return load_dataset(eval_data, id2label)
    if eval_data is None and data in BUILTIN_SETS:
        return BUILTIN_SETS[data][1]()[1]
    if eval_data is None and data and Path(data).is_file():
        return heldout_split(load_dataset(data, id2label))[1]  # the same fixed seed as `train`
    return None


def eval_set(train: dict | None, eval_data: str | None, id2label: dict[int, str], max_length: int) -> EvalSet:
    """`--eval-data`, else the checkpoint's held-out split; refuses when neither is known.

    Args:
        train: the checkpoint config's "train" section (data, eval_data, max_length), or None.
        eval_data: the --eval-data value (a labelled CSV/JSONL file, or a `train --data` form).
        id2label: the model's labels; the eval rows' labels must be among them.
        max_length: truncation length when the checkpoint does not record its own.
    """
    train = train or {}
    max_length = int(train.get("max_length") or max_length)
    if eval_data is not None:
        return EvalSet(load_dataset(eval_data, id2label), max_length, "--eval-data")
    heldout = _checkpoint_heldout(train, id2label)
    if heldout is None:
        raise ExportError(
            "--quantize int8 is judged by accuracy on labelled data, and this checkpoint's held-out data is "
            "not known here: pass --eval-data FILE (CSV/JSONL with text and label columns)"
        )
    return EvalSet(heldout, max_length, "checkpoint held-out split")


# -- evaluation -------------------------------------------------------------------------------------


def predict(runner, tokenizer, evaluation: EvalSet, batch_size: int = EVAL_BATCH) -> np.ndarray:
    """Predicted class ids of `runner` (an OrtRunner) on every row, in row order, `batch_size` rows of
    similar length per call (int8's activation scales depend on what shares a call)."""
    data = evaluation.dataset
    pairs = data.text_pairs or [""] * len(data)
    order = np.argsort([len(t) + len(p) for t, p in zip(data.texts, pairs, strict=True)], kind="stable")
    preds = np.zeros(len(data), dtype=np.int64)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]  # similar lengths: little padding per batch
        batch = tokenizer(
            [data.texts[i] for i in rows], [data.text_pairs[i] for i in rows] if data.text_pairs else None,
            truncation=True, max_length=evaluation.max_length, padding=True, return_tensors="np",
        )
        feeds = {name: np.asarray(batch[name], dtype=np.int64) for name in runner.input_names}
        preds[rows] = runner.run(feeds)["logits"].argmax(axis=-1)
    return preds


def accuracy_figures(fp32: np.ndarray, int8: np.ndarray, labels: np.ndarray) -> dict:
    """fp32 and int8 accuracy, the drop in points and the agreement rate of the predictions."""
    acc32, acc8 = float(np.mean(fp32 == labels)), float(np.mean(int8 == labels))
    return {
        "examples": int(len(labels)),
        "fp32_accuracy": acc32,
        "int8_accuracy": acc8,
        "accuracy_drop_points": round(100.0 * (acc32 - acc8), 4),
        "agreement": float(np.mean(fp32 == int8)),
    }


def check_drop(mode: str, figures: dict, limit: float) -> None:
    """Refuse the export when int8 loses more than `limit` accuracy points against fp32."""
    if figures["accuracy_drop_points"] > limit:
        raise ExportError(
            f"{mode}: int8 accuracy {figures['int8_accuracy']:.4f} vs fp32 {figures['fp32_accuracy']:.4f} on "
            f"{figures['examples']} examples ({figures['data']}): drop {figures['accuracy_drop_points']:.2f} "
            f"points > --max-accuracy-drop {limit:g} (agreement {figures['agreement']:.4f}); nothing was "
            "written: export without --quantize, or allow a larger drop"
        )
