"""`export`: checkpoint -> OUT/merged/ and OUT/factored/, each an ONNX model directory that ONNX
Runtime, Optimum's ORTModel classes and a transformers pipeline load on their own.

Steps: load the checkpoint (ours or PEFT's) -> optionally prune -> per mode: transform the module,
export it with Optimum's ONNX exporter (TorchScript), fuse with ONNX Runtime's optimizer, cast ->
validate every graph against PyTorch -> write config, tokenizer and adalora_manifest.json. All of it
happens in a temporary directory that replaces OUT only when everything passed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from torch import nn

from adalora_deploy.architectures import Fusion
from adalora_deploy.constants import (
    ADAPTER_MODE,
    CHECKPOINT_FORMAT,
    FEATURE_EXTRACTION,
    MANIFEST_FILE,
    MODEL_FILE,
    MULTI_MODE,
    SEQUENCE_CLASSIFICATION,
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE,
)
from adalora_deploy.io import atomic_output_dir, check_output_dir, read_json, write_json
from adalora_deploy.layers import svd_modules
from adalora_deploy.ort import CPU_EP, cuda_status
from adalora_deploy.prune import PrunedAdapter, prune, pruned_model

from . import graph as graphs
from .adapter_pack import export_adapter
from .decoder import decoder_probes
from .errors import ExportError
from .manifest import (
    ModuleFigures,
    manifest_header,
    module_table,
    package_versions,
    source_hash,
)
from .multi import export_multi
from .options import ExportConfig
from .quantize import (
    DEFAULT_MAX_ACCURACY_DROP,
    EvalSet,
    QuantizeSpec,
    accuracy_figures,
    branch_nodes,
    check_drop,
    eval_set,
    predict,
    quantization_record,
    quantize_graph,
    quantize_spec,
)
from .source import Source, load_source
from .specs import (
    CROSS_MODE_ATOL,
    FUSIONS,
    MIN_OPSET,
    PRUNE_ATOL,
    DtypeSpec,
    ExportMode,
    FusionSpec,
    TaskSpec,
    dtype_spec,
    export_modes,
    fusion_declaration,
    task_spec,
)
from .validate import OrtRunner, Probe, ValidationReport, plain_probes

log = logging.getLogger("adalora_deploy.export")


@dataclass(frozen=True)
class ExportRequest:
    """The export flags, checked when built (see `export` for their meaning)."""

    modes: tuple[ExportMode, ...]
    prune_ranks: bool
    dtype: DtypeSpec
    opset: int | None
    optimize: bool
    task: str | None
    validate: bool
    quantize: QuantizeSpec | None = None
    eval_data: str | None = None
    max_accuracy_drop: float = DEFAULT_MAX_ACCURACY_DROP
    quantize_branches: bool | None = None  # None: the scheme's measured default

    def __post_init__(self) -> None:
        if self.opset is not None and self.opset < MIN_OPSET:
            raise ExportError(f"--opset {self.opset} is too old: use {MIN_OPSET} or newer (LayerNormalization)")
        if self.task is not None:
            task_spec(self.task)
        if self.quantize is not None and self.dtype.float16:
            raise ExportError(f"--quantize {self.quantize.name} starts from the fp32 graph: drop --dtype fp16")
        if self.quantize is None and (self.eval_data is not None or self.quantize_branches is not None):
            raise ExportError("--eval-data and --quantize-branches apply to quantized exports: add --quantize int8")

    @property
    def fusions(self) -> FusionSpec:
        return self.quantize.fusions if self.quantize is not None else FUSIONS

    @property
    def branches_in_int8(self) -> bool:
        return self.quantize_branches if self.quantize_branches is not None else self.quantize.branches_default


@dataclass
class Plan:
    """What gets exported: the model to transform (pruned copy or the adapted model) and its context."""

    source: Source
    task: TaskSpec
    model: nn.Module  # transformers model with SVDLinear adapters
    pruned: PrunedAdapter | None
    opset: int
    arch: Fusion | None  # None: no fusion pass
    tokenizer: object
    fusion_skipped: str | None = None  # why fusion was skipped although --optimize asked for it

    def branch_names(self) -> dict[str, str]:
        """Module path in the exported module -> checkpoint module path, for adapters of rank >= 1."""
        names = {id(m): n for n, m in svd_modules(self.model).items()}
        exported = svd_modules(self.task.module(self.model))
        return {path: names[id(m)] for path, m in exported.items() if m.r > 0}


@dataclass
class ModeResult:
    """One written mode directory (manifest still to come)."""

    mode: ExportMode
    dir: Path
    graph: onnx.ModelProto
    fused_ops: dict[str, int] | None
    seconds: float
    runner: OrtRunner | None = None
    quantized: onnx.ModelProto | None = None  # the int8 graph that replaced the fp32 one on disk
    quantization: dict | None = None  # its manifest section

    @property
    def onnx_path(self) -> Path:
        return self.dir / MODEL_FILE


@contextlib.contextmanager
def _step(what: str):
    log.info("%s ...", what)
    start = time.perf_counter()
    yield
    log.info("%s: done in %.1f s", what, time.perf_counter() - start)


@contextlib.contextmanager
def _quiet_exporter():
    # Optimum and the TorchScript tracer warn about things that are expected here (opset advice,
    # traced shape arithmetic); the export is checked against PyTorch instead.
    optimum_log = logging.getLogger("optimum")
    level = optimum_log.level
    optimum_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        optimum_log.setLevel(level)


def _default_opset(module: nn.Module, task: TaskSpec) -> int:
    import optimum.exporters.onnx.model_configs  # noqa: F401  (registers the ONNX configs with the TasksManager)
    from optimum.exporters.tasks import TasksManager

    try:
        constructor = TasksManager.get_exporter_config_constructor(
            exporter="onnx", model=module, task=task.optimum_task, library_name="transformers"
        )
    except (KeyError, ValueError) as err:
        raise ExportError(f"Optimum cannot export {module.config.model_type} for {task.name}: {err}") from err
    return max(constructor(module.config).DEFAULT_ONNX_OPSET, MIN_OPSET)


def make_plan(source: Source, request: ExportRequest) -> Plan:
    """Resolve task, pruning, opset and optimizer declarations for `source`."""
    from transformers import AutoTokenizer

    task = task_spec(request.task or source.task)
    if task.needs_head and source.task != task.name:
        raise ExportError(
            f"the checkpoint was trained for {source.task} and has no {task.name} head: "
            f"export it with --task {source.task}"
        )
    pruned = prune(source.model.adapter_state_dict()) if request.prune_ranks else None
    model = pruned_model(source.model.model, pruned).eval() if pruned else source.model.model
    arch, skipped = _fusion(model.config.model_type, task, request.optimize)
    opset = request.opset or _default_opset(task.module(model), task)
    tokenizer = AutoTokenizer.from_pretrained(source.tokenizer_dir)
    return Plan(source, task, model, pruned, opset, arch, tokenizer, skipped)


def _fusion(model_type: str, task: TaskSpec, optimize: bool) -> tuple[Fusion | None, str | None]:
    """The fusion declaration to apply, or (None, why fusion is skipped although --optimize asked)."""
    if not optimize:
        return None, None
    if task.with_past:
        # The offline fusions are declared for encoders; a decoder with past key values keeps its graph
        # and leaves fusing to ONNX Runtime's session-time optimizer.
        skipped = f"ONNX Runtime's offline transformer fusions do not apply to {task.name} (a decoder with past key values)"
    else:
        fusion, skipped = fusion_declaration(model_type)
        if fusion is not None:
            return fusion, None
    log.info("fusion skipped: %s", skipped)
    return None, skipped


def _onnx_configs(module: nn.Module, plan: Plan) -> dict | None:
    """Optimum's own OnnxConfig, except that a decoder's feature-extraction graph takes no position_ids:
    ORTModelForFeatureExtraction and the pipeline never feed them, and without them the model numbers
    the positions 0..T-1, right for the right-padded batches a tokenizer makes."""
    from optimum.exporters.tasks import TasksManager

    if plan.task.name != FEATURE_EXTRACTION:
        return None
    constructor = TasksManager.get_exporter_config_constructor(
        exporter="onnx", model=module, task=plan.task.optimum_task, library_name="transformers"
    )
    config = constructor(module.config)
    if "position_ids" not in config.inputs:
        return None

    class WithoutPositions(type(config)):
        @property
        def inputs(self):
            return {k: v for k, v in super().inputs.items() if k != "position_ids"}

    return {"model": WithoutPositions(module.config, task=plan.task.optimum_task)}


def _optimum_export(module: nn.Module, out_dir: Path, plan: Plan) -> None:
    from optimum.exporters.onnx import onnx_export_from_model

    try:
        with _quiet_exporter():
            onnx_export_from_model(
                module, output=out_dir, task=plan.task.optimum_task, opset=plan.opset,
                do_validation=False, no_post_process=True, custom_onnx_configs=_onnx_configs(module, plan),
            )
    except (ValueError, RuntimeError, KeyError) as err:
        raise ExportError(f"Optimum's ONNX export failed: {err}") from err


def export_mode(plan: Plan, mode: ExportMode, out_dir: Path, request: ExportRequest) -> ModeResult:
    """Trace one mode's module to out_dir/model.onnx, fused and cast as asked."""
    start = time.perf_counter()
    module = plan.task.module(mode.transform(plan.model))
    # config.json names the class that loads this graph's weights (the base's config says e.g. BertModel).
    module.config.architectures = [type(module).__name__]
    with _step(f"{mode.name}: ONNX export (Optimum, opset {plan.opset})"):
        _optimum_export(module, out_dir, plan)
    graph = onnx.load(str(out_dir / MODEL_FILE))
    if mode.has_branches:
        graphs.label_branches(graph, plan.branch_names())
    fused = None
    if plan.arch is not None:
        with _step(f"{mode.name}: ONNX Runtime transformer fusions"):
            graph, fused = graphs.optimize(graph, plan.arch, module.config, mode.attention_op, mode.has_branches,
                                           request.fusions)
    if request.dtype.residual_sum:
        graphs.residual_adds_as_sum(graph)
    if request.dtype.float16:
        graph = graphs.to_float16(graph)
    graphs.save(graph, out_dir / MODEL_FILE)
    return ModeResult(mode, out_dir, graph, fused, time.perf_counter() - start)


