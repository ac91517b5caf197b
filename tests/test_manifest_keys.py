"""Every adalora_manifest.json key the code reads is a key the exporter writes (bench once read
`prune_ranks` and `source_checkpoint`, which no export ever had)."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# manifest.get("k"), manifest["k"], (read_manifest(d) or {}).get("k")
READ = re.compile(r'(?:manifest\w*|read_manifest\((?:[^()]|\([^()]*\))*\) or \{\}\))(?:\.get\(|\[)"(\w+)"')
SOURCES = ["adalora_deploy/demo.py", "adalora_deploy/bench", "runtime"]


def keys_read() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for where in SOURCES:
        path = ROOT / where
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            for key in READ.findall(file.read_text()):
                found.setdefault(key, []).append(str(file.relative_to(ROOT)))
    return found


def test_the_scan_finds_what_bench_reads():
    read = keys_read()
    assert {"mode", "pruned", "quantization", "source", "task", "opset"} <= set(read), sorted(read)


def test_keys_read_are_keys_written(tiny_export_root, tiny_checkpoint, tiny_bert_dir, tmp_path):
    from adalora_deploy.exporters import export

    written = set()
    for mode in ("merged", "factored"):
        written |= set(json.loads((tiny_export_root / mode / "adalora_manifest.json").read_text()))
    # adapter packs and multi graphs (docs/adapter_pack.md) have manifests of their own
    pack = export(tiny_checkpoint, tmp_path / "pack", mode="adapter", prune_ranks=True)
    multi = export(tiny_bert_dir, tmp_path / "multi", mode="multi", validate=False)
    written |= set(json.loads((pack / "adapter_manifest.json").read_text()))
    written |= set(json.loads((multi / "multi" / "adalora_manifest.json").read_text()))
    unknown = {k: v for k, v in keys_read().items() if k not in written}
    assert unknown == {}, f"read but never written: {unknown}"
    manifest = json.loads((tiny_export_root / "merged" / "adalora_manifest.json").read_text())
    assert isinstance(manifest["source"], dict) and "path" in manifest["source"]  # what source_checkpoint reads
