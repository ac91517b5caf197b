"""Outputs survive signals: SIGTERM during export or bench removes the temporary directories, a run
killed with SIGKILL is undone by the next one, and created files and directories follow the umask."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from adalora_deploy.io import INCOMPLETE_MARKER, atomic_output_dir, atomic_write, check_output_dir


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def cli(*argv, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "adalora_deploy", *map(str, argv)], env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigterm_during_export_removes_the_temporary_directory(tmp_path, tiny_checkpoint):
    out = tmp_path / "onnx"
    proc = cli("export", tiny_checkpoint, "--out", out)
    try:
        assert wait_for(lambda: list(tmp_path.glob(".onnx.tmp-*")), 120), "the export never started writing"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_sigterm_during_bench_removes_its_temporary_exports(tmp_path, tiny_checkpoint):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    proc = cli("bench", tiny_checkpoint, "--batch-sizes", "1", "--seq-lens", "8", "--runs", "1000",
               "--json", tmp_path / "b.json", env={"TMPDIR": str(scratch)})
    try:
        assert wait_for(lambda: list(scratch.glob("adalora-bench-*")), 120), "bench never made its directory"
        time.sleep(1.0)  # inside the export or the timing
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    assert list(scratch.glob("adalora-*")) == [] and not (tmp_path / "b.json").exists()


def test_a_demo_output_killed_with_sigkill_is_restored_by_the_next_run(tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "old-result.txt").write_text("the user's previous demo")
    script = textwrap.dedent(f"""
        import time
        from adalora_deploy.demo import staged_output_dir
        with staged_output_dir({str(out)!r}, overwrite=True) as root:
            (root / "partial.bin").write_bytes(b"x" * 1000)
            print("ready", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        assert (out / INCOMPLETE_MARKER).is_file() and (tmp_path / f".demo.old-{proc.pid}").is_dir()
    finally:
        proc.kill()
        proc.wait()
    check_output_dir(out, overwrite=True)  # what the next run does first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]
    assert sorted(p.name for p in out.iterdir()) == ["old-result.txt"]


def test_leftovers_of_dead_processes_are_cleaned_but_live_ones_kept(tmp_path):
    dead, live = dead_pid(), os.getpid()
    out = tmp_path / "ckpt"
    for pid in (dead, live):
        (tmp_path / f".ckpt.tmp-{pid}-abc").mkdir()
    out.mkdir()
    (out / "adapter.safetensors").write_text("finished")
    (tmp_path / f".ckpt.old-{dead}").mkdir()  # killed between the last rename and the clean-up
    check_output_dir(out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".ckpt.tmp-{live}-abc", "ckpt"]
    assert (out / "adapter.safetensors").read_text() == "finished"


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def test_outputs_follow_the_umask(tmp_path, umask_027):
    with atomic_output_dir(tmp_path / "out") as tmp:
        (tmp / "f").write_text("x")
    path = atomic_write(tmp_path / "report.json", lambda p: p.write_text("{}"))
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o750
    assert path.stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "out" / "f").stat().st_mode & 0o777 == 0o640  # as open() made it


def test_a_failed_write_leaves_the_old_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("old")
    with pytest.raises(RuntimeError), atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "new").write_text("new")
        raise RuntimeError("export failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "keep").read_text() == "old"
