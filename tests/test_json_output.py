"""`--json [PATH]` means the same in every command: bare (or `-`), the JSON document alone on stdout;
with PATH, the same document written to the file, refused when it exists unless --overwrite."""

from __future__ import annotations

import json

import pytest

from adalora_deploy.cli import main
from adalora_deploy.rank_report import rank_report


@pytest.mark.parametrize("form", [["--json"], ["--json", "-"]])
def test_inspect_json_to_stdout_alone(tiny_checkpoint, tmp_path, capsys, form):
    plot = tmp_path / "ranks.png"
    assert main(["inspect", str(tiny_checkpoint), *form, "--plot", str(plot)]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == rank_report(tiny_checkpoint).to_json()  # the whole of stdout parses
    assert err.strip() == f"plot: {plot}"
    assert not (tmp_path / "-").exists()


def test_inspect_json_to_a_file(tiny_checkpoint, tmp_path, capsys):
    target = tmp_path / "ranks.json"
    assert main(["inspect", str(tiny_checkpoint), "--json", str(target)]) == 0
    out = capsys.readouterr().out
    assert json.loads(target.read_text()) == rank_report(tiny_checkpoint).to_json()
    assert out.startswith(f"ranks of {tiny_checkpoint}") and out.rstrip().endswith(f"json: {target}")

    target.write_text("user data")
    assert main(["inspect", str(tiny_checkpoint), "--json", str(target)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and err.endswith("already exists: choose another path or pass --overwrite")
    assert target.read_text() == "user data"
    assert main(["inspect", str(tiny_checkpoint), "--json", str(target), "--overwrite"]) == 0
    assert json.loads(target.read_text())["budget"] == rank_report(tiny_checkpoint).budget
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ranks.json"]  # no temporary file left


def test_inspect_json_before_the_checkpoint_keeps_its_old_meaning(tiny_checkpoint, tmp_path, capsys):
    """When --json was a switch, `inspect --json CKPT` printed JSON: a directory is never a JSON file."""
    assert main(["inspect", "--json", str(tiny_checkpoint)]) == 0
    assert json.loads(capsys.readouterr().out)["modules"] == rank_report(tiny_checkpoint).ranks
    assert main(["inspect", "--json", str(tmp_path / "r.json")]) == 2
    assert capsys.readouterr().err.startswith("error: no checkpoint given")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_bench_json_to_stdout_alone_and_to_a_file(tiny_export_root, tmp_path, capfd):
    grid = ["--batch-sizes", "1", "--seq-lens", "8", "--runs", "2", "--warmup", "1", "--threads", "1",
            "--provider", "cpu"]
    assert main(["bench", str(tiny_export_root), *grid, "--json"]) == 0
    out, err = capfd.readouterr()  # file-descriptor level: libraries' output counts too
    printed = json.loads(out)
    assert "merged" in err and "p50" in err  # the console summary went to stderr

    target = tmp_path / "bench.json"
    assert main(["bench", str(tiny_export_root), *grid, "--json", str(target)]) == 0
    out, _ = capfd.readouterr()
    written = json.loads(target.read_text())
    assert "merged" in out and "p50" in out  # the summary stays on stdout when the JSON goes to a file
    assert printed.keys() == written.keys() and printed["variants"] == written["variants"]
    assert [(c["batch_size"], c["seq_len"]) for c in printed["cells"]] == [(1, 8)]
    assert printed["cells"][0]["results"]["merged"]["runs"] == 2
