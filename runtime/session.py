"""ONNX Runtime sessions on an export directory: SessionConfig and its session options, the export
directory's layout, and IOBinding with device-resident inputs and outputs on CUDA. The CUDA check,
provider choice and dummy inputs are adalora_deploy.ort's, shared with the exporters and benchmarks."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from adalora_deploy.constants import MANIFEST_FILE, MODEL_FILE, SERVE_MODES
from adalora_deploy.errors import ConfigError
from adalora_deploy.io import read_json
from adalora_deploy.ort import (
    CPU_EP,
    CUDA_EP,
    PROVIDERS,
    ExportDirError,
    ProviderUnavailableError,
    dummy_inputs,
    inference_session,
    providers_for,
)

GRAPH_OPTIMIZATIONS = ("disable", "basic", "extended", "all")

# Shape of the dummy batch used for the warm-up run: small, so that warming up costs little.
WARMUP_SHAPE = (1, 8)
# A model call of more padded tokens (rows x longest row) than this gives the memory it grew back to the
# system when it ends (run(release_memory=True)): after a burst of long texts the process
# returns near its usual size instead of keeping the burst's peak. Ordinary batches (up to 32 texts of
# up to 128 tokens) stay at or under it and keep their buffers between calls, so their latency is
# unchanged: releasing after every 32 x 128 call made those calls 1.07x slower, because each one grew
# the arena again (MiniLM, 1 thread, benchmarks/release_cost.md). The server's largest call
# (--max-batch-tokens, default 8192) is above it.
RELEASE_MEMORY_TOKENS = 4096


@dataclass
class SessionConfig:
    """How to open an ONNX Runtime session.

    Args:
        provider: "auto" (CUDA when ONNX Runtime can really start it, else CPU), "cuda" or "cpu".
        graph_optimization: ONNX Runtime's graph optimisation level: disable, basic, extended, all.
        intra_op_threads: threads inside one operator; 0 lets ONNX Runtime pick (one per core).
        inter_op_threads: threads across independent operators; 0 or 1 runs operators in sequence.
        memory_arena: keep ONNX Runtime's memory arena (faster; holds on to peak memory).
        spinning: let idle worker threads spin-wait (lower latency, burns CPU between calls).
        warmup: run one dummy batch when the session opens (CUDA kernels and arenas start lazily).
        device_id: the CUDA device.
        optimized_model_path: if set, ONNX Runtime writes the graph it optimised there (to inspect it).
    """

    provider: str = "auto"
    graph_optimization: str = "all"
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    memory_arena: bool = True
    spinning: bool = True
    warmup: bool = True
    device_id: int = 0
    optimized_model_path: str | None = None

    def __post_init__(self) -> None:
        if self.provider not in PROVIDERS:
            raise ConfigError(f"provider {self.provider!r} is not one of {', '.join(PROVIDERS)}")
        if self.graph_optimization not in GRAPH_OPTIMIZATIONS:
            raise ConfigError(
                f"graph_optimization {self.graph_optimization!r} is not one of {', '.join(GRAPH_OPTIMIZATIONS)}"
            )
        for name in ("intra_op_threads", "inter_op_threads", "device_id"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} ({getattr(self, name)}) must be >= 0 (0 means ONNX Runtime's default)")


def resolve_export_dir(path: str | os.PathLike, mode: str | None = None) -> Path:
    """The directory holding model.onnx: `path` itself, or `path/mode` for an export root.

    Args:
        path: one mode's directory, or an export root with merged/ and factored/ inside.
        mode: "merged", "factored" or "multi"; used only when `path` is an export root.

    Returns:
        The mode directory. Raises ExportDirError when there is no model.onnx to be found.
    """
    path = Path(path)
    if mode is not None and mode not in SERVE_MODES:
        raise ConfigError(f"mode {mode!r} is not one of {', '.join(SERVE_MODES)}")
    if not path.is_dir():
        raise ExportDirError(f"export directory not found: {path}; run `adalora-deploy export` first")
    if (path / MODEL_FILE).is_file():
        _check_mode(path, mode)
        return path
    sub = path / (mode or "merged")
    if (sub / MODEL_FILE).is_file():
        return sub
    present = [m for m in SERVE_MODES if (path / m / MODEL_FILE).is_file()]
    hint = f"it holds {', '.join(present)}: pass --mode {present[0]}" if present else "re-run the export"
    raise ExportDirError(f"{path} has no {MODEL_FILE} (nor {sub.name}/{MODEL_FILE}): {hint}")


def _check_mode(model_dir: Path, mode: str | None) -> None:
    # `serve DIR/merged --mode factored` must not silently serve the merged graph.
    manifest = read_manifest(model_dir) if mode is not None else None
    if manifest is not None and manifest.get("mode") not in (None, mode):
        sibling = model_dir.parent / mode
        raise ExportDirError(
            f"{model_dir} holds the {manifest.get('mode')} graph, not {mode}: serve {sibling} or drop --mode"
        )


def read_manifest(model_dir: str | os.PathLike) -> dict | None:
    """The export's adalora_manifest.json, or None for a directory exported by other tools."""
    path = Path(model_dir) / MANIFEST_FILE
    return read_json(path, "export manifest") if path.exists() else None