def validate_all(plan: Plan, results: list[ModeResult], dtype: DtypeSpec) -> ValidationReport:
    """ONNX Runtime against PyTorch for every mode, pruned against unpruned, merged against factored."""
    report = ValidationReport()
    for r in results:
        r.runner = OrtRunner(r.onnx_path, prefer_cuda=dtype.float16)
        for output in plan.task.outputs:
            report.expect_outputs(r.mode.name, r.runner, output)
    source_module = plan.task.module(plan.source.model.model)
    probes = _probes(plan, results[0].runner, source_module)
    report.inputs = len(probes)
    reference = [p.reference(source_module) for p in probes]
    if plan.pruned is not None:
        check = report.check("pruned_vs_unpruned_pytorch", "pruned vs unpruned model (PyTorch)", PRUNE_ATOL)
        for p, want in zip(probes, reference, strict=True):
            check.compare_all(p.case, p.reference(plan.task.module(plan.model)), want)
    outputs = {r.mode.name: _ort_outputs(r, probes, plan.task.outputs) for r in results}
    for r in results:
        check = report.check(f"{r.mode.name}:onnx_vs_pytorch", f"{r.mode.name}: ONNX Runtime vs PyTorch", dtype.atol)
        for p, got, want in zip(probes, outputs[r.mode.name], reference, strict=True):
            check.compare_all(p.case, got, want)
    if len(outputs) == 2:
        atol = CROSS_MODE_ATOL if not dtype.float16 else dtype.atol
        check = report.check("merged_vs_factored", "merged vs factored (ONNX Runtime)", atol)
        for p, a, b in zip(probes, outputs["merged"], outputs["factored"], strict=True):
            check.compare_all(p.case, a, b)
    return report


