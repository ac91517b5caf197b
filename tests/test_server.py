"""The HTTP server over real HTTP on 127.0.0.1: predictions, micro-batching, bad requests,
start-up errors and graceful shutdown."""

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from adalora_deploy.cli import main
from adalora_deploy.runtime.predictor import Predictor
from adalora_deploy.runtime.server import ServerConfig, create_app

MAX_TEXTS, MAX_CHARS = 4, 200


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_serve(export_dir, port: int, *flags: str, stdout=subprocess.PIPE) -> subprocess.Popen:
    """`adalora-deploy serve EXPORT_DIR --port PORT FLAGS...` in a child process (stderr piped)."""
    cmd = [sys.executable, "-m", "adalora_deploy", "serve", str(export_dir), "--port", str(port), *flags]
    return subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.PIPE, env={**os.environ})


def wait_until_healthy(proc: subprocess.Popen, url: str, timeout: float = 60) -> None:
    """Poll GET /health of a `serve` subprocess until it answers 200 (fails if the process dies)."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()[-2000:]
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)


@pytest.fixture(scope="module")
def predictor(tiny_export_root):
    return Predictor.from_pretrained(tiny_export_root, provider="cpu")


@contextlib.contextmanager
def serving(app, config: ServerConfig, timeout: float = 30):
    """Run `app` with uvicorn in a thread on config's host and port; yields an httpx client."""
    import uvicorn

    srv = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    try:
        with httpx.Client(base_url=f"http://{config.host}:{config.port}", timeout=timeout) as client:
            yield client
    finally:
        srv.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def server(predictor):
    """uvicorn in a thread, on a free loopback port; yields (client, app)."""
    config = ServerConfig(port=free_port(), max_batch_size=8, max_wait_ms=300, max_texts=MAX_TEXTS,
                          max_chars=MAX_CHARS)
    app = create_app(predictor, config)
    with serving(app, config) as client:
        yield client, app


def assert_records_equal(got: list[dict], want: list[dict]) -> None:
    assert [g["label"] for g in got] == [w["label"] for w in want]
    for g, w in zip(got, want, strict=True):
        assert g["scores"].keys() == w["scores"].keys()
        assert all(abs(g["scores"][k] - w["scores"][k]) < 1e-6 for k in w["scores"])


def test_predict_returns_label_and_scores(server, predictor):
    client, _ = server
    inputs = ["a gripping, beautifully shot film", ["the premise is thin", "but the cast carries it"]]
    response = client.post("/v1/predict", json={"inputs": inputs})
    assert response.status_code == 200
    want = predictor.predict(["a gripping, beautifully shot film", ("the premise is thin", "but the cast carries it")])
    assert_records_equal(response.json()["predictions"], want.records())


def test_health_and_metadata(server, tiny_export_root):
    client, _ = server
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["provider"] == "CPUExecutionProvider"
    manifest = json.loads((tiny_export_root / "merged" / "adalora_manifest.json").read_text())
    assert client.get("/metadata").json() == manifest


BAD_REQUESTS = [
    ("malformed JSON", b'{"inputs": ["a"', 400, "malformed JSON"),
    ("invalid UTF-8", b'{"inputs": ["caf\xe9"]}', 400, "not valid UTF-8"),
    ("lone surrogate", b'{"inputs": ["\\ud800"]}', 400, "not valid Unicode"),
    ("not an object", b'["a"]', 422, "JSON object"),
    ("missing inputs", b'{"texts": ["a"]}', 422, '"inputs"'),
    ("inputs not a list", b'{"inputs": "a"}', 422, "must be a list"),
    ("empty list", b'{"inputs": []}', 422, "empty"),
    ("number item", b'{"inputs": [3]}', 422, "inputs[0] must be"),
    ("three-item pair", b'{"inputs": [["a", "b", "c"]]}', 422, "inputs[0] must be"),
    ("pair with a number", b'{"inputs": [["a", 1]]}', 422, "inputs[0][1] must be a string"),
    ("too many texts", json.dumps({"inputs": ["a"] * (MAX_TEXTS + 1)}).encode(), 413, "--max-texts"),
    ("text too long", json.dumps({"inputs": ["a" * (MAX_CHARS + 1)]}).encode(), 413, "--max-chars"),
    ("oversized body", b'{"inputs": ["' + b"a" * 2_000_000 + b'"]}', 413, "over the limit"),
]


@pytest.mark.parametrize("body, status, message", [c[1:] for c in BAD_REQUESTS], ids=[c[0] for c in BAD_REQUESTS])
def test_bad_requests_get_4xx_and_the_server_keeps_serving(server, body, status, message):
    client, _ = server
    response = client.post("/v1/predict", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status
    assert message in response.json()["error"]
    assert client.post("/v1/predict", json={"inputs": ["still serving"]}).status_code == 200


def test_oversized_body_sent_in_chunks_is_cut_off(server):
    client, _ = server

    def chunks():  # no Content-Length: the limit must hold while streaming
        yield b'{"inputs": ["'
        for _ in range(30):
            yield b"a" * 100_000
        yield b'"]}'

    response = client.post("/v1/predict", content=chunks())
    assert response.status_code == 413
    assert client.get("/health").status_code == 200


def test_concurrent_requests_share_batches(server, predictor):
    client, app = server
    stats = app.state.batcher.stats
    before = (stats.requests, stats.batches)
    texts = [f"review number {i}, {'good ' * i}" for i in range(8)]

    async def fire():
        async with httpx.AsyncClient(base_url=str(client.base_url), timeout=30) as aclient:
            return await asyncio.gather(*(aclient.post("/v1/predict", json={"inputs": [t]}) for t in texts))

    responses = asyncio.run(fire())
    assert [r.status_code for r in responses] == [200] * 8
    for text, response in zip(texts, responses, strict=True):
        assert_records_equal(response.json()["predictions"], predictor.predict([text]).records())
    assert stats.requests - before[0] == 8
    assert stats.batches - before[1] < 8  # 8 requests inside one 300 ms window: fewer batches than requests
    assert stats.largest_batch <= 8


def test_missing_model_dir_is_one_line_error_at_start(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "nowhere"), "--port", str(free_port())]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: export directory not found") and "\n" not in err


def test_corrupt_model_dir_is_one_line_error_at_start(tmp_path, tiny_export_root, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_export_root / "merged", broken)
    (broken / "model.onnx").write_bytes(b"not a protobuf at all")
    assert main(["serve", str(broken), "--port", str(free_port())]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "re-export" in err and "\n" not in err


@pytest.mark.slow
def test_sigterm_drains_in_flight_requests(tiny_export_root):
    port = free_port()
    proc = start_serve(tiny_export_root, port, "--provider", "cpu", "--max-wait-ms", "3000", "--log-level", "warning")
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(proc, url)
        result = {}
        request = threading.Thread(
            target=lambda: result.update(r=httpx.post(f"{url}/v1/predict", json={"inputs": ["x"]}, timeout=30))
        )
        request.start()
        while httpx.get(f"{url}/health", timeout=5).json()["received"] < 1:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)  # the request is now held in the batcher's 3 s window
        request.join(timeout=30)
        assert result["r"].status_code == 200 and result["r"].json()["predictions"][0]["label"]
        # uvicorn re-raises the signal once it has shut down cleanly, so that supervisors see it.
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
        assert "Traceback" not in proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
