"""HTTP JSON server (FastAPI on uvicorn) around a Predictor, with dynamic micro-batching.

    POST /v1/predict  {"inputs": ["text", ["text", "text_pair"], ...]}
                      -> {"predictions": [{"label": ..., "scores": {label: p}}, ...]}
    POST /v1/generate causal-LM exports: {"inputs": "prompt", "max_new_tokens": 20, "stream": false, ...}
                      (runtime/generate_api.py)
    GET  /health      -> {"status": "ok", "provider": ..., counters}
    GET  /metadata    -> the export's adalora_manifest.json
    multi graphs (runtime/adapter_api.py): POST /v1/predict {"adapter": "NAME", "inputs": [...]},
    GET /v1/adapters, PUT /v1/adapters/NAME {"path": ...}, DELETE /v1/adapters/NAME

Concurrent requests are queued; one worker takes the first, waits at most max_wait_ms for more
(up to max_batch_size inputs), runs them as one batch in a worker thread, and hands each request
its own rows back. On shutdown uvicorn stops accepting, the queue is drained, then the worker ends.

Overload (runtime/limits.py, docs/refusals.md): the queue is bounded in texts and tokens (503 with
Retry-After past it), each request has a deadline (504), the work of a client that disconnected or
timed out is dropped before it runs, and each model call holds at most max_batch_tokens padded tokens.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from adalora_deploy.errors import ConfigError

from .adapter_api import add_adapter_routes, parse_adapter_predict
from .adapters import UnknownAdapterError
from .generate_api import add_generate_route
from .limits import (
    Admission,
    RequestError,
    bind_socket,
    check_text,
    load_json,
    read_body,
    token_estimate,
    until_done_or_gone,
)
from .predictor import CAUSAL_LM, PredictionCancelled, Predictor, TextInput
from .session import SessionConfig

# JSON may spell one character as a 12-byte surrogate-pair escape; bodies past this bound for the
# configured limits are refused before they are read in full.
MAX_BYTES_PER_CHAR = 12
BODY_OVERHEAD_BYTES = 64 * 1024


@dataclass
class ServerConfig:
    """Server and batching settings, one field per `adalora-deploy serve` flag (each field's help is its flag's)."""

    host: str = field(default="127.0.0.1", metadata={"help": "interface to bind (default: 127.0.0.1, local only)"})
    port: int = field(default=8000, metadata={"help": "TCP port (default: %(default)s)"})
    max_batch_size: int = field(default=32, metadata={"help": "most inputs per model call (default: %(default)s)"})
    max_wait_ms: float = field(default=5.0, metadata={
        "help": "longest a request waits for others to share its batch, in ms (default: 5)"})
    max_texts: int = field(default=64, metadata={"help": "most inputs per request (default: %(default)s)"})
    max_chars: int = field(default=10_000, metadata={
        "help": "most characters per text, each side of a pair counted separately (default: %(default)s)"})
    max_queue_texts: int = field(default=1024, metadata={
        "help": "most texts queued or running; more get 503 with Retry-After (default: %(default)s)"})
    max_queue_tokens: int = field(default=131_072, metadata={
        "help": "most tokens (upper-bound estimate) queued or running; more get 503 (default: %(default)s)"})
    max_batch_tokens: int = field(default=8192, metadata={
        "help": "most padded tokens in one model call, bounding activation memory (default: %(default)s)"})
    request_timeout: float = field(default=30.0, metadata={
        "help": "seconds a request may queue and run once its body arrived; then 504 (default: %(default)s)"})
    body_timeout: float = field(default=10.0, metadata={
        "help": "seconds a client has to send its whole request body; then 408 (default: %(default)s)"})
    adapter_root: str | None = field(default=None, metadata={
        "help": "multi: turn on PUT/DELETE /v1/adapters/NAME for packs inside DIR (off by default)", "metavar": "DIR"})

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_texts", "max_chars", "max_queue_texts", "max_queue_tokens",
                     "max_batch_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} ({getattr(self, name)}) must be >= 1")
        if not (math.isfinite(self.max_wait_ms) and 0 <= self.max_wait_ms <= 10_000):
            raise ConfigError(f"max_wait_ms ({self.max_wait_ms}) must be a number of milliseconds in 0..10000")
        for name in ("request_timeout", "body_timeout"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} ({value}) must be a positive number of seconds")
        if self.max_queue_texts < self.max_texts:
            raise ConfigError(f"max_queue_texts ({self.max_queue_texts}) must be >= max_texts ({self.max_texts})")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port ({self.port}) must be in 0..65535")

    @property
    def max_body_bytes(self) -> int:
        return self.max_texts * 2 * self.max_chars * MAX_BYTES_PER_CHAR + BODY_OVERHEAD_BYTES


def parse_inputs(body: bytes, config: ServerConfig) -> list[TextInput]:
    """Decode and check a /v1/predict body; raises RequestError with a 4xx status.

    Args:
        body: the raw request body.
        config: the limits (max_texts, max_chars).

    Returns:
        The inputs: strings, or (text, text_pair) tuples.
    """
    data = load_json(body)
    if not isinstance(data, dict) or set(data) != {"inputs"}:
        raise RequestError(422, 'body must be a JSON object with one key, "inputs": {"inputs": ["text", ...]}')
    return check_inputs(data["inputs"], config)


def check_inputs(inputs, config: ServerConfig) -> list[TextInput]:
    """The checked "inputs" of a /v1/predict body (strings or text pairs, within the limits)."""
    if not isinstance(inputs, list):
        raise RequestError(422, f'"inputs" must be a list of texts, got {type(inputs).__name__}')
    if not inputs:
        raise RequestError(422, '"inputs" is empty: send at least one text')
    if len(inputs) > config.max_texts:
        raise RequestError(413, f"{len(inputs)} inputs in one request; at most {config.max_texts} (--max-texts)")
    return [_check_item(i, item, config.max_chars) for i, item in enumerate(inputs)]


def _check_item(i: int, item, max_chars: int) -> TextInput:
    if isinstance(item, list) and len(item) == 2:
        return tuple(check_text(f"inputs[{i}][{j}]", t, max_chars) for j, t in enumerate(item))
    if not isinstance(item, str):
        raise RequestError(422, f"inputs[{i}] must be a string or a [text, text_pair] pair of strings")
    return check_text(f"inputs[{i}]", item, max_chars)


@dataclass
class _Job:
    inputs: list[TextInput]
    future: asyncio.Future  # cancelled when the client disconnects or its deadline passes
    adapters: list[str] | None = None  # multi graphs: one adapter name per input

    @property
    def dropped(self) -> bool:
        return self.future.done()


_STOP = object()


@dataclass
class BatchStats:
    received: int = 0  # requests queued so far (requests counts those that have run)
    dropped: int = 0  # requests whose client left (or timed out) before they ran
    requests: int = 0
    inputs: int = 0
    batches: int = 0
    largest_batch: int = 0
    model_seconds: float = 0.0  # time in Predictor.predict (tokenize, run, softmax): the model thread's busy time


@dataclass
class MicroBatcher:
    """Groups concurrent requests into model batches.

    Args:
        predictor: the thread-safe Predictor that runs each batch.
        max_batch_size: most inputs per batch (a single larger request runs alone, chunked).
        max_wait_ms: how long the first request of a batch waits for company.
        max_batch_tokens: most padded tokens in one model call.
    """

    predictor: Predictor
    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    max_batch_tokens: int | None = None
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

    async def submit(self, inputs: list[TextInput], adapters: list[str] | None = None) -> list[dict]:
        """Queue one request's inputs (with one adapter name per input on a multi graph); returns one
        record per input once its batch has run. Requests for different adapters share batches.
        Cancelling the caller cancels the job: it is dropped before it runs (or between chunks)."""
        future = asyncio.get_running_loop().create_future()
        self.stats.received += 1
        await self._queue.put(_Job(inputs, future, adapters))
        try:
            return await future
        finally:
            future.cancel()  # no-op when done; otherwise the worker sees the job as dropped

    async def _worker(self) -> None:
        pending = None
        while True:
            first = pending if pending is not None else await self._queue.get()
            if first is _STOP:
                return
            if first.dropped:
                self.stats.dropped += 1
                pending = None
                continue
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
            if job is not _STOP and job.dropped:
                self.stats.dropped += 1
                continue
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
        self._count(batch, sum(len(job.inputs) for job in batch))
        loop = asyncio.get_running_loop()
        try:
            batch, predictions = await loop.run_in_executor(self._executor, self._predict_jobs, batch)
        except PredictionCancelled:  # every client of this batch has gone: its remaining chunks were skipped
            self.stats.dropped += len(batch)
            return
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

    def _predict_jobs(self, batch: list[_Job]) -> tuple[list[_Job], list[dict]]:
        """Run a batch in the model thread (reading done() there is a plain flag read); on a multi graph,
        jobs naming an adapter that is not loaded (or was unloaded since they were queued) get a 404 of
        their own and the others run."""
        while True:
            batch = [job for job in batch if self._adapters_known(job)]
            if not batch:
                return [], []
            flat = [x for job in batch for x in job.inputs]
            adapters = [a for job in batch for a in job.adapters] if batch[0].adapters is not None else None
            start = time.perf_counter()
            try:
                predictions = self.predictor.predict(
                    flat, batch_size=self.max_batch_size, max_batch_tokens=self.max_batch_tokens,
                    should_stop=lambda jobs=batch: all(job.dropped for job in jobs), adapter=adapters,
                )
            except UnknownAdapterError:
                continue  # an adapter was unloaded between the check and the run: check again
            finally:
                self.stats.model_seconds += time.perf_counter() - start  # only this thread writes it
            return batch, predictions.records()

    def _adapters_known(self, job: _Job) -> bool:
        if job.adapters is None:
            return True
        try:
            self.predictor.adapters.state.index(job.adapters)
        except UnknownAdapterError as err:
            job.future.get_loop().call_soon_threadsafe(_fail, job.future, RequestError(404, str(err)))
            return False
        return True

    def _count(self, batch: list[_Job], n_inputs: int) -> None:
        self.stats.requests += len(batch)
        self.stats.inputs += n_inputs
        self.stats.batches += 1
        self.stats.largest_batch = max(self.stats.largest_batch, n_inputs)


def _fail(future: asyncio.Future, err: Exception) -> None:
    if not future.done():
        future.set_exception(err)


def create_app(predictor: Predictor, config: ServerConfig | None = None):
    """The FastAPI application; the micro-batcher starts and drains with the app's lifespan.

    Args:
        predictor: the model to serve.
        config: limits and batching settings.

    Returns:
        A FastAPI app (run it with uvicorn).
    """
    config = config or ServerConfig()
    batcher = MicroBatcher(predictor, config.max_batch_size, config.max_wait_ms, config.max_batch_tokens)
    admission = Admission(config.max_queue_texts, config.max_queue_tokens)

    @asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        yield
        await batcher.stop()
        app.state.generation.shutdown()

    app = FastAPI(title="adalora-deploy", lifespan=lifespan)
    app.state.batcher = batcher
    app.state.admission = admission
    app.state.generation = add_generate_route(app, predictor, config, admission)
    add_adapter_routes(app, predictor, config.adapter_root, RequestError, read_body)

    @app.exception_handler(RequestError)
    async def _bad_request(request, err: RequestError):
        return JSONResponse({"error": err.message}, status_code=err.status, headers=err.headers)

    @app.post("/v1/predict")
    async def predict(request: Request):
        if predictor.task == CAUSAL_LM:
            raise RequestError(422, "this server runs a causal LM: use POST /v1/generate")
        body = await read_body(request, config.max_body_bytes, config.body_timeout)
        if predictor.adapters is not None:
            inputs, adapters = parse_adapter_predict(body, config)
        else:
            inputs, adapters = parse_inputs(body, config), None
        tokens = token_estimate(inputs, predictor.max_length)
        admission.admit(len(inputs), tokens)
        try:
            submitted = batcher.submit(inputs, adapters)
            return {"predictions": await until_done_or_gone(submitted, request, config.request_timeout)}
        finally:
            admission.release(len(inputs), tokens)

    @app.get("/health")
    async def health():
        queue = {"queued_texts": admission.texts, "queued_tokens": admission.tokens, "refused": admission.refused}
        return {"status": "ok", **_describe(predictor), **vars(batcher.stats), **queue}

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
    path: str | os.PathLike, mode: str | None = None, provider: str = "auto", threads: int = 0,
    config: ServerConfig | None = None, log_level: str = "info", adapters: dict[str, str] | None = None,
) -> None:
    """Load an export and serve it until SIGINT/SIGTERM; errors in the model dir raise at start.

    Args:
        path: one mode's directory, or an export root.
        mode: "merged", "factored" or "multi" for an export root (None: merged); given with a mode's own
            directory, it must be that directory's mode.
        provider: "auto", "cuda" or "cpu".
        threads: ONNX Runtime intra-op threads (0: one per core).
        config: host, port, batching and request limits.
        log_level: uvicorn's log level.
        adapters: multi graphs: adapter name -> pack directory, loaded before serving.
    """
    import uvicorn

    config = config or ServerConfig()
    sock = bind_socket(config.host, config.port)  # a taken port fails now, not after the model loads
    session_config = SessionConfig(provider=provider, intra_op_threads=threads)
    predictor = Predictor.from_pretrained(
        path, mode=mode, batch_size=config.max_batch_size, session_config=session_config
    )
    for name, pack in (adapters or {}).items():
        predictor.load_adapter(name, pack)
    if predictor.adapters is not None and not predictor.adapters.state.packs and config.adapter_root is None:
        raise ConfigError("a multi graph needs adapters: pass --adapters NAME=PATH ... and/or --adapter-root DIR")
    print(f"serving {predictor.session.path} on {predictor.provider} at http://{config.host}:{config.port}")
    app = create_app(predictor, config)
    server_config = uvicorn.Config(
        app, host=config.host, port=config.port, log_level=log_level,
        timeout_graceful_shutdown=config.request_timeout + config.body_timeout,
    )
    uvicorn.Server(server_config).run(sockets=[sock])