def is_quantized(model_dir: str | os.PathLike) -> bool:
    """Whether the export's manifest says its graph is int8 (`export --quantize`). ONNX Runtime's dynamic
    int8 ops are CPU kernels, so provider "auto" runs such a graph on the CPU."""
    return bool((read_manifest(model_dir) or {}).get("quantization"))


def choose_providers(config: SessionConfig) -> list:
    """The provider list for InferenceSession; raises when CUDA is asked for and cannot start."""
    return providers_for(config.provider, config.device_id, _cuda_options(config))


def _cuda_options(config: SessionConfig) -> dict:
    options = {}
    if not config.memory_arena:
        options["arena_extend_strategy"] = "kSameAsRequested"  # grow by exactly what is asked
    return options


def session_options(config: SessionConfig):
    """onnxruntime.SessionOptions from a SessionConfig."""
    import onnxruntime as ort

    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    so = ort.SessionOptions()
    so.graph_optimization_level = levels[config.graph_optimization]
    so.intra_op_num_threads = config.intra_op_threads
    so.inter_op_num_threads = config.inter_op_threads
    # Inter-op threads only matter when independent nodes may run at the same time.
    so.execution_mode = (
        ort.ExecutionMode.ORT_PARALLEL if config.inter_op_threads > 1 else ort.ExecutionMode.ORT_SEQUENTIAL
    )
    so.enable_cpu_mem_arena = config.memory_arena
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if config.spinning else "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "1" if config.spinning else "0")
    so.log_severity_level = 3
    if config.optimized_model_path:
        so.optimized_model_filepath = str(config.optimized_model_path)
    return so


