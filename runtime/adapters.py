"""Adapter packs loaded into a multi graph: reading and checking a pack, stacking the loaded packs into the
graph's inputs, and swapping the stacked state atomically while predictions run (docs/adapter_pack.md).

Torch-free: packs are read with numpy alone.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from adalora_deploy.constants import (
    ADAPTER_MANIFEST_FILE,
    ADAPTER_PACK_FILE,
    ADAPTER_PACK_FORMAT,
    DOWN_SUFFIX,
    HEAD_BIAS_INPUT,
    HEAD_WEIGHT_INPUT,
    UP_SUFFIX,
)
from adalora_deploy.errors import CheckpointError, ConfigError
from adalora_deploy.io import read_json

from .session import trim_heap


class AdapterPackError(CheckpointError):
    """An adapter pack is missing, corrupt, or made for another base model."""


class UnknownAdapterError(ConfigError):
    """A request names an adapter that is not loaded."""


@dataclass(frozen=True)
class AdapterPack:
    """One pack as the multi graph takes it.

    Attributes:
        name: the name it is served under.
        path: the pack directory.
        manifest: adapter_manifest.json.
        factors: module -> (down (d_in, r), up (r, d_out)) for modules at rank >= 1.
        head_weight: (num_labels, hidden); head_bias: (num_labels,).
    """

    name: str
    path: Path
    manifest: dict
    factors: dict[str, tuple[np.ndarray, np.ndarray]]
    head_weight: np.ndarray
    head_bias: np.ndarray

    @property
    def num_labels(self) -> int:
        return int(self.head_weight.shape[0])

    @property
    def id2label(self) -> dict[int, str]:
        labels = {int(k): v for k, v in (self.manifest.get("id2label") or {}).items()}
        return {i: labels.get(i, str(i)) for i in range(self.num_labels)}

    def describe(self) -> dict:
        ranks = self.manifest.get("ranks", {})
        return {"name": self.name, "path": str(self.path), "task": self.manifest.get("task"),
                "num_labels": self.num_labels, "id2label": {str(k): v for k, v in self.id2label.items()},
                "ranks": ranks, "total_rank": sum(ranks.values()), "source": self.manifest.get("source", {}).get("path")}


# safetensors dtype names -> numpy; a pack is fp32, the others are accepted and cast.
SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "BF16": None}


def _read_tensors(path: Path) -> dict[str, np.ndarray]:
    """A safetensors file read with numpy alone (8-byte header length, JSON header, raw little-endian
    data), so that the serving path needs no safetensors or torch; anything inconsistent is refused."""
    if not path.is_file():
        raise AdapterPackError(f"{path} not found: pass a directory written by `export --mode adapter`")
    data = path.read_bytes()
    try:
        size = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + size]) if 8 + size <= len(data) else None
        if not isinstance(header, dict):
            raise ValueError("header missing or cut off")
        body, tensors = memoryview(data)[8 + size:], {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = SAFETENSORS_DTYPES.get(info["dtype"])
            start, end = info["data_offsets"]
            if dtype is None or not 0 <= start <= end <= len(body):
                raise ValueError(f"tensor {name}: dtype {info['dtype']} or offsets {start}..{end} not readable")
            array = np.frombuffer(body[start:end], dtype=np.dtype(dtype).newbyteorder("<"))
            tensors[name] = array.reshape(info["shape"])
        return tensors
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise AdapterPackError(f"{path} is corrupt or truncated ({str(err)[:120]}): re-export the pack") from err


def _check_manifest(manifest: dict, path: Path, graph: dict) -> None:
    if manifest.get("format") != ADAPTER_PACK_FORMAT:
        raise AdapterPackError(f"{path} is not an adapter pack (format {manifest.get('format')!r}); "
                               "write one with `export SRC --prune-ranks --mode adapter`")
    want, got = graph["base"]["sha256"], (manifest.get("base") or {}).get("sha256")
    if got != want:
        raise AdapterPackError(
            f"{path} was made for another base model (identity {str(got)[:12]}..., served base {want[:12]}...): "
            f"export the adapter from a checkpoint of {graph['base'].get('name_or_path') or 'the served base'}"
        )
    if manifest.get("task") != graph.get("task"):
        raise AdapterPackError(f"{path} is a {manifest.get('task')} adapter; this graph serves {graph.get('task')}")


def _factors(tensors: dict[str, np.ndarray], manifest: dict, graph: dict, path: Path) -> dict:
    modules = graph["modules"]
    factors = {}
    for module, rank in (manifest.get("ranks") or {}).items():
        if module not in modules:
            raise AdapterPackError(f"{path}: module {module} is not a Linear layer of the served base graph")
        if rank == 0:
            continue
        shape = modules[module]
        down, up = tensors.get(module + DOWN_SUFFIX), tensors.get(module + UP_SUFFIX)
        if down is None or up is None:
            raise AdapterPackError(f"{path}: {module} lacks its factors: re-export the pack")
        if down.shape != (shape["d_in"], rank) or up.shape != (rank, shape["d_out"]):
            raise AdapterPackError(
                f"{path}: {module} factors {down.shape}, {up.shape} do not match rank {rank} and the base's "
                f"({shape['d_in']}, {shape['d_out']}): re-export the pack"
            )
        factors[module] = (down.astype(np.float32), up.astype(np.float32))
    return factors


def read_pack(name: str, path: str | os.PathLike, graph: dict) -> AdapterPack:
    """Read and check a pack against the multi graph's manifest.

    Args:
        name: the name to serve it under.
        path: the pack directory (adapter_manifest.json + adapter_pack.safetensors).
        graph: the multi graph's adalora_manifest.json.

    Raises:
        AdapterPackError: missing or corrupt files, another base model, shapes that do not fit.
    """
    path = Path(path)
    if not path.is_dir():
        raise AdapterPackError(f"adapter pack directory not found: {path}")
    try:
        manifest = read_json(path / ADAPTER_MANIFEST_FILE, "adapter manifest")
    except CheckpointError as err:
        raise AdapterPackError(str(err)) from err
    _check_manifest(manifest, path, graph)
    tensors = _read_tensors(path / ADAPTER_PACK_FILE)
    head = manifest.get("head") or {}
    weight, bias = tensors.get(f"{head.get('module')}.weight"), tensors.get(f"{head.get('module')}.bias")
    hidden = graph["head"]["hidden"]
    if weight is None or bias is None or weight.ndim != 2 or weight.shape[1] != hidden or bias.shape != weight.shape[:1]:
        raise AdapterPackError(f"{path}: the task head is missing or not (num_labels, {hidden}): re-export the pack")
    return AdapterPack(name, path, manifest, _factors(tensors, manifest, graph, path),
                       weight.astype(np.float32), bias.astype(np.float32))


@dataclass(frozen=True)
class AdapterState:
    """The loaded packs, stacked into the graph's inputs. Never mutated: a load or an unload builds a new
    one, so a batch that took a state keeps a consistent view while the registry moves on."""

    packs: tuple[AdapterPack, ...]
    feeds: dict  # graph input name -> (N, ...) host array, or a device OrtValue on CUDA

    def index(self, names: list[str]) -> np.ndarray:
        """Row indices into the stacks for one adapter name per row."""
        positions = {p.name: i for i, p in enumerate(self.packs)}
        unknown = sorted({n for n in names if n not in positions})
        if unknown:
            loaded = ", ".join(positions) or "none"
            raise UnknownAdapterError(f"adapter {unknown[0]!r} is not loaded (loaded: {loaded})")
        return np.array([positions[n] for n in names], dtype=np.int64)

    def pack(self, name: str) -> AdapterPack:
        return self.packs[int(self.index([name])[0])]


def stack(packs: tuple[AdapterPack, ...], graph: dict) -> dict[str, np.ndarray]:
    """The graph's adapter inputs for `packs`: each module padded to its own largest loaded rank (0 when no
    pack touches it), heads padded to the largest num_labels."""
    n = len(packs)
    labels = max(p.num_labels for p in packs)
    hidden = graph["head"]["hidden"]
    feeds = {HEAD_WEIGHT_INPUT: np.zeros((n, labels, hidden), np.float32), HEAD_BIAS_INPUT: np.zeros((n, labels), np.float32)}
    for i, p in enumerate(packs):
        feeds[HEAD_WEIGHT_INPUT][i, : p.num_labels] = p.head_weight
        feeds[HEAD_BIAS_INPUT][i, : p.num_labels] = p.head_bias
    for module, shape in graph["modules"].items():
        rank = max((p.factors[module][0].shape[1] for p in packs if module in p.factors), default=0)
        down = np.zeros((n, shape["d_in"], rank), np.float32)  # (N, d_in, r_m)
        up = np.zeros((n, rank, shape["d_out"]), np.float32)  # (N, r_m, d_out)
        for i, p in enumerate(packs):
            if module in p.factors:
                d, u = p.factors[module]
                down[i, :, : d.shape[1]], up[i, : u.shape[0]] = d, u
        feeds[module + DOWN_SUFFIX], feeds[module + UP_SUFFIX] = down, up
    return feeds


def stacked_views(pack: AdapterPack, i: int, feeds: dict[str, np.ndarray]) -> dict:
    """`pack`'s factors as views of row `i` of the stacks (each cut to the pack's own rank)."""
    views = {}
    for module, (down, _) in pack.factors.items():
        r = down.shape[1]
        views[module] = (feeds[module + DOWN_SUFFIX][i, :, :r], feeds[module + UP_SUFFIX][i, :r])  # (d_in, r), (r, d_out)
    return views


class AdapterRegistry:
    """The packs a multi graph serves; `load` and `unload` are thread-safe while predictions run.

    Args:
        graph: the multi graph's adalora_manifest.json.
        to_device: turns a host array into what the session binds (an OrtValue on CUDA), or None to keep
            host arrays.
    """

    def __init__(self, graph: dict, to_device=None):
        self.graph = graph
        self._to_device = to_device
        self._lock = threading.Lock()  # serialises writers; readers only read self._state
        self._state = AdapterState((), {})

    @property
    def state(self) -> AdapterState:
        return self._state

    def load(self, name: str, path: str | os.PathLike) -> AdapterPack:
        """Load (or replace) `name` from the pack at `path`; the served state changes in one assignment."""
        if not isinstance(name, str) or not name or "/" in name:
            raise ConfigError(f"adapter name {name!r} must be a non-empty string without '/'")
        pack = read_pack(name, path, self.graph)  # all checks before anything changes
        with self._lock:
            self._state = self._build(tuple(p for p in self._state.packs if p.name != name) + (pack,))
        trim_heap()  # the previous stacks (once no batch holds them) and the pack file's bytes
        return pack

    def unload(self, name: str) -> None:
        with self._lock:
            self._state.index([name])  # UnknownAdapterError when absent
            self._state = self._build(tuple(p for p in self._state.packs if p.name != name))
        trim_heap()

    def _build(self, packs: tuple[AdapterPack, ...]) -> AdapterState:
        if not packs:
            return AdapterState((), {})
        feeds = stack(packs, self.graph)
        if self._to_device is not None:
            feeds = {k: self._to_device(v) for k, v in feeds.items()}
        else:  # on the host the stacks are what the graph reads: the packs keep views into them, not copies
            packs = tuple(replace(p, factors=stacked_views(p, i, feeds)) for i, p in enumerate(packs))
        return AdapterState(packs, feeds)

    def describe(self) -> list[dict]:
        return [p.describe() for p in self._state.packs]