def _probes(plan: Plan, runner: OrtRunner, source_module: nn.Module) -> list[Probe]:
    if plan.task.with_past:
        return decoder_probes(plan.model.config, runner, source_module)
    return plain_probes(plan.model.config, runner.input_names, plan.task.outputs)


def _ort_outputs(result: ModeResult, probes: list[Probe], outputs: tuple[str, ...]) -> list[dict[str, np.ndarray]]:
    if any(o not in result.runner.output_names for o in outputs):
        # reported by expect_outputs; the shapes then mismatch
        return [dict.fromkeys(outputs, np.full(0, np.nan)) for _ in probes]
    return [p.keep(result.runner.run(p.feeds)) for p in probes]


def _module_figures(plan: Plan, result: ModeResult) -> dict[str, ModuleFigures]:
    model = plan.source.model
    effective = model.ranks()
    after = plan.pruned.ranks_after if plan.pruned else {n: m.r for n, m in model.adapters.items()}
    in_graph = graphs.branch_ranks(result.graph) if result.mode.has_branches else {}
    return {
        name: ModuleFigures(m.d_out, m.d_in, m.r, effective[name], after[name], in_graph.get(name))
        for name, m in model.adapters.items()
    }


def _validation_figures(plan: Plan, result: ModeResult, report: ValidationReport | None, dtype: DtypeSpec) -> dict:
    if report is None:
        return {"validated": False}
    keys = [f"{result.mode.name}:onnx_vs_pytorch", "pruned_vs_unpruned_pytorch", "merged_vs_factored"]
    parity = {k.split(":")[-1]: v for k, v in report.figures(keys).items()}
    provider = result.runner.provider
    note = "fp32 graph run by ONNX Runtime"
    if dtype.float16 and provider == CPU_EP:
        note = (f"fp16 graph run by ONNX Runtime's CPU provider, values checked, CUDA kernels not exercised: "
                f"{cuda_status()[1]}")
    return {"validated": True, "provider": provider, "note": note, "cases": report.inputs, "parity": parity}


