"""Bad input through the real CLI (adalora_deploy.cli.main), one table per command. Every case must
end as a user should see it: exit code 2, exactly one `error:` line on stderr, no traceback, and
nothing written or removed anywhere in the workspace (its tree is compared before and after).
All cases fail before any training or timing, so the suite stays fast."""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from adalora_deploy.cli import main

from .test_data import write_jsonl
from .test_training import separable_rows, write_rows
from .tiny_decoders import save_tiny_decoder


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_bert_dir, tiny_checkpoint, tiny_export_root) -> Path:
    """A workspace holding copies of the tiny model, checkpoint and export, good data, and a
    `cwd/` with a user's file, so that any case that writes or removes something is seen."""
    root = tmp_path_factory.mktemp("bad-input")
    shutil.copytree(tiny_bert_dir, root / "model")
    shutil.copytree(tiny_checkpoint, root / "runs" / "ckpt")
    shutil.copytree(tiny_export_root, root / "onnx")
    (root / "data").mkdir()
    write_rows(root / "data" / "good.csv", separable_rows(40))
    (root / "cwd").mkdir()
    (root / "cwd" / "precious.txt").write_text("the user's file")
    (root / "a-file").write_text("not a directory")
    (root / "existing-dir").mkdir()
    broken = root / "broken"  # an export whose model.onnx is garbage: loading it fails
    shutil.copytree(tiny_export_root / "merged", broken)
    (broken / "model.onnx").write_bytes(b"not a protobuf")
    listed = root / "listed"  # a manifest that is a JSON list
    shutil.copytree(tiny_export_root / "merged", listed)
    (listed / "adalora_manifest.json").write_text("[1, 2]")
    untokenized = root / "untokenized"
    shutil.copytree(tiny_export_root / "merged", untokenized)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        (untokenized / name).unlink(missing_ok=True)
    data = root / "data"
    write_rows(data / "one-class.csv", [(text, "positive") for text, _ in separable_rows(10)])
    write_rows(data / "huge-label.csv", [("x", "1000000000000"), ("y", "0")])
    (data / "latin1.jsonl").write_bytes('{"text": "caf\u00e9", "label": 0}\n'.encode("latin-1"))
    (data / "big-int.jsonl").write_text('{"text": "x", "label": ' + "9" * 5000 + "}\n")
    write_jsonl(data / "one-tag.jsonl", [{"tokens": ["ada", "wrote", "notes"], "tags": ["O", "O", "O"]}] * 10)
    write_jsonl(data / "huge-tag.jsonl", [{"tokens": ["ada", "wrote"], "tags": [0, 10**12]}] * 10)
    # context[-9:-6] of "ada wrote" is "ada": a negative start slices from the end and would be taken
    write_jsonl(data / "qa-negative-start.jsonl",
                [{"question": "who?", "context": "ada wrote", "answer_text": "ada", "answer_start": -9}] * 10)
    far = "filler " * 40 + "ada"  # the answer sits past 16 tokens in every row
    write_jsonl(data / "qa-cut-off.jsonl",
                [{"question": "who?", "context": far, "answer_text": "ada", "answer_start": far.index("ada")}] * 10)
    write_jsonl(data / "lm-long-prompts.jsonl",
                [{"prompt": "the quick brown fox jumps over the lazy dog", "completion": " again"}] * 10)
    save_tiny_decoder(root / "decoder")
    untok = root / "model-without-tokenizer"
    shutil.copytree(root / "model", untok)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        (untok / name).unlink(missing_ok=True)
    for name, (edit, _) in BROKEN_CONFIGS.items():
        broken_ckpt = root / "bad-ckpt" / name
        shutil.copytree(root / "runs" / "ckpt", broken_ckpt)
        meta = json.loads((broken_ckpt / "adalora_config.json").read_text())
        (broken_ckpt / "adalora_config.json").write_text(json.dumps(edit(meta)))
    nan_ckpt = root / "bad-ckpt" / "nan-weights"
    shutil.copytree(root / "runs" / "ckpt", nan_ckpt)
    state = load_file(nan_ckpt / "adapter.safetensors")
    state = {k: v.float().fill_(float("nan")) if v.is_floating_point() else v for k, v in state.items()}
    save_file(state, nan_ckpt / "adapter.safetensors")
    return root


def _set(path: str, value):
    def edit(meta):
        *parents, last = path.split(".")
        node = meta
        for key in parents:
            node = node[key]
        node[last] = value
        return meta
    return edit


