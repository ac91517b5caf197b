"""File names and format ids are spelled once, in adalora_deploy/constants.py: no module of the package
(adalora_deploy/, exporters/, runtime/) writes one as a string literal. Tests keep literals on purpose:
they check the public strings themselves."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from adalora_deploy import constants

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ("adalora_deploy", "exporters", "runtime")
# Constants whose value is an id or a file name, never an ordinary word. Left out: the mode names
# ("merged", "adapter", "multi", ...), tensor suffixes and graph input names, which are also variant
# names, JSON keys and English words elsewhere.
SPELLED_ONCE = tuple(
    name for name in dir(constants)
    if name.endswith(("_FILE", "_FILES", "_FORMAT", "_KIND", "_PREFIX")) or name == "TASK_IDS"
)
# Keyword arguments that name other tools' ids, which may be spelled like ours (Optimum's and
# transformers' pipeline task names in exporters/specs.py).
FOREIGN_IDS = {"optimum_task", "pipeline_task"}


def spelled_once() -> dict[str, str]:
    """{value: constant name} for every id and file name in constants.py (a tuple's members under the
    tuple's name, unless a constant of their own names them)."""
    values = {}
    for name in SPELLED_ONCE:
        value = getattr(constants, name)
        for v in value if isinstance(value, tuple) else (value,):
            values.setdefault(v, name)
    scalars = {getattr(constants, n): n for n in dir(constants) if isinstance(getattr(constants, n), str)}
    return {v: scalars.get(v, name) for v, name in values.items()}


def literals(path: Path, values: dict[str, str]) -> list[str]:
    """`path:line: 'value' (NAME)` for each string literal equal to a value, docstrings and FOREIGN_IDS aside."""
    tree = ast.parse(path.read_text(), str(path))
    skip = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            skip.add(id(body[0].value))  # a docstring
        if isinstance(node, ast.keyword) and node.arg in FOREIGN_IDS:
            skip.add(id(node.value))
    return [f"{path.relative_to(ROOT)}:{n.lineno}: {n.value!r} ({values[n.value]})" for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in values and id(n) not in skip]


def test_the_checked_ids_are_the_public_strings():
    values = spelled_once()
    assert {"sequence-classification", "feature-extraction", "token-classification", "question-answering",
            "causal-lm"} <= set(values)
    assert {"adapter.safetensors", "adalora_config.json", "model.onnx", "adalora_manifest.json",
            "adalora-deploy-checkpoint", "adalora-deploy-export", "past_key_values."} <= set(values)


def test_no_id_or_file_name_is_spelled_outside_constants():
    values = spelled_once()
    sources = [p for d in PACKAGE for p in sorted((ROOT / d).rglob("*.py")) if p.name != "constants.py"]
    assert len(sources) > 50
    found = [hit for p in sources for hit in literals(p, values)]
    assert found == [], "use the constants of adalora_deploy/constants.py:\n" + "\n".join(found)


def test_the_scan_finds_literals(tmp_path, monkeypatch):
    """The scanner itself: a task id and a file name are found, a docstring and Optimum's task name are not."""
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    module = tmp_path / "m.py"
    module.write_text('"""Reads model.onnx."""\n'
                      'spec = Spec("x", optimum_task="feature-extraction")\n'
                      'if task == "causal-lm":\n    path = root / "adalora_manifest.json"\n')
    assert sorted(literals(module, spelled_once())) == ["m.py:3: 'causal-lm' (CAUSAL_LM)",
                                                "m.py:4: 'adalora_manifest.json' (MANIFEST_FILE)"]


def test_every_task_table_covers_the_task_ids():
    """TASK_IDS is the one list of tasks: each per-task table of the package has exactly those keys."""
    from adalora_deploy.config import DEFAULT_MODULES_TO_SAVE
    from adalora_deploy.exporters.options import EXPORT_TASKS
    from adalora_deploy.exporters.specs import TASKS
    from adalora_deploy.model import TASK_AUTO_CLASSES

    for table in (TASKS, TASK_AUTO_CLASSES, DEFAULT_MODULES_TO_SAVE, EXPORT_TASKS):
        assert sorted(table) == sorted(constants.TASK_IDS)