def mode_manifest(plan: Plan, result: ModeResult, report: ValidationReport | None, request: ExportRequest) -> dict:
    """adalora_manifest.json for one mode directory."""
    source, model = plan.source, plan.source.model
    graph = result.graph
    return {
        **manifest_header(result.mode.name, plan.task.name, request.dtype.name, plan.opset, plan.arch is not None,
                          plan.pruned is not None),
        "fusion_skipped": plan.fusion_skipped,
        "source": {"kind": source.kind, "path": str(source.path), **source_hash(source.files)},
        # the reloaded model against the outputs the trained model recorded when it was saved
        "reload_fingerprint": source.fingerprint,
        "stopped_early": source.stopped_early,
        "base_model": model.base_model,
        "architecture": type(plan.task.module(model.model)).__name__,
        "model_type": model.model.config.model_type,
        "init_r": model.config.init_r,
        "scaling": model.config.scaling,
        **module_table(_module_figures(plan, result)),
        "graph": {
            "file": MODEL_FILE,
            "branches": len(graphs.branches(graph)) if result.mode.has_branches else 0,
            "branch_params": graphs.branch_params(graph) if result.mode.has_branches else 0,
            "fused_ops": result.fused_ops,
            # SkipLayerNormalization is left to ONNX Runtime's session-time fusion (see specs.FusionSpec)
            "fusion_settings": dataclasses.asdict(request.fusions) if plan.arch is not None else None,
            "op_counts": graphs.op_counts(result.quantized or graph),
        },
        "validation": _validation_figures(plan, result, report, request.dtype),
        # parity above is the fp32 graph's, before quantization; the int8 graph is judged by accuracy here
        "quantization": result.quantization,
        "export_seconds": round(result.seconds, 2),
        "versions": package_versions(),
    }