class OrtSession:
    """An ONNX Runtime session plus what it really runs on. `run` is safe to call from several threads.

    Args:
        session: an onnxruntime.InferenceSession.
        config: the SessionConfig it was opened with.
        path: the model file.
    """

    def __init__(self, session, config: SessionConfig, path: Path):
        self.session = session
        self.config = config
        self.path = path
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]
        self._shrink = None  # RunOptions that shrink the CPU arena, made on first use

    @property
    def provider(self) -> str:
        """The provider that actually runs the graph (ONNX Runtime may have fallen back)."""
        return self.session.get_providers()[0]

    @property
    def on_cuda(self) -> bool:
        return self.provider == CUDA_EP

    def run(
        self, feeds: dict[str, np.ndarray], resident: dict | None = None, release_memory: bool = False
    ) -> dict[str, np.ndarray]:
        """Run the graph on host arrays; returns host arrays by output name.

        Feeds the graph does not take (e.g. token_type_ids for some models) are dropped. `resident` are
        inputs that stay loaded between calls (a multi graph's stacked adapters): OrtValues already on
        the device under CUDA, host arrays otherwise (see `to_device`). `release_memory` hands the memory
        this call grew back to the system afterwards (`_shrink_options`, `trim_heap`): for unusually
        large batches, which would otherwise keep the process at their peak.
        """
        feeds = {k: np.ascontiguousarray(v) for k, v in feeds.items() if k in self.input_names}
        resident = resident or {}
        missing = [n for n in self.input_names if n not in feeds and n not in resident]
        if missing:
            raise ValueError(f"missing inputs {missing} for {self.path}")
        if self.on_cuda:
            outputs = self._run_iobinding(feeds, resident)
        else:
            options = self._shrink_options() if release_memory and self.config.memory_arena else None
            outputs = self.session.run(self.output_names, {**feeds, **resident}, options)
        if release_memory:
            trim_heap()
        return dict(zip(self.output_names, outputs, strict=True))

    def _shrink_options(self):
        # ONNX Runtime's CPU arena keeps every region it grew for the largest batch so far; with this
        # run option it frees, after the run, the regions left wholly unused (all but its first chunk).
        if self._shrink is None:
            import onnxruntime as ort

            self._shrink = ort.RunOptions()
            self._shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        return self._shrink

    def to_device(self, array: np.ndarray):
        """What `run(resident=...)` takes for `array`: an OrtValue on the GPU under CUDA, else the array."""
        if not self.on_cuda:
            return array
        import onnxruntime as ort

        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), "cuda", self.config.device_id)

    def _run_iobinding(self, feeds: dict[str, np.ndarray], resident: dict) -> list[np.ndarray]:
        """Copy inputs to the GPU once, let ORT allocate outputs there, then copy them back; resident
        inputs are bound where they already are.

        A binding per call keeps concurrent callers apart (the session itself is thread-safe).
        """
        import onnxruntime as ort

        device = self.config.device_id
        binding = self.session.io_binding()
        on_device = {n: ort.OrtValue.ortvalue_from_numpy(a, "cuda", device) for n, a in feeds.items()}
        for name, value in {**on_device, **resident}.items():
            binding.bind_ortvalue_input(name, value)
        for name in self.output_names:
            binding.bind_output(name, "cuda", device)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    def dummy_feeds(self, shape: tuple[int, int] = WARMUP_SHAPE) -> dict[str, np.ndarray]:
        """Inputs of `shape` for every graph input (adalora_deploy.ort.dummy_inputs), for warm-up and benchmarks."""
        return dummy_inputs(self.session.get_inputs(), *shape)

    def warmup(self) -> None:
        """One dummy batch: CUDA initialises kernels, and both providers their arenas, on first use."""
        self.run(self.dummy_feeds())


@functools.cache
def _malloc_trim():
    libc = ctypes.util.find_library("c")
    return getattr(ctypes.CDLL(libc), "malloc_trim", None) if libc else None


def trim_heap() -> None:
    """Return the C heap's free pages to the system (glibc's malloc_trim; nothing elsewhere). Freed
    blocks of a large batch (tokenizer buffers, numpy arrays, the arena's regions when it is off)
    otherwise stay in the process's resident memory."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def open_session(model: str | os.PathLike, config: SessionConfig | None = None) -> OrtSession:
    """Open an ONNX Runtime session on a model file or an export (mode) directory.

    Args:
        model: a model.onnx file, or a directory containing one.
        config: provider and session options; defaults to SessionConfig().

    Returns:
        An OrtSession; `.provider` reports the provider that actually runs.
    """
    config = config or SessionConfig()
    path = Path(model)
    path = path / MODEL_FILE if path.is_dir() else path
    if not path.is_file():
        raise ExportDirError(f"ONNX model not found: {path}; run `adalora-deploy export` first")
    providers = [CPU_EP] if config.provider == "auto" and is_quantized(path.parent) else choose_providers(config)
    session = inference_session(path, providers, session_options(config))
    opened = OrtSession(session, config, path)
    if config.provider == "cuda" and not opened.on_cuda:
        raise ProviderUnavailableError(f"--provider cuda: ONNX Runtime fell back to {opened.provider}")
    if config.warmup:
        opened.warmup()
    # loading parses the whole protobuf, copies its initializers and frees the parse; glibc kept much of
    # it resident: a fresh MiniLM session measured 160 to 189 MiB between identical runs, 160 trimmed
    trim_heap()
    return opened
