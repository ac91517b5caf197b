"""ONNX Runtime sessions: provider choice and its reporting, options, bad export directories."""

import shutil

import numpy as np
import pytest

from adalora_deploy.errors import AdaLoraDeployError, ConfigError
from adalora_deploy.ort import cuda_status
from adalora_deploy.runtime.session import (
    CPU_EP,
    CUDA_EP,
    ExportDirError,
    ProviderUnavailableError,
    SessionConfig,
    open_session,
    resolve_export_dir,
)

CUDA_USABLE = cuda_status()[0]


def test_auto_reports_the_provider_that_really_runs(tiny_export_root):
    session = open_session(tiny_export_root / "merged", SessionConfig(provider="auto"))
    # onnxruntime-gpu lists CUDA as available even without a GPU; only a started session tells.
    assert session.provider == (CUDA_EP if CUDA_USABLE else CPU_EP)
    assert session.session.get_providers()[0] == session.provider


def test_cpu_is_cpu(tiny_export_root):
    assert open_session(tiny_export_root / "merged", SessionConfig(provider="cpu")).provider == CPU_EP


@pytest.mark.skipif(CUDA_USABLE, reason="CUDA starts here")
def test_cuda_without_cuda_is_a_clear_error(tiny_export_root):
    with pytest.raises(ProviderUnavailableError, match="--provider cuda.*auto or cpu") as err:
        open_session(tiny_export_root / "merged", SessionConfig(provider="cuda"))
    assert isinstance(err.value, AdaLoraDeployError)
    assert "\n" not in str(err.value)


def test_session_options_are_applied(tiny_export_root):
    config = SessionConfig(provider="cpu", graph_optimization="basic", intra_op_threads=1, inter_op_threads=2,
                           memory_arena=False, spinning=False)
    options = open_session(tiny_export_root / "merged", config).session.get_session_options()
    assert options.intra_op_num_threads == 1 and options.inter_op_num_threads == 2
    assert str(options.graph_optimization_level).endswith("ORT_ENABLE_BASIC")
    assert str(options.execution_mode).endswith("ORT_PARALLEL")  # inter-op threads need it
    assert options.enable_cpu_mem_arena is False
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


@pytest.mark.parametrize("mode", ["merged", "factored"])
def test_optimisation_levels_agree(tiny_export_root, mode):
    runs = []
    for level in ("disable", "all"):
        session = open_session(tiny_export_root / mode, SessionConfig(provider="cpu", graph_optimization=level))
        feeds = session.dummy_feeds((3, 7))
        feeds["input_ids"] = np.arange(2000, 2021, dtype=np.int64).reshape(3, 7)
        runs.append(session.run(feeds)["logits"])
    np.testing.assert_allclose(runs[0], runs[1], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "field, value", [("provider", "tpu"), ("graph_optimization", "max"), ("intra_op_threads", -1)]
)
def test_bad_session_config(field, value):
    with pytest.raises(ConfigError, match=field):
        SessionConfig(**{field: value})


def test_resolve_export_dir(tiny_export_root, tmp_path):
    assert resolve_export_dir(tiny_export_root) == tiny_export_root / "merged"
    assert resolve_export_dir(tiny_export_root, "factored") == tiny_export_root / "factored"
    assert resolve_export_dir(tiny_export_root / "factored") == tiny_export_root / "factored"
    only_factored = tmp_path / "only-factored"
    shutil.copytree(tiny_export_root / "factored", only_factored / "factored")
    with pytest.raises(ExportDirError, match="--mode factored"):
        resolve_export_dir(only_factored, "merged")
    with pytest.raises(ExportDirError, match="not found"):
        resolve_export_dir(tmp_path / "missing")


def test_corrupt_model_is_a_clear_error(tiny_export_root, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_export_root / "merged", broken)
    data = (broken / "model.onnx").read_bytes()
    (broken / "model.onnx").write_bytes(data[: len(data) // 3])  # truncated, as by a full disk
    with pytest.raises(ExportDirError, match="could not be loaded.*re-export"):
        open_session(broken, SessionConfig(provider="cpu"))


@pytest.mark.gpu
def test_cuda_iobinding_matches_cpu(tiny_export_root):
    cpu = open_session(tiny_export_root / "merged", SessionConfig(provider="cpu"))
    gpu = open_session(tiny_export_root / "merged", SessionConfig(provider="cuda"))
    assert gpu.provider == CUDA_EP and gpu.on_cuda
    feeds = cpu.dummy_feeds((4, 9))
    feeds["input_ids"] = np.arange(3000, 3036, dtype=np.int64).reshape(4, 9)
    np.testing.assert_allclose(gpu.run(feeds)["logits"], cpu.run(feeds)["logits"], atol=1e-3, rtol=0)


def _op_counts(path) -> dict:
    import collections

    import onnx

    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def _default_session_ops(model, tmp_path) -> dict:
    import onnxruntime as ort

    options = ort.SessionOptions()  # ONNX Runtime's defaults, as Optimum's ORTModel uses them
    options.optimized_model_filepath = str(tmp_path / "ort-default.onnx")
    ort.InferenceSession(str(model), options, providers=[CPU_EP])
    return _op_counts(tmp_path / "ort-default.onnx")


@pytest.mark.parametrize("mode", ["merged", "factored"])
def test_export_keeps_layer_norm_unfused_under_default_options(tiny_export_root, tmp_path, mode):
    """The export writes residual Adds as Sum, so ONNX Runtime's default session does not swap in its
    slower CPU SkipLayerNormalization wherever the graph is loaded."""
    model = tiny_export_root / mode / "model.onnx"
    counts = _default_session_ops(model, tmp_path)
    assert counts["SkipLayerNormalization"] == 0
    assert counts["LayerNormalization"] == _op_counts(model)["LayerNormalization"] == _op_counts(model)["Sum"] > 0


@pytest.mark.parametrize("mode", ["merged", "factored"])
def test_cpu_sessions_keep_layer_norm_unfused(tiny_export_root, tmp_path, mode):
    """Graphs with Add before LayerNormalization (older exports, other exporters): our CPU sessions
    turn the session-time fusion off themselves."""
    import onnx

    graph = onnx.load(str(tiny_export_root / mode / "model.onnx"))
    for node in graph.graph.node:
        node.op_type = "Add" if node.op_type == "Sum" else node.op_type
    model = tmp_path / "with-add.onnx"
    onnx.save(graph, str(model))
    # ONNX Runtime's own default fuses SkipLayerNormalization into this graph, so the check can fail.
    assert _default_session_ops(model, tmp_path)["SkipLayerNormalization"] > 0
    saved = tmp_path / "ours.onnx"
    session = open_session(model, SessionConfig(provider="cpu", optimized_model_path=str(saved)))
    counts = _op_counts(saved)
    assert counts["SkipLayerNormalization"] == 0
    assert counts["LayerNormalization"] == _op_counts(model)["LayerNormalization"] > 0
    feeds = session.dummy_feeds((2, 5))
    reference = open_session(model, SessionConfig(provider="cpu", graph_optimization="disable")).run(feeds)
    np.testing.assert_allclose(session.run(feeds)["logits"], reference["logits"], atol=1e-5)