def save_tokenizer(tokenizer, out_dir: Path) -> None:
    """The tokenizer files, with the input names transformers' class would return recorded in
    tokenizer_config.json: the serving tokenizer reads tokenizer.json without knowing the class."""
    if not getattr(tokenizer, "is_fast", False):
        raise ExportError(f"the tokenizer ({type(tokenizer).__name__}) has no fast version: serving reads "
                          f"{TOKENIZER_FILE}; save the base model with a fast tokenizer")
    tokenizer.save_pretrained(str(out_dir))
    path = out_dir / TOKENIZER_CONFIG_FILE
    config = read_json(path, "tokenizer config") if path.is_file() else {}
    write_json(path, config | {"model_input_names": list(tokenizer.model_input_names)})


def _finish(plan: Plan, result: ModeResult, report: ValidationReport | None, request: ExportRequest) -> None:
    save_tokenizer(plan.tokenizer, result.dir)
    write_json(result.dir / MANIFEST_FILE, mode_manifest(plan, result, report, request))


def _eval_set(plan: Plan, request: ExportRequest) -> EvalSet:
    """The labelled rows an int8 export is judged on (refuses before any export work when none)."""
    from adalora_deploy.model import read_checkpoint_config

    if plan.task.name != SEQUENCE_CLASSIFICATION:
        raise ExportError(
            f"--quantize {request.quantize.name} is judged by classification accuracy: export "
            f"{plan.task.name} without --quantize"
        )
    source = plan.source
    train = read_checkpoint_config(source.path).get("train") if source.kind == CHECKPOINT_FORMAT else None
    limits = [getattr(plan.tokenizer, "model_max_length", 0), plan.model.config.max_position_embeddings]
    max_length = min(int(n) for n in limits if 0 < n < 1_000_000)
    with _step("loading the evaluation data for int8"):
        return eval_set(train, request.eval_data, dict(plan.model.config.id2label), max_length)


def quantize_mode(plan: Plan, result: ModeResult, request: ExportRequest, evaluation: EvalSet, scratch: Path) -> None:
    """Quantize one mode's fp32 graph, judge it on `evaluation` and, if it passes the accuracy gate,
    put it in place of the fp32 model.onnx."""
    start = time.perf_counter()
    spec = request.quantize
    if (result.dir / (MODEL_FILE + "_data")).exists():
        raise ExportError(f"--quantize {spec.name} of graphs over 2 GB is not supported: export without it")
    int8_path = scratch / f"{result.mode.name}-{spec.name}.onnx"
    exclude = branch_nodes(result.graph) if result.mode.has_branches and not request.branches_in_int8 else []
    with _step(f"{result.mode.name}: {spec.name} quantization (ONNX Runtime, dynamic)"):
        result.quantized = quantize_graph(result.onnx_path, int8_path, spec, exclude)
    with _step(f"{result.mode.name}: fp32 vs {spec.name} accuracy on {len(evaluation.dataset)} examples"):
        fp32 = predict(result.runner or OrtRunner(result.onnx_path), plan.tokenizer, evaluation)
        int8 = predict(OrtRunner(int8_path), plan.tokenizer, evaluation)
    figures = {"data": evaluation.dataset.source, "origin": evaluation.origin, "max_length": evaluation.max_length,
               **accuracy_figures(fp32, int8, np.asarray(evaluation.dataset.labels)),
               "max_accuracy_drop": request.max_accuracy_drop}
    check_drop(result.mode.name, figures, request.max_accuracy_drop)
    branches = ("int8" if request.branches_in_int8 else "fp32") if result.mode.has_branches else None
    record = quantization_record(spec, branches, exclude, result.onnx_path, int8_path, figures)
    shutil.move(str(int8_path), str(result.onnx_path))
    result.quantization = {**record, "seconds": round(time.perf_counter() - start, 2)}


