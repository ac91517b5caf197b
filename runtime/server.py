"""HTTP JSON server (FastAPI on uvicorn) around a Predictor, with dynamic micro-batching.

    POST /v1/predict  {"inputs": ["text", ["text", "text_pair"], ...]}
                      -> {"predictions": [{"label": ..., "scores": {label: p}}, ...]}
    POST /v1/generate causal-LM exports: {"inputs": "prompt", "max_new_tokens": 20, "stream": false, ...}
                      (runtime/generate_api.py)
    GET  /health      -> {"status": "ok", "provider": ..., counters}
    GET  /metadata    -> the export's adalora_manifest.json

Concurrent requests are queued; one worker takes the first, waits at most max_wait_ms for more
(up to max_batch_size inputs), runs them as one batch in a worker thread, and hands each request
its own rows back. On shutdown uvicorn stops accepting, the queue is drained, then the worker ends.
"""

from __future__ import annotations

import asyncio
import json
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from adalora_deploy.errors import ConfigError

from .generate_api import add_generate_route
from .predictor import CAUSAL_LM, Predictor, TextInput
from .session import SessionConfig

# JSON may spell one character as a 12-byte surrogate-pair escape; bodies past this bound for the
# configured limits are refused before they are read in full.
MAX_BYTES_PER_CHAR = 12
BODY_OVERHEAD_BYTES = 64 * 1024