# Checkpoint configs edited by hand: export, inspect and bench must refuse them the same way.
BROKEN_CONFIGS = {
    "init_r-string": (_set("adalora.init_r", "4"), "init_r ('4') must be an integer"),
    "alpha-string": (_set("adalora.alpha", "big"), "alpha ('big') must be a finite number"),
    "base_model-string": (_set("base_model", "foo"), "'base_model' must be a JSON object"),
    "id2label-list": (_set("id2label", ["rotten", "fresh"]), "id2label must be a JSON object"),
    "adalora-null": (_set("adalora", None), "'adalora' must be a JSON object"),
    "whole-config-a-list": (lambda meta: [meta], "holds a JSON list, not an object"),
    "negative-init_r": (_set("adalora.init_r", -4), "init_r (-4) must be >= 1"),
    "target_r-above-init_r": (_set("adalora.target_r", 9), "target_r (9) must be between 0 and init_r (4)"),
    "unknown-adalora-key": (_set("adalora.rank_dropout", 0.1), "unknown AdaLoRA config keys: rank_dropout"),
    "alpha-nan": (_set("adalora.alpha", float("nan")), "alpha (nan) must be a finite number"),
    "rank-above-init_r": (lambda meta: {**meta, "ranks": {k: 7 for k in meta["ranks"]}}, "ranks must be integers in 0..init_r"),
}