def _export_into(tmp: Path, source: Source, request: ExportRequest) -> None:
    plan = make_plan(source, request)
    evaluation = _eval_set(plan, request) if request.quantize else None
    results = [export_mode(plan, mode, tmp / mode.name, request) for mode in request.modes]
    report = None
    if request.validate:
        with _step("validating against PyTorch"):
            report = validate_all(plan, results, request.dtype)
        report.raise_if_failed()
    if evaluation is not None:
        with tempfile.TemporaryDirectory(prefix="adalora-quantize-") as scratch:
            for result in results:
                quantize_mode(plan, result, request, evaluation, Path(scratch))
    for result in results:
        _finish(plan, result, report, request)


def _check_plain_flags(mode: str, **flags) -> None:
    # --mode adapter and multi write fp32 packs and graphs of the sequence classifier; nothing else applies.
    defaults = {"dtype": "fp32", "opset": None, "task": None, "quantize": None, "eval_data": None}
    given = [f"--{k.replace('_', '-')}" for k, v in flags.items() if v != defaults[k] and
             not (k == "task" and v == SEQUENCE_CLASSIFICATION)]
    if given:
        raise ExportError(f"--mode {mode} does not take {', '.join(given)}: drop them")


def export(
    checkpoint: str | os.PathLike, out: str | os.PathLike, *, mode: str = ExportConfig.mode,
    prune_ranks: bool = ExportConfig.prune_ranks, dtype: str = ExportConfig.dtype,
    opset: int | None = ExportConfig.opset, optimize: bool = ExportConfig.optimize,
    task: str | None = ExportConfig.task, base: str | None = ExportConfig.base,
    overwrite: bool = ExportConfig.overwrite, validate: bool = ExportConfig.validate,
    quantize: str | None = ExportConfig.quantize, eval_data: str | None = ExportConfig.eval_data,
    max_accuracy_drop: float = ExportConfig.max_accuracy_drop,
    quantize_branches: bool | None = ExportConfig.quantize_branches,
) -> Path:
    """Export a checkpoint to ONNX: OUT/merged/ and/or OUT/factored/.

    Each mode directory holds model.onnx, config.json, the tokenizer files and adalora_manifest.json,
    and loads on its own (Optimum's ORTModel classes, transformers pipelines, adalora_deploy.runtime).

    Args:
        checkpoint: an adalora-deploy checkpoint directory or a PEFT AdaLoRA adapter directory.
        out: the export directory; written atomically, nothing is left on error.
        mode ... quantize_branches, validate: the fields of ExportConfig (exporters/options.py), i.e. the
            flags of `adalora-deploy export`, with their defaults and help.

    Returns:
        `out` as a Path.
    """
    if mode in (ADAPTER_MODE, MULTI_MODE):
        _check_plain_flags(mode, dtype=dtype, opset=opset, task=task, quantize=quantize, eval_data=eval_data)
        if mode == ADAPTER_MODE:
            return export_adapter(checkpoint, out, prune_ranks=prune_ranks, base=base, overwrite=overwrite)
        return export_multi(checkpoint, out, base=base, overwrite=overwrite, validate_graph=validate, optimize=optimize)
    request = ExportRequest(
        tuple(export_modes(mode)), prune_ranks, dtype_spec(dtype), opset, optimize, task, validate,
        quantize_spec(quantize) if quantize is not None else None, eval_data, max_accuracy_drop, quantize_branches,
    )
    check_output_dir(out, overwrite, (checkpoint, base))
    with _step(f"loading {checkpoint}"):
        source = load_source(checkpoint, base=base)
    if source.stopped_early:
        stop = source.stopped_early
        log.warning("note: %s holds the last good state of a run that diverged (%s), after %s of %s steps: it exports, "
                    "but it is not trained to the end", checkpoint, stop.get("reason"), stop.get("steps_done"),
                    stop.get("steps_planned"))
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        _export_into(tmp, source, request)
    log.info("wrote %s", ", ".join(str(Path(out) / m.name) for m in request.modes))
    return Path(out)
