"""`adalora-deploy train` and `inspect` through the real CLI (adalora_deploy.cli.main and the console
script): bad input gives one line, exit 2, no traceback and no checkpoint; inspect's table, JSON and plot."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from adalora_deploy.cli import main
from adalora_deploy.rank_report import arrange, layer_index, module_type, rank_grid, rank_report

from .test_data import write_csv
from .test_training import separable_rows, write_rows

BERT_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def good_csv(tmp_path_factory):
    return write_rows(tmp_path_factory.mktemp("cli-data") / "good.csv", separable_rows(60))


def bad_input_cases(tmp: Path, good: str) -> dict[str, tuple[dict, str]]:
    """name -> (train flags over the defaults, expected error fragment)."""
    no_columns = write_csv(tmp / "cols.csv", [("x", "1")], header=("sentence", "label"))
    float_labels = write_csv(tmp / "floats.csv", [("x", "0.5"), ("y", "1.5")])
    empty = write_csv(tmp / "empty.csv", [])
    return {
        "missing data path": ({"--data": tmp / "nope.csv"}, "data file not found"),
        "missing model path": ({"--model": "./no/such/model"}, "model path not found"),
        "unknown target module": ({"--target-modules": "qkv_fused"}, "target module(s) qkv_fused match no Linear/Conv1D layer"),
        "columns missing": ({"--data": no_columns}, "lacks column(s) text"),
        "labels not ints or names": ({"--data": float_labels}, "is not an integer class id or a class name"),
        "empty dataset": ({"--data": empty}, "has no rows"),
        "missing eval data": ({"--eval-data": tmp / "no-eval.jsonl"}, "data file not found"),
        "empty budgeting phase": ({"--tinit": 6, "--tfinal": 4}, "tinit + tfinal (6 + 4 = 10) must be < total_step (10)"),
        "target_r above init_r": ({"--init-r": 4, "--target-r": 8}, "target_r (8) must be between 0 and init_r (4)"),
    }


CASES = ["missing data path", "missing model path", "unknown target module", "columns missing",
         "labels not ints or names", "empty dataset", "missing eval data", "empty budgeting phase",
         "target_r above init_r"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_one_line_exit_2_no_checkpoint(case, tmp_path, tiny_bert_dir, good_csv, capsys):
    flags, message = bad_input_cases(tmp_path, good_csv)[case]
    out = tmp_path / "ckpt"
    flags = {"--model": tiny_bert_dir, "--data": good_csv, "--steps": 10, **flags, "--out": out}
    code, _, err = run_cli(capsys, "train", *(x for pair in flags.items() for x in pair))
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".ckpt.tmp-*"))


def test_non_empty_out_is_kept_without_overwrite(tmp_path, tiny_bert_dir, good_csv, capsys):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    code, _, err = run_cli(capsys, "train", "--model", tiny_bert_dir, "--data", good_csv, "--steps", 4, "--out", out)
    assert code == 2 and "exists and is not empty" in err and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_console_script_prints_no_traceback(tmp_path):
    script = Path(sys.executable).with_name("adalora-deploy")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([str(script), "train", "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: data file not found: {tmp_path / 'missing.jsonl'}; pass a "
                                                ".csv or .jsonl file, 'rotten-tomatoes' or hf:NAME[/CONFIG]"]
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_train_then_inspect_through_the_cli(tmp_path, tiny_bert_dir, good_csv, capsys):
    out = tmp_path / "ckpt"
    code, stdout, _ = run_cli(capsys, "train", "--model", tiny_bert_dir, "--data", good_csv, "--steps", 12,
                              "--batch-size", 8, "--init-r", 4, "--target-r", 2, "--tinit", 2, "--tfinal", 4,
                              "--delta-t", 2, "--out", out)
    assert code == 0 and "eval accuracy: " in stdout and f"checkpoint: {out}" in stdout
    meta = json.loads((out / "adalora_config.json").read_text())
    assert meta["train"]["steps"] == 12 and meta["adalora"]["tinit"] == 2 and meta["adalora"]["delta_t"] == 2
    code, stdout, _ = run_cli(capsys, "inspect", out, "--json")
    report = json.loads(stdout)
    assert report["budget"] == 2 * len(report["modules"]) == sum(report["modules"].values())
    assert report["modules"] == meta["ranks"]


# -- inspect ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "targets", "layer", "kind"),
    [
        ("bert.encoder.layer.3.attention.output.dense", BERT_TARGETS, 3, "attn-out"),
        ("bert.encoder.layer.3.output.dense", BERT_TARGETS, 3, "ffn-out"),
        ("bert.encoder.layer.11.intermediate.dense", BERT_TARGETS, 11, "ffn-in"),
        ("bert.encoder.layer.0.attention.self.query", BERT_TARGETS, 0, "query"),
        ("transformer.h.2.attn.c_attn", ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"], 2, "qkv"),
        ("transformer.h.2.mlp.c_proj", ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"], 2, "ffn-out"),
        ("model.layers.7.self_attn.o_proj", ["q_proj", "o_proj"], 7, "attn-out"),
        ("pre_classifier", ["pre_classifier"], None, "pre_classifier"),
    ],
)
def test_layer_and_type_from_module_paths(path, targets, layer, kind):
    assert layer_index(path) == layer
    assert module_type(path, targets) == kind


def test_inspect_json_equals_the_checkpoint_masks(tiny_checkpoint, capsys):
    code, stdout, _ = run_cli(capsys, "inspect", tiny_checkpoint, "--json")
    assert code == 0
    got = json.loads(stdout)
    assert list(got) == ["modules", "budget", "init_r", "target_r", "trainable_params"]
    # conftest: adapters 0, 1, 2 (layer 0 query, key, value) at ranks 0, 1, 3; the other nine at init_r 4.
    ranks = list(got["modules"].values())
    assert ranks == [0, 1, 3] + [4] * 9
    assert got["budget"] == 40 and (got["init_r"], got["target_r"]) == (4, 2)
    hidden, inner, r = 32, 64, 4  # tiny_bert_config
    per_layer = 4 * r * (hidden + hidden + 1) + 2 * r * (hidden + inner + 1)
    assert got["trainable_params"] == 2 * per_layer + (hidden * 2 + 2)  # + classifier weight and bias


def test_inspect_table_rows_are_layers(tiny_checkpoint, capsys):
    code, stdout, _ = run_cli(capsys, "inspect", tiny_checkpoint)
    assert code == 0
    lines = stdout.splitlines()
    header = lines.index(next(line for line in lines if line.split()[:1] == ["layer"]))
    assert lines[header].split() == ["layer", "query", "key", "value", "attn-out", "ffn-in", "ffn-out", "total"]
    assert lines[header + 1].split() == ["0", "0", "1", "3", "4", "4", "4", "16"]
    assert lines[header + 2].split() == ["1", "4", "4", "4", "4", "4", "4", "24"]
    assert lines[header + 3].split() == ["total", "4", "5", "7", "8", "8", "8", "40"]
    assert "budget: 40 triplets kept of 48" in stdout and "trainable params: 3,698" in stdout


def test_inspect_plot_draws_the_grid(tiny_checkpoint, tmp_path, capsys):
    report = rank_report(tiny_checkpoint)
    grid = rank_grid(report)  # (types, layers)
    assert grid.shape == (6, 2)
    np.testing.assert_array_equal(grid[:, 0], [0, 1, 3, 4, 4, 4])
    np.testing.assert_array_equal(grid[:, 1], [4] * 6)

    png = tmp_path / "ranks.png"
    code, _, _ = run_cli(capsys, "inspect", tiny_checkpoint, "--plot", png)
    assert code == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    before = png.stat().st_mtime_ns
    code, _, err = run_cli(capsys, "inspect", tiny_checkpoint, "--plot", png)
    assert code == 2 and "exists" in err and png.stat().st_mtime_ns == before
    assert run_cli(capsys, "inspect", tiny_checkpoint, "--plot", png, "--overwrite")[0] == 0


def test_arrange_leaves_missing_cells_empty():
    ranks = {"encoder.layer.0.query": 2, "encoder.layer.1.value": 1}
    layers, types, cells = arrange(ranks, ["query", "value"])
    assert (layers, types) == (["0", "1"], ["query", "value"])
    assert cells == {("0", "query"): 2, ("1", "value"): 1}


def test_inspect_missing_checkpoint(tmp_path, capsys):
    code, _, err = run_cli(capsys, "inspect", tmp_path / "none")
    assert code == 2 and err.startswith("error: checkpoint directory not found") and err.count("\n") == 1


def test_train_flags_mirror_train_config():
    """Every TrainConfig field is a flag of `train`, with the same default."""
    import argparse
    import dataclasses

    from adalora_deploy.commands import train as train_command
    from adalora_deploy.training import TrainConfig

    parser = train_command.add_parser(argparse.ArgumentParser().add_subparsers())
    defaults = vars(parser.parse_args(["--out", "x"]))
    for f in dataclasses.fields(TrainConfig):
        assert f.name in defaults, f.name
        if f.name != "out":
            assert defaults[f.name] == f.default, f.name


def test_train_on_sentence_pairs(tmp_path, tiny_bert_dir, capsys):
    rows = [{"text": text, "text_pair": "how was it ?", "label": label} for text, label in separable_rows(40)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "ckpt"
    code, stdout, _ = run_cli(capsys, "train", "--model", tiny_bert_dir, "--data", data, "--steps", 4,
                              "--batch-size", 4, "--init-r", 2, "--target-r", 1, "--out", out)
    assert code == 0 and "on 4 examples" in stdout
    meta = json.loads((out / "adalora_config.json").read_text())
    assert meta["id2label"] == {"0": "negative", "1": "positive"} and meta["budget"] == len(meta["ranks"])
