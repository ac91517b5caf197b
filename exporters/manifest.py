"""adalora_manifest.json: what an export directory holds, written beside model.onnx (docs/formats.md)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from adalora_deploy import __version__
from adalora_deploy.constants import MANIFEST_FORMAT
from adalora_deploy.io import file_sha256

VERSIONED_PACKAGES = (
    "adalora-deploy", "torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime-gpu", "onnxruntime",
    "peft", "safetensors",
)


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that shape the graph (absent ones left out)."""
    versions = {}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def source_hash(files: list[Path]) -> dict:
    """sha256 of each source file (adapter weights, config), and one digest over all of them."""
    per_file = {f.name: file_sha256(f) for f in files}
    combined = hashlib.sha256("".join(f"{name}:{h}\n" for name, h in sorted(per_file.items())).encode())
    return {"sha256": combined.hexdigest(), "files": per_file}


@dataclass(frozen=True)
class ModuleFigures:
    """One adapted module as exported."""

    d_out: int
    d_in: int
    rank_before: int  # stored triplets (init_r)
    rank_effective: int  # kept triplets (mask True)
    rank_after: int  # triplets in the exported adapter: effective rank if pruned, else init_r
    rank_in_graph: int | None  # inner dimension of its branch in the graph (factored); None if folded/absent

    def params(self, rank: int) -> int:
        return rank * (self.d_out + self.d_in + 1)  # P column + Q row + lam, per triplet


def module_table(modules: dict[str, ModuleFigures]) -> dict:
    """Per-module ranks and the adapter parameter totals before and after pruning."""
    table = {name: vars(m) for name, m in modules.items()}
    return {
        "modules": table,
        "ranks_before": {name: m.rank_before for name, m in modules.items()},
        "ranks_after": {name: m.rank_after for name, m in modules.items()},
        "adapter_params_before": sum(m.params(m.rank_before) for m in modules.values()),
        "adapter_params_after": sum(m.params(m.rank_after) for m in modules.values()),
        "adapter_params_effective": sum(m.params(m.rank_effective) for m in modules.values()),
    }


def manifest_header(mode: str, task: str, dtype: str, opset: int, optimized: bool, pruned: bool) -> dict:
    return {
        "format": MANIFEST_FORMAT,
        "package_version": __version__,
        "mode": mode,
        "task": task,
        "dtype": dtype,
        "opset": opset,
        "optimized": optimized,
        "pruned": pruned,
    }
