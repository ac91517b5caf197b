"""`adalora-deploy demo` end to end on a tiny model and 80 Rotten Tomatoes rows: every figure of the
summary must be the one its artifact holds, recomputed here from the raw files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from adalora_deploy.cli import main
from adalora_deploy.demo import SUMMARY_FILE, demo, staged_output_dir
from adalora_deploy.errors import OutputExistsError


@pytest.fixture(scope="module")
def small_csv(tmp_path_factory) -> Path:
    """80 rows of the builtin set, labels as names (fresh/rotten); held-out split: 8 rows."""
    from adalora_deploy.data import load_rotten_tomatoes

    data = load_rotten_tomatoes()
    path = tmp_path_factory.mktemp("data") / "small.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(0, 8000, 100):
            writer.writerow([data.texts[i], data.id2label[data.labels[i]]])
    return path


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, tiny_bert_dir, small_csv):
    out = tmp_path_factory.mktemp("demo") / "out"
    summary = demo(out=str(out), model=str(tiny_bert_dir), data=str(small_csv), fast=True, init_r=4, target_r=2,
                   progress=False)
    return out, summary


def _module_dims(state: dict) -> dict[str, tuple[int, int, int]]:
    """module -> (d_out, d_in, kept rank), straight from the checkpoint tensors."""
    names = [k[: -len(".mask")] for k in state if k.endswith(".mask")]
    return {n: (state[f"{n}.P"].shape[0], state[f"{n}.Q"].shape[1], int(state[f"{n}.mask"].sum())) for n in names}


@pytest.mark.slow
def test_demo_writes_everything_under_out(demo_run):
    out, summary = demo_run
    for rel in ("checkpoint/adapter.safetensors", "onnx/merged/model.onnx", "onnx/factored/model.onnx",
                "onnx-int8/merged/model.onnx", "bench.json", "bench.md", "latency.png", "ranks.png", SUMMARY_FILE):
        assert (out / rel).is_file(), rel
    assert summary["out"] == str(out.absolute())
    assert json.loads((out / SUMMARY_FILE).read_text()) == summary
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".out.")]  # no leftovers beside it


@pytest.mark.slow
def test_budget_and_params_come_from_the_artifacts(demo_run):
    from safetensors.torch import load_file

    out, summary = demo_run
    dims = _module_dims(load_file(str(out / "checkpoint" / "adapter.safetensors")))
    manifest = json.loads((out / "onnx" / "merged" / "adalora_manifest.json").read_text())
    assert summary["budget"] == sum(r for _, _, r in dims.values())
    assert summary["budget"] == summary["budget_target"] == 2 * len(dims)  # the final mask keeps exactly bT
    after = sum(r * (d_out + d_in + 1) for d_out, d_in, r in dims.values())
    before = sum(4 * (d_out + d_in + 1) for d_out, d_in, _ in dims.values())
    assert summary["adapter_params_after"] == manifest["adapter_params_after"] == after
    assert summary["adapter_params_before"] == manifest["adapter_params_before"] == before


@pytest.mark.slow
def test_accuracy_matches_the_checkpoint_and_the_onnx_graphs(demo_run, small_csv):
    from transformers import AutoTokenizer

    from adalora_deploy.data import encode, load_splits
    from adalora_deploy.model import AdaLoraModel
    from adalora_deploy.runtime import Predictor
    from adalora_deploy.training import evaluate

    out, summary = demo_run
    heldout = load_splits(str(small_csv))[1]
    model = AdaLoraModel.from_pretrained(out / "checkpoint")
    with torch.no_grad():
        accuracy = evaluate(model, encode(heldout, AutoTokenizer.from_pretrained(out / "checkpoint"), 64))
    acc = summary["accuracy"]
    assert acc["pytorch"] == pytest.approx(accuracy, abs=0)
    # The exported graphs agree with PyTorch to 1e-4 in the logits, so their labels are the same.
    assert acc["onnx_merged"] == acc["onnx_factored"] == acc["pytorch"]
    # int8: the export's own evaluation, on the same held-out rows, fp32 scoring as the Predictor's
    figures = json.loads((out / "onnx-int8" / "merged" / "adalora_manifest.json").read_text())["quantization"]
    evaluation = figures["evaluation"]
    assert (evaluation["examples"], evaluation["fp32_accuracy"]) == (len(heldout), acc["onnx_merged"])
    int8_ids = Predictor.from_pretrained(out / "onnx-int8", max_length=64).predict(heldout.texts).label_ids
    assert evaluation["int8_accuracy"] == sum(int(p) == y for p, y in zip(int8_ids, heldout.labels, strict=True)) / len(heldout)
    assert summary["int8"] == {**{k: evaluation[k] for k in ("examples", "fp32_accuracy", "int8_accuracy",
                                                               "accuracy_drop_points", "agreement")},
                               "size_ratio": figures["size_ratio"]}
    majority = max(heldout.labels.count(c) for c in set(heldout.labels)) / len(heldout)
    assert summary["majority_class_accuracy"] == majority and summary["heldout_examples"] == len(heldout)


@pytest.mark.slow
def test_latency_comes_from_the_bench_results(demo_run):
    out, summary = demo_run
    bench = json.loads((out / "bench.json").read_text())
    [cell] = bench["cells"]
    [row] = summary["latency_p50_ms"]
    assert (row["batch_size"], row["seq_len"]) == (cell["batch_size"], cell["seq_len"]) == (1, 16)
    for key, variant in (("merged", "merged"), ("merged_int8", "merged_int8"), ("factored", "factored_pruned"),
                         ("pytorch", "pytorch")):
        assert row[key] == cell["results"][variant]["p50_ms"] > 0
    assert summary["bench_providers"]["merged_int8"] == "CPUExecutionProvider"


def test_refuses_a_non_empty_out_without_touching_it(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["demo", "--out", str(out), "--fast"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_staged_output_dir_restores_the_old_directory_on_failure(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), staged_output_dir(out, overwrite=True) as root:
        assert not (root / "old.txt").exists()
        (root / "partial.txt").write_text("half")
        raise RuntimeError("stage failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    with staged_output_dir(out, overwrite=True) as root:
        (root / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    with pytest.raises(OutputExistsError):
        with staged_output_dir(out):
            pass


@pytest.mark.slow
def test_a_killed_demo_puts_the_old_output_back(tmp_path, tiny_bert_dir, small_csv):
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    cmd = [sys.executable, "-m", "adalora_deploy", "demo", "--out", str(out), "--overwrite", "--fast",
           "--model", str(tiny_bert_dir), "--data", str(small_csv)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    deadline = time.monotonic() + 120
    while (out / "old.txt").exists() and time.monotonic() < deadline:  # moved aside once the demo starts
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in out.iterdir()] == ["old.txt"]
