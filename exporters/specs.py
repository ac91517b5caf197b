"""Declarations of what an export can be: tasks, dtypes and modes; the model families
are declared in adalora_deploy.architectures.

Adding a task or a mode means adding one entry here; the export code reads these
tables and holds no per-mode or per-task branches of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from adalora_deploy.architectures import ARCHITECTURES, Fusion
from adalora_deploy.constants import (
    CAUSAL_LM,
    FEATURE_EXTRACTION,
    QUESTION_ANSWERING,
    SEQUENCE_CLASSIFICATION,
    TOKEN_CLASSIFICATION,
)

from .errors import ExportError
from .factored import factored_model, merged_model

# Optimum recommends opset 18 for BERT; below 17 there is no LayerNormalization op, which ONNX
# Runtime's fusions and kernels expect.
MIN_OPSET = 17
PRUNE_ATOL = 1e-5  # pruned vs unpruned masked model, both in PyTorch fp32
CROSS_MODE_ATOL = 1e-4  # merged vs factored, both in ONNX Runtime


@dataclass(frozen=True)
class TaskSpec:
    """A task the export supports.

    Attributes:
        name: our task name (as in the checkpoint config).
        optimum_task: Optimum's task name, which picks the OnnxConfig (inputs, outputs, dynamic axes).
        ort_model_class: the optimum.onnxruntime class that loads the exported directory.
        pipeline_task: the transformers pipeline task that runs it.
        outputs: the ONNX outputs checked against PyTorch.
        needs_head: whether the checkpoint must have been trained with a task head.
        with_past: the graph takes and returns past key values (a decoder for generation); it is
            validated on a prefill and a decode step (exporters/decoder.py).
    """

    name: str
    optimum_task: str
    ort_model_class: str
    pipeline_task: str
    outputs: tuple[str, ...]
    needs_head: bool
    with_past: bool = False

    def module(self, model):
        """The part of a (possibly headed) transformers model this task exports."""
        return model if self.needs_head else model.base_model


TASKS = {
    SEQUENCE_CLASSIFICATION: TaskSpec(
        SEQUENCE_CLASSIFICATION, optimum_task="text-classification",
        ort_model_class="ORTModelForSequenceClassification", pipeline_task="text-classification",
        outputs=("logits",), needs_head=True,
    ),
    FEATURE_EXTRACTION: TaskSpec(
        FEATURE_EXTRACTION, optimum_task="feature-extraction", ort_model_class="ORTModelForFeatureExtraction",
        pipeline_task="feature-extraction", outputs=("last_hidden_state",), needs_head=False,
    ),
    TOKEN_CLASSIFICATION: TaskSpec(
        TOKEN_CLASSIFICATION, optimum_task="token-classification", ort_model_class="ORTModelForTokenClassification",
        pipeline_task="token-classification", outputs=("logits",), needs_head=True,
    ),
    QUESTION_ANSWERING: TaskSpec(
        QUESTION_ANSWERING, optimum_task="question-answering", ort_model_class="ORTModelForQuestionAnswering",
        pipeline_task="question-answering", outputs=("start_logits", "end_logits"), needs_head=True,
    ),
    CAUSAL_LM: TaskSpec(
        CAUSAL_LM, optimum_task="text-generation-with-past", ort_model_class="ORTModelForCausalLM",
        pipeline_task="text-generation", outputs=("logits",), needs_head=True, with_past=True,
    ),
}


@dataclass(frozen=True)
class FusionSpec:
    """Which of ONNX Runtime's transformer fusions the export applies offline.

    Attributes:
        raw_attention_mask: fused attention reads the 2-D attention mask as is. BERT's default (a 1-D
            mask index) assumes right padding; the raw mask is correct for any padding side.
        skip_layer_norm: fuse (bias) Add + residual Add + LayerNormalization into SkipLayerNormalization.
            Off: with onnxruntime 1.31 the CPU SkipLayerNormalization kernel is ~3.5x slower than
            Add + LayerNormalization (4096 x 384 rows: 9.7 ms vs 2.8 ms, one thread), which made the
            fully fused MiniLM 4-10% slower than the unfused graph on CPU. ONNX Runtime's session-time
            SkipLayerNormFusion still fuses it wherever the session allows (on GPU, where it pays);
            adalora_deploy.runtime's CPU-only sessions turn it off (session.CPU_DISABLED_OPTIMIZERS).
            The attention fusion stays on for every provider: with SkipLayerNormalization out of the CPU
            session, fused Attention is 2-7% faster than the unfused graph (benchmarks/fusion_variants_cpu*.md).
        bias_gelu: fuse the intermediate bias Add into the GELU (BiasGelu). Off for int8 graphs: there
            the bias Add stays after the MatMul, ONNX Runtime folds it into DynamicQuantizeMatMul when it
            loads the graph, and its Gelu kernel is faster than BiasGelu (MiniLM int8, 1 thread: 6% faster
            overall; benchmarks/int8_cpu_notes.md). fp32 sessions would re-fuse BiasGelu at load anyway.
    """

    raw_attention_mask: bool
    skip_layer_norm: bool
    bias_gelu: bool = True


FUSIONS = FusionSpec(raw_attention_mask=True, skip_layer_norm=False)
INT8_FUSIONS = FusionSpec(raw_attention_mask=True, skip_layer_norm=False, bias_gelu=False)


@dataclass(frozen=True)
class DtypeSpec:
    """A weight dtype of the exported graph.

    Attributes:
        name: the --dtype value.
        atol: max abs difference allowed between ONNX Runtime and the fp32 PyTorch model.
        float16: convert the fp32 graph to fp16 after fusion (ONNX Runtime's recommended path).
        residual_sum: write residual Adds before LayerNormalization as Sum, so that ONNX Runtime's
            session-time SkipLayerNormFusion (a slower CPU kernel) leaves them alone wherever the graph
            is loaded (graph.residual_adds_as_sum). fp16 graphs are meant for CUDA, where the fused
            kernel pays, so they keep the Add.
    """

    name: str
    atol: float
    float16: bool
    residual_sum: bool = True


DTYPES = {
    "fp32": DtypeSpec("fp32", atol=1e-4, float16=False, residual_sum=True),
    # fp16 has a 10-bit mantissa: ~1e-3 relative error per op, compounding over the layers.
    "fp16": DtypeSpec("fp16", atol=5e-2, float16=True, residual_sum=False),
}


@dataclass(frozen=True)
class ExportMode:
    """One exported graph kind.

    Attributes:
        name: the sub-directory and --mode value.
        transform: model with SVDLinear adapters -> plain module to export (never mutates its input).
        attention_op: the fused attention op ONNX Runtime's optimizer may emit. "Attention" packs Q, K
            and V into one weight, so it cannot keep the low-rank branches of q/k/v; the factored
            graph uses "MultiHeadAttention", which keeps the three projections as separate MatMuls.
        has_branches: the graph carries low-rank branches that are set aside during fusion.
    """

    name: str
    transform: Callable
    attention_op: str
    has_branches: bool


MODES = {
    "merged": ExportMode("merged", merged_model, attention_op="Attention", has_branches=False),
    "factored": ExportMode("factored", factored_model, attention_op="MultiHeadAttention", has_branches=True),
}
MODE_CHOICES = ("merged", "factored", "both")


def _choose(table: dict, key: str, what: str, flag: str):
    if key not in table:
        raise ExportError(f"unknown {what} {key!r}: choose one of {', '.join(table)} ({flag})")
    return table[key]


def task_spec(task: str) -> TaskSpec:
    return _choose(TASKS, task, "task", "--task")


def dtype_spec(dtype: str) -> DtypeSpec:
    return _choose(DTYPES, dtype, "dtype", "--dtype")


def fusion_declaration(model_type: str) -> tuple[Fusion | None, str | None]:
    """(ONNX Runtime's fusion declaration, None) for a family it applies to, else (None, why not).

    Families outside the architecture table get no fusion either: exporting them still works when
    Optimum can trace them.
    """
    if model_type not in ARCHITECTURES:
        return None, f"model type {model_type!r} is not in the architecture table"
    row = ARCHITECTURES[model_type]
    return row.fusion, row.no_fusion


def export_modes(mode: str) -> list[ExportMode]:
    """The modes `--mode` asks for, merged first."""
    if mode not in MODE_CHOICES:
        raise ExportError(f"unknown mode {mode!r}: choose one of {', '.join(MODE_CHOICES)} (--mode)")
    return list(MODES.values()) if mode == "both" else [MODES[mode]]
