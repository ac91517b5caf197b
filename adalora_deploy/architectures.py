"""The model families the product supports, declared once (docs/architectures.md).

One row per transformers `model_type`. Training reads the default target modules, export reads the
validation-input needs and whether ONNX Runtime's offline transformer fusions apply, and `inspect`
reads the short column names of the module types. Adding a family means adding a row here.

Torch-free: the serving path and the CLI's argument parsing may import it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError

ENCODER, DECODER = "encoder", "decoder"


@dataclass(frozen=True)
class Fusion:
    """How ONNX Runtime's transformer optimizer (onnxruntime.transformers.optimizer) reads a family.

    Attributes:
        ort_model_type: the optimizer's `model_type`.
        num_heads_attr: the transformers config attribute with the number of attention heads.
        hidden_size_attr: the config attribute with the hidden size.
    """

    ort_model_type: str
    num_heads_attr: str = "num_attention_heads"
    hidden_size_attr: str = "hidden_size"


@dataclass(frozen=True)
class Architecture:
    """One model family.

    Attributes:
        model_type: transformers' config.model_type.
        kind: ENCODER or DECODER (decoders pad with EOS when the tokenizer has no pad token, and
            their graphs take position_ids).
        target_modules: module-path suffixes adapted by default: every linear layer of attention and
            FFN, the paper's choice (Zhang et al. 2023, Sec. 4).
        module_labels: suffix -> short column name in `inspect`.
        new_modules: what loading the bare base model into the sequence-classification class reports
            as newly initialised, i.e. what is trained in full beside the adapter for that task. It
            documents the row and is checked by the tests; training finds these from transformers'
            loading info, never from this list.
        fusion: ONNX Runtime's offline fusions, or None where they do not apply (the export then
            skips fusion by itself and records `fusion_skipped` in the manifest).
        no_fusion: why fusion does not apply (None when it does).
    """

    model_type: str
    kind: str
    target_modules: tuple[str, ...]
    module_labels: dict[str, str]
    new_modules: tuple[str, ...]
    fusion: Fusion | None = None
    no_fusion: str | None = None

    def __post_init__(self) -> None:
        assert (self.fusion is None) != (self.no_fusion is None), self.model_type
        assert set(self.target_modules) <= set(self.module_labels), self.model_type

    @property
    def is_decoder(self) -> bool:
        return self.kind == DECODER


_BERT_MODULES = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")
_BERT_LABELS = {"query": "query", "key": "key", "value": "value", "attention.output.dense": "attn-out",
                "intermediate.dense": "ffn-in", "output.dense": "ffn-out"}
_DEBERTA_MODULES = ("query_proj", "key_proj", "value_proj", "attention.output.dense", "intermediate.dense",
                    "output.dense")
_DEBERTA_LABELS = {**_BERT_LABELS, "query_proj": "query", "key_proj": "key", "value_proj": "value"}
_LLAMA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_LLAMA_LABELS = {"q_proj": "query", "k_proj": "key", "v_proj": "value", "o_proj": "attn-out",
                 "gate_proj": "ffn-gate", "up_proj": "ffn-up", "down_proj": "ffn-down"}
_BERT_FUSION = Fusion("bert")
_DECODER_NO_FUSION = ("ONNX Runtime's offline transformer fusions are declared here for BERT-style encoders; "
                      "this decoder's graph is left to ONNX Runtime's session-time optimizer")


def _decoder(model_type: str, modules=_LLAMA_MODULES, labels=_LLAMA_LABELS) -> Architecture:
    return Architecture(model_type, DECODER, modules, labels, ("score",), no_fusion=_DECODER_NO_FUSION)


ARCHITECTURES: dict[str, Architecture] = {a.model_type: a for a in (
    Architecture("bert", ENCODER, _BERT_MODULES, _BERT_LABELS, ("classifier",), fusion=_BERT_FUSION),
    Architecture("roberta", ENCODER, _BERT_MODULES, _BERT_LABELS, ("classifier.dense", "classifier.out_proj"),
                 fusion=_BERT_FUSION),
    Architecture(
        "distilbert", ENCODER, ("q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"),
        {"q_lin": "query", "k_lin": "key", "v_lin": "value", "out_lin": "attn-out", "lin1": "ffn-in",
         "lin2": "ffn-out"},
        ("pre_classifier", "classifier"), fusion=Fusion("bert", num_heads_attr="n_heads", hidden_size_attr="dim"),
    ),
    Architecture(
        "deberta-v2", ENCODER, _DEBERTA_MODULES, _DEBERTA_LABELS, ("pooler.dense", "classifier"),
        no_fusion="ONNX Runtime's transformer optimizer has no fusion for DeBERTa's disentangled "
        "(relative-position) attention",
    ),
    _decoder("gpt2", ("c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"),
             {"c_attn": "qkv", "attn.c_proj": "attn-out", "c_fc": "ffn-in", "mlp.c_proj": "ffn-out"}),
    _decoder("llama"),
    _decoder("mistral"),
    _decoder("qwen2"),
    _decoder("phi3", ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
             {"qkv_proj": "qkv", "o_proj": "attn-out", "gate_up_proj": "ffn-gate-up", "down_proj": "ffn-down"}),
)}


def architecture(model_type: str) -> Architecture:
    """The row for `model_type`; ConfigError naming the supported families otherwise."""
    if model_type not in ARCHITECTURES:
        raise ConfigError(
            f"model type {model_type!r} is not in the architecture table (supported: {', '.join(ARCHITECTURES)}); "
            "pass --target-modules to adapt it anyway"
        )
    return ARCHITECTURES[model_type]


def module_labels() -> dict[str, str]:
    """Every row's suffix -> column name, for reports."""
    return {suffix: label for a in ARCHITECTURES.values() for suffix, label in a.module_labels.items()}