@dataclass
class ServerConfig:
    """Server and batching settings; mirrors the `adalora-deploy serve` flags.

    Args:
        host: interface to bind; 127.0.0.1 keeps the server local.
        port: TCP port.
        max_batch_size: most inputs in one batched model call.
        max_wait_ms: longest a request waits for others to share its batch.
        max_texts: most inputs in one request.
        max_chars: most characters in one text (each side of a pair counts separately).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    max_texts: int = 64
    max_chars: int = 10_000

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_texts", "max_chars"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} ({getattr(self, name)}) must be >= 1")
        if self.max_wait_ms < 0:
            raise ConfigError(f"max_wait_ms ({self.max_wait_ms}) must be >= 0")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port ({self.port}) must be in 0..65535")

    @property
    def max_body_bytes(self) -> int:
        return self.max_texts * 2 * self.max_chars * MAX_BYTES_PER_CHAR + BODY_OVERHEAD_BYTES


class RequestError(Exception):
    """A bad request: its HTTP status and a message for the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def parse_inputs(body: bytes, config: ServerConfig) -> list[TextInput]:
    """Decode and check a /v1/predict body; raises RequestError with a 4xx status.

    Args:
        body: the raw request body.
        config: the limits (max_texts, max_chars).

    Returns:
        The inputs: strings, or (text, text_pair) tuples.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RequestError(400, f"request body is not valid UTF-8 (byte {err.start})") from err
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise RequestError(400, f"malformed JSON: {err.msg} at line {err.lineno} column {err.colno}") from err
    if not isinstance(data, dict) or set(data) != {"inputs"}:
        raise RequestError(422, 'body must be a JSON object with one key, "inputs": {"inputs": ["text", ...]}')
    inputs = data["inputs"]
    if not isinstance(inputs, list):
        raise RequestError(422, f'"inputs" must be a list of texts, got {type(inputs).__name__}')
    if not inputs:
        raise RequestError(422, '"inputs" is empty: send at least one text')
    if len(inputs) > config.max_texts:
        raise RequestError(413, f"{len(inputs)} inputs in one request; at most {config.max_texts} (--max-texts)")
    return [_check_item(i, item, config.max_chars) for i, item in enumerate(inputs)]


def _check_item(i: int, item, max_chars: int) -> TextInput:
    if isinstance(item, list) and len(item) == 2:
        return tuple(_check_text(f"inputs[{i}][{j}]", t, max_chars) for j, t in enumerate(item))
    if not isinstance(item, str):
        raise RequestError(422, f"inputs[{i}] must be a string or a [text, text_pair] pair of strings")
    return _check_text(f"inputs[{i}]", item, max_chars)


def _check_text(where: str, text, max_chars: int) -> str:
    if not isinstance(text, str):
        raise RequestError(422, f"{where} must be a string, got {type(text).__name__}")
    if len(text) > max_chars:
        raise RequestError(413, f"{where} has {len(text)} characters; at most {max_chars} (--max-chars)")
    try:
        text.encode("utf-8")  # JSON escapes can smuggle in lone surrogates, which no tokenizer takes
    except UnicodeEncodeError as err:
        raise RequestError(400, f"{where} is not valid Unicode (lone surrogate at {err.start})") from err
    return text


@dataclass
class _Job:
    inputs: list[TextInput]
    future: asyncio.Future


_STOP = object()


@dataclass
class BatchStats:
    received: int = 0  # requests queued so far (requests counts those that have run)
    requests: int = 0
    inputs: int = 0
    batches: int = 0
    largest_batch: int = 0


@dataclass
class MicroBatcher:
    """Groups concurrent requests into model batches.

    Args:
        predictor: the thread-safe Predictor that runs each batch.
        max_batch_size: most inputs per batch (a single larger request runs alone, chunked).
        max_wait_ms: how long the first request of a batch waits for company.
    """

    predictor: Predictor
    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    stats: BatchStats = field(default_factory=BatchStats)

    def __post_init__(self) -> None:
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        # One model thread: batches run one after another; the event loop stays free for HTTP.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adalora-batch")

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._worker())

    async def stop(self) -> None:
        """Finish every queued request, then stop the worker."""
        await self._queue.put(_STOP)
        await self._task
        self._executor.shutdown(wait=True)

    async def submit(self, inputs: list[TextInput]) -> list[dict]:
        """Queue one request's inputs; returns one record per input once its batch has run."""
        future = asyncio.get_running_loop().create_future()
        self.stats.received += 1
        await self._queue.put(_Job(inputs, future))
        return await future

    async def _worker(self) -> None:
        pending = None
        while True:
            first = pending if pending is not None else await self._queue.get()
            if first is _STOP:
                return
            batch, pending = await self._collect(first)
            await self._run(batch)

    async def _collect(self, first: _Job) -> tuple[list[_Job], object]:
        """`first` plus whatever arrives within max_wait_ms, up to max_batch_size inputs.

        Returns the batch and the job that did not fit (or _STOP), to start the next batch with.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_ms / 1000
        batch, size = [first], len(first.inputs)
        while size < self.max_batch_size:
            job = await self._next(deadline - loop.time())
            if job is None:
                break
            if job is _STOP or size + len(job.inputs) > self.max_batch_size:
                return batch, job
            batch.append(job)
            size += len(job.inputs)
        return batch, None

    async def _next(self, timeout: float):
        """The next queued job, waiting at most `timeout` seconds; None when none came."""
        try:
            return self._queue.get_nowait()
        except asyncio.QueueEmpty:
            if timeout <= 0:
                return None
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except asyncio.TimeoutError:
            return None

    async def _run(self, batch: list[_Job]) -> None:
        flat = [x for job in batch for x in job.inputs]
        self._count(batch, len(flat))
        loop = asyncio.get_running_loop()
        try:
            predictions = await loop.run_in_executor(self._executor, self._predict, flat)
        except Exception as err:  # hand the failure to every waiting request, keep serving
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(err)
            return
        start = 0
        for job in batch:
            if not job.future.done():  # the client may have gone away
                job.future.set_result(predictions[start:start + len(job.inputs)])
            start += len(job.inputs)

    def _predict(self, inputs: list[TextInput]) -> list[dict]:
        return self.predictor.predict(inputs, batch_size=self.max_batch_size).records()

    def _count(self, batch: list[_Job], n_inputs: int) -> None:
        self.stats.requests += len(batch)
        self.stats.inputs += n_inputs
        self.stats.batches += 1
        self.stats.largest_batch = max(self.stats.largest_batch, n_inputs)


async def read_body(request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"request body of {declared} bytes is over the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(predictor: Predictor, config: ServerConfig | None = None):
    """The FastAPI application; the micro-batcher starts and drains with the app's lifespan.

    Args:
        predictor: the model to serve.
        config: limits and batching settings.

    Returns:
        A FastAPI app (run it with uvicorn).
    """
    config = config or ServerConfig()
    batcher = MicroBatcher(predictor, config.max_batch_size, config.max_wait_ms)

    @asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        yield
        await batcher.stop()
        app.state.generation.shutdown()

    app = FastAPI(title="adalora-deploy", lifespan=lifespan)
    app.state.batcher = batcher
    app.state.generation = add_generate_route(app, predictor, config, RequestError, read_body)

    @app.exception_handler(RequestError)
    async def _bad_request(request, err: RequestError):
        return JSONResponse({"error": err.message}, status_code=err.status)

    @app.post("/v1/predict")
    async def predict(request: Request):
        if predictor.task == CAUSAL_LM:
            raise RequestError(422, "this server runs a causal LM: use POST /v1/generate")
        inputs = parse_inputs(await read_body(request, config.max_body_bytes), config)
        return {"predictions": await batcher.submit(inputs)}

    @app.get("/health")
    async def health():
        return {"status": "ok", **_describe(predictor), **vars(batcher.stats)}

    @app.get("/metadata")
    async def metadata():
        if predictor.manifest is None:
            return JSONResponse({"error": "this export directory has no adalora_manifest.json"}, status_code=404)
        return predictor.manifest

    return app


def _describe(predictor: Predictor) -> dict:
    manifest = predictor.manifest or {}
    return {"provider": predictor.provider, "mode": manifest.get("mode"), "task": predictor.task}


def serve(
    path: str | os.PathLike, mode: str = "merged", provider: str = "auto", threads: int = 0,
    config: ServerConfig | None = None, log_level: str = "info",
) -> None:
    """Load an export and serve it until SIGINT/SIGTERM; errors in the model dir raise at start.

    Args:
        path: one mode's directory, or an export root.
        mode: "merged" or "factored", for an export root.
        provider: "auto", "cuda" or "cpu".
        threads: ONNX Runtime intra-op threads (0: one per core).
        config: host, port, batching and request limits.
        log_level: uvicorn's log level.
    """
    import uvicorn

    config = config or ServerConfig()
    session_config = SessionConfig(provider=provider, intra_op_threads=threads)
    predictor = Predictor.from_pretrained(
        path, mode=mode, batch_size=config.max_batch_size, session_config=session_config
    )
    print(f"serving {predictor.session.path} on {predictor.provider} at http://{config.host}:{config.port}")
    app = create_app(predictor, config)
    server_config = uvicorn.Config(
        app, host=config.host, port=config.port, log_level=log_level, timeout_graceful_shutdown=30
    )
    uvicorn.Server(server_config).run()
