"""A command that needs an extra the install lacks says, in one line and before any work, which
extra to install. The base install's real run (no torch at all) is in .ci/run."""

from __future__ import annotations

import importlib.util

import pytest

from adalora_deploy.cli import main

HIDDEN = ("torch", "transformers", "safetensors", "optimum", "onnx", "matplotlib")


@pytest.fixture
def base_install(monkeypatch):
    """find_spec as the base install would answer it: none of the extras' packages is there."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in HIDDEN else real(name, *a))


@pytest.mark.parametrize("argv, extra", [
    (["train", "--out", "{out}", "--steps", "2"], "train"),
    (["inspect", "{ckpt}"], "train"),
    (["export", "{ckpt}", "--out", "{out}"], "export"),
    (["demo", "--out", "{out}", "--fast"], "all"),
    (["bench", "{ckpt}", "--json", "{out}.json"], "export"),
])
def test_missing_extra_is_named_in_one_line(base_install, tmp_path, capsys, tiny_checkpoint, argv, extra):
    out = tmp_path / "out"
    argv = [a.format(out=out, ckpt=tiny_checkpoint) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert err.endswith(f"pip install 'adalora-deploy[{extra}]'")
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_bench_plot_without_matplotlib_names_the_extra(base_install, tmp_path, capsys, tiny_export_root):
    assert main(["bench", str(tiny_export_root), "--plot", str(tmp_path / "p.png"), "--runs", "1"]) == 2
    assert capsys.readouterr().err.strip().endswith("pip install 'adalora-deploy[all]'")
    assert list(tmp_path.iterdir()) == []