def tree(root: Path) -> dict[str, tuple]:
    """Every path under `root` with its kind, size and mtime (directories: the sorted entry names)."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(root))] = (p.is_dir(), st.st_size if p.is_file() else None, st.st_mtime_ns)
    return out


def refuse(ws: Path, monkeypatch, capsys, argv: list, fragment: str) -> None:
    """Run the CLI in `ws/cwd` and assert the refusal contract."""
    monkeypatch.chdir(ws / "cwd")
    before = tree(ws)
    scratch = Path(tempfile.mkdtemp(prefix="bad-input-scratch-"))  # the command's $TMPDIR, watched alone
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    code = main([str(a).replace("{ws}", str(ws)) for a in argv])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    # One `error:` line, last; anything before it is progress ("[export] loading ...", the train bar).
    assert [line for line in lines if line.startswith("error: ")] == lines[-1:], err
    assert all(line.startswith(("[export] ", "train: ")) for line in lines[:-1]), err
    assert "Traceback" not in err
    assert fragment in lines[-1], lines[-1]
    assert tree(ws) == before, "the workspace changed"
    assert list(scratch.iterdir()) == [], "a temporary file or directory was left behind"
    scratch.rmdir()


TRAIN = ["train", "--model", "{ws}/model", "--data", "{ws}/data/good.csv", "--steps", "10"]

TRAIN_CASES = {
    # data loss
    "out empty string with overwrite": (["--out", "", "--overwrite"], "--out is empty"),
    "out is the current directory": (["--out", ".", "--overwrite"], "is the current directory"),
    "out is a parent of the current directory": (["--out", "..", "--overwrite"], "is the current directory or one of"),
    "out is the home directory": (["--out", os.path.expanduser("~"), "--overwrite"], "the home directory"),
    "out is the root": (["--out", "/", "--overwrite"], "is the current directory or one of"),
    "out is the data file": (["--out", "{ws}/data/good.csv", "--overwrite"], "is the input"),
    "out contains the data": (["--out", "{ws}/data", "--overwrite"], "contains the input"),
    "out is the base model": (["--out", "{ws}/model", "--overwrite"], "is the input"),
    "out inside the base model": (["--out", "{ws}/model/sub"], "lies inside the input"),
    "out is a file": (["--out", "{ws}/a-file", "--overwrite"], "exists and is not a directory"),
    "parent of out is a file": (["--out", "{ws}/a-file/ckpt"], "is a file, not a directory"),
    "parent of out is read-only": (["--out", "/proc/adalora-ckpt"], "cannot write in /proc"),
    "non-empty out without overwrite": (["--out", "{ws}/runs/ckpt"], "exists and is not empty"),
    # bad input
    "lr inf": (["--lr", "inf", "--out", "{ws}/new"], "lr (inf) must be > 0 and finite"),
    "lr nan": (["--lr", "nan", "--out", "{ws}/new"], "lr (nan) must be > 0 and finite"),
    "alpha nan": (["--alpha", "nan", "--out", "{ws}/new"], "alpha (nan) must be a finite number"),
    "alpha inf": (["--alpha", "inf", "--out", "{ws}/new"], "alpha (inf) must be a finite number"),
    "orth-reg nan": (["--orth-reg", "nan", "--out", "{ws}/new"], "orth_reg (nan) must be a finite number"),
    "single-class data": (["--data", "{ws}/data/one-class.csv", "--out", "{ws}/new"], "every row has label 'positive'"),
    "huge integer label": (["--data", "{ws}/data/huge-label.csv", "--out", "{ws}/new"], "over the limit of 10000"),
    "non-UTF-8 JSONL": (["--data", "{ws}/data/latin1.jsonl", "--out", "{ws}/new"], "as UTF-8"),
    "100,000-digit JSON label": (["--data", "{ws}/data/big-int.jsonl", "--out", "{ws}/new"], "cannot be read"),
    "max-length above the model": (["--max-length", "512", "--out", "{ws}/new"], "--max-length 512 is above the 128 positions"),
    "model without a tokenizer": (["--model", "{ws}/model-without-tokenizer", "--out", "{ws}/new"], "has no tokenizer files"),
    # the token-level tasks: one class, huge ids, and labels that truncation leaves empty
    "token-classification: one tag only": (
        ["--task", "token-classification", "--data", "{ws}/data/one-tag.jsonl", "--out", "{ws}/new"],
        "every token has tag 'O'; a token classifier needs at least two tags"),
    "token-classification: huge integer tag": (
        ["--task", "token-classification", "--data", "{ws}/data/huge-tag.jsonl", "--out", "{ws}/new"],
        "over the limit of 10000"),
    "question-answering: negative answer_start": (
        ["--task", "question-answering", "--data", "{ws}/data/qa-negative-start.jsonl", "--out", "{ws}/new"],
        "answer_start -9 is not a character offset"),
    "question-answering: every answer cut off": (
        ["--task", "question-answering", "--data", "{ws}/data/qa-cut-off.jsonl", "--max-length", "16",
         "--out", "{ws}/new"], "every answer lies beyond --max-length 16 tokens"),
    "causal-lm: prompts fill max-length": (
        ["--task", "causal-lm", "--model", "{ws}/decoder", "--data", "{ws}/data/lm-long-prompts.jsonl",
         "--max-length", "4", "--out", "{ws}/new"], "no row has a token to learn within --max-length 4"),
    "steps zero": (["--steps", "0", "--out", "{ws}/new"], "steps (0) must be >= 1"),
    "threads zero": (["--threads", "0", "--out", "{ws}/new"], "threads (0) must be >= 1"),
    # the one case that trains: AdamW moves every weight by ~lr per step, so the activations overflow. With
    # 5 steps there is no warm-up: step 1 applies lr 1e30 and step 2's loss is NaN, so no weights are good
    # but the initial ones and nothing is written (a later divergence: test_a_diverged_run_...).
    "loss becomes non-finite": (["--lr", "1e30", "--steps", "5", "--out", "{ws}/new"],
                                "at step 2 of 5: training stopped before applying it; nothing was written"),
    "target_r above init_r": (["--init-r", "2", "--target-r", "3", "--out", "{ws}/new"], "target_r (3) must be between"),
}


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_train_refuses(case, ws, monkeypatch, capsys):
    flags, fragment = TRAIN_CASES[case]
    refuse(ws, monkeypatch, capsys, TRAIN + flags, fragment)


def test_a_diverged_run_leaves_its_last_good_state_as_a_checkpoint(ws, tmp_path, monkeypatch, capsys):
    # 10 steps: step 1 is the warm-up's lr 0, step 2 applies lr 1e6, step 3's loss overflows. The weights
    # after step 1 gave step 2 a finite loss: they are the checkpoint, which must export and inspect.
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "ckpt"
    code = main([a.replace("{ws}", str(ws)) for a in TRAIN] + ["--lr", "1e6", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "Traceback" not in "\n".join(err)
    assert [line for line in err if line.startswith("error: ")] == err[-1:]
    assert err[-1].startswith("error: the loss became nan at step 3 of 10: training stopped before applying it; "
                              f"the last good state (after step 1) is in {out} as a checkpoint marked stopped early")
    assert err[-1].endswith("lower --lr (now 1e+06) or --alpha, or check the data, and train again")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # written atomically: no temporary left
    meta = json.loads((out / "adalora_config.json").read_text())
    assert meta["steps_done"] == 1
    assert meta["stopped_early"] == {"steps_done": 1, "steps_planned": 10, "reason": "the loss became nan at step 3"}
    assert main(["export", str(out), "--out", str(tmp_path / "onnx"), "--prune-ranks"]) == 0
    assert "note: " in capsys.readouterr().err
    manifest = json.loads((tmp_path / "onnx" / "merged" / "adalora_manifest.json").read_text())
    assert manifest["stopped_early"] == meta["stopped_early"]
    assert main(["inspect", str(out)]) == 0
    assert "stopped early: the last good state of a run that diverged" in capsys.readouterr().out


EXPORT_CASES = {
    "out is the checkpoint": (["{ws}/runs/ckpt", "--out", "{ws}/runs/ckpt", "--overwrite"], "is the input"),
    "out inside the checkpoint": (["{ws}/runs/ckpt", "--out", "{ws}/runs/ckpt/onnx", "--overwrite"], "lies inside the input"),
    "out contains the checkpoint": (["{ws}/runs/ckpt", "--out", "{ws}/runs", "--overwrite"], "contains the input"),
    "out is the base": (["{ws}/runs/ckpt", "--base", "{ws}/model", "--out", "{ws}/model", "--overwrite"], "is the input"),
    "out empty string": (["{ws}/runs/ckpt", "--out", "", "--overwrite"], "--out is empty"),
    "out is the current directory": (["{ws}/runs/ckpt", "--out", ".", "--overwrite"], "is the current directory"),
    "parent of out is a file": (["{ws}/runs/ckpt", "--out", "{ws}/a-file/onnx"], "is a file, not a directory"),
    "checkpoint of NaNs": (["{ws}/bad-ckpt/nan-weights", "--out", "{ws}/new"], "non-finite values"),
    **{f"config {name}": ([f"{{ws}}/bad-ckpt/{name}", "--out", "{ws}/new"], fragment)
       for name, (_, fragment) in BROKEN_CONFIGS.items()},
}


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_export_refuses(case, ws, monkeypatch, capsys):
    flags, fragment = EXPORT_CASES[case]
    refuse(ws, monkeypatch, capsys, ["export", *flags], fragment)


INSPECT_CASES = {
    "plot without an extension": (["{ws}/runs/ckpt", "--plot", "{ws}/ranks"], "has no image extension"),
    "plot is a directory": (["{ws}/runs/ckpt", "--plot", "{ws}/existing-dir"], "is a directory"),
    "plot exists": (["{ws}/runs/ckpt", "--plot", "{ws}/data/good.csv"], "already exists"),
    "json target is a directory": (["{ws}/runs/ckpt", "--json", "{ws}/existing-dir"], "is a directory"),
    "json exists": (["{ws}/runs/ckpt", "--json", "{ws}/data/good.csv"], "already exists"),
    **{f"config {name}": ([f"{{ws}}/bad-ckpt/{name}"], fragment) for name, (_, fragment) in BROKEN_CONFIGS.items()},
}


@pytest.mark.parametrize("case", list(INSPECT_CASES))
def test_inspect_refuses(case, ws, monkeypatch, capsys):
    flags, fragment = INSPECT_CASES[case]
    refuse(ws, monkeypatch, capsys, ["inspect", *flags], fragment)


BENCH = ["bench", "{ws}/onnx", "--batch-sizes", "1", "--seq-lens", "8", "--runs", "1"]

BENCH_CASES = {
    "json target is a directory": (["--json", "{ws}/existing-dir"], "is a directory"),
    "plot target is a directory": (["--plot", "{ws}/existing-dir"], "is a directory"),
    "plot without an extension": (["--plot", "{ws}/latency"], "has no image extension"),
    "json exists": (["--json", "{ws}/data/good.csv"], "already exists"),
    "parent of json is a file": (["--json", "{ws}/a-file/b.json"], "is a file, not a directory"),
    "seq-lens above the model": (["--seq-lens", "8,4096"], "--seq-lens 4096 is above the 128 positions"),
}
# A checkpoint is validated as export and inspect validate it, before anything is exported or timed;
# an export's manifest is read as a JSON object.
BENCH_SOURCE_CASES = {
    "manifest is a JSON list": (["{ws}/listed"], "holds a JSON list, not an object"),
    **{f"config {name}": ([f"{{ws}}/bad-ckpt/{name}"], fragment) for name, (_, fragment) in BROKEN_CONFIGS.items()},
    "adapters: config adalora-null": (["{ws}/bad-ckpt/adalora-null", "--adapters", "2"], "'adalora' must be a JSON object"),
    "adapters: config a JSON list": (["{ws}/bad-ckpt/whole-config-a-list", "--adapters", "2"], "holds a JSON list"),
}


@pytest.mark.parametrize("case", list(BENCH_CASES))
def test_bench_refuses(case, ws, monkeypatch, capsys):
    flags, fragment = BENCH_CASES[case]
    refuse(ws, monkeypatch, capsys, BENCH + flags, fragment)


@pytest.mark.parametrize("case", list(BENCH_SOURCE_CASES))
def test_bench_refuses_a_broken_source(case, ws, monkeypatch, capsys):
    flags, fragment = BENCH_SOURCE_CASES[case]
    refuse(ws, monkeypatch, capsys, ["bench", *flags, "--batch-sizes", "1", "--seq-lens", "8", "--runs", "1"], fragment)


DEMO = ["demo", "--model", "{ws}/model", "--data", "{ws}/data/good.csv", "--fast"]

DEMO_CASES = {
    "out empty string": (["--out", "", "--overwrite"], "--out is empty"),
    "out is the current directory": (["--out", ".", "--overwrite"], "is the current directory"),
    "out contains the data": (["--out", "{ws}/data", "--overwrite"], "contains the input"),
    "non-empty out without overwrite": (["--out", "{ws}/runs/ckpt"], "exists and is not empty"),
    "parent of out is a file": (["--out", "{ws}/a-file/demo"], "is a file, not a directory"),
    "bench-seq-lens above the model": (["--out", "{ws}/new", "--bench-seq-lens", "1024"], "--bench-seq-lens 1024 is above"),
    "max-length above the model": (["--out", "{ws}/new", "--max-length", "129"], "--max-length 129 is above"),
    "lr inf": (["--out", "{ws}/new", "--lr", "inf"], "lr (inf) must be a finite number"),
    "threads zero": (["--out", "{ws}/new", "--threads", "0"], "threads (0) must be >= 1"),
}


@pytest.mark.parametrize("case", list(DEMO_CASES))
def test_demo_refuses(case, ws, monkeypatch, capsys):
    flags, fragment = DEMO_CASES[case]
    refuse(ws, monkeypatch, capsys, DEMO + flags, fragment)


@pytest.fixture(scope="module")
def busy_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


SERVE_CASES = {
    "max-wait-ms inf": (["--max-wait-ms", "inf"], "max_wait_ms (inf) must be"),
    "max-wait-ms nan": (["--max-wait-ms", "nan"], "max_wait_ms (nan) must be"),
    "max-wait-ms negative": (["--max-wait-ms", "-1"], "max_wait_ms (-1.0) must be"),
    "request-timeout zero": (["--request-timeout", "0"], "request_timeout (0.0) must be"),
    "body-timeout inf": (["--body-timeout", "inf"], "body_timeout (inf) must be"),
    "max-batch-tokens zero": (["--max-batch-tokens", "0"], "max_batch_tokens (0) must be >= 1"),
    "queue smaller than a request": (["--max-queue-texts", "8", "--max-texts", "64"], "max_queue_texts (8) must be"),
    "port out of range": (["--port", "70000"], "port (70000) must be in 0..65535"),
    "bad host": (["--host", "no.such.host.invalid", "--port", "0"], "cannot resolve --host"),
    "merged dir served as factored": (["--mode", "factored", "--port", "0"], "holds the merged graph, not factored"),
    "missing export dir": (["--port", "0"], "export directory not found"),
    "manifest is a JSON list": (["--port", "0"], "holds a JSON list, not an object"),
    "missing tokenizer": (["--port", "0"], "has no tokenizer.json"),
}
SERVE_DIRS = {"merged dir served as factored": "{ws}/onnx/merged", "missing export dir": "{ws}/nowhere",
              "manifest is a JSON list": "{ws}/listed", "missing tokenizer": "{ws}/untokenized"}


@pytest.mark.parametrize("case", list(SERVE_CASES))
def test_serve_refuses(case, ws, monkeypatch, capsys):
    flags, fragment = SERVE_CASES[case]
    argv = ["serve", SERVE_DIRS.get(case, "{ws}/onnx"), "--provider", "cpu", *flags]
    refuse(ws, monkeypatch, capsys, argv, fragment)


def test_serve_checks_the_port_before_loading_the_model(ws, busy_port, monkeypatch, capsys):
    # The model directory is broken too: the port's error comes first, so nothing was loaded.
    refuse(ws, monkeypatch, capsys, ["serve", "{ws}/broken", "--port", busy_port], "is already in use")


def test_the_workspace_is_what_the_cases_expect(ws):
    # The refusals above are only meaningful if their targets exist as described.
    assert (ws / "runs" / "ckpt" / "adapter.safetensors").is_file() and (ws / "a-file").is_file()
    assert json.loads((ws / "onnx" / "merged" / "adalora_manifest.json").read_text())["mode"] == "merged"
