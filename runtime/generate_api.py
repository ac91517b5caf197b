"""POST /v1/generate: text generation from a causal-LM export, whole or streamed.

    POST /v1/generate {"inputs": "prompt" | ["prompt", ...], "max_new_tokens": 20, "do_sample": false,
                       "temperature": 1.0, "top_p": 1.0, "seed": null, "stream": false}
      -> {"generations": [{"text", "token_ids", "finish_reason": "eos" | "length"}, ...]}
    with "stream": true -> application/x-ndjson, one JSON object per line as tokens are produced:
      {"index": i, "token_id": t, "text": "<new text>"}        (the last one of a prompt has "finish_reason")
      {"done": true, "generations": [...]}                     (last line, as the non-streamed answer)

Generations run one at a time on their own model thread (the prompts of one request form one
left-padded batch). They have the bounds of /v1/predict (runtime/limits.py, docs/refusals.md): the
prompts and tokens (prompt estimate + max_new_tokens) queued or running are bounded (503 with
Retry-After), a generation that has not completed (or, streamed, not produced its first token) within
--request-timeout gets 504, and a generation whose client disconnected or timed out stops before its
next step, or is dropped before it starts.
"""

from __future__ import annotations

import asyncio
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import StreamingResponse

from adalora_deploy.constants import CAUSAL_LM
from adalora_deploy.errors import ConfigError

from .generate import GenerationConfig
from .limits import (
    Admission,
    RequestError,
    check_text,
    load_json,
    read_body,
    token_estimate,
    until_done_or_gone,
)

MAX_NEW_TOKENS_LIMIT = 1024
OPTION_TYPES = {"max_new_tokens": int, "do_sample": bool, "temperature": float, "top_p": float, "seed": int}


@dataclass
class GenerateRequest:
    prompts: list[str]
    options: dict
    stream: bool


def parse_generate(data, max_texts: int, max_chars: int, request_error) -> GenerateRequest:
    """Check a decoded /v1/generate body; raises request_error(status, message) on anything wrong."""
    if not isinstance(data, dict) or "inputs" not in data:
        raise request_error(422, 'body must be a JSON object with "inputs": {"inputs": "prompt", "max_new_tokens": 20}')
    unknown = sorted(set(data) - {"inputs", "stream", *OPTION_TYPES})
    if unknown:
        raise request_error(422, f"unknown keys {unknown}; allowed: inputs, stream, {', '.join(OPTION_TYPES)}")
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise request_error(422, '"stream" must be true or false')
    return GenerateRequest(_prompts(data["inputs"], max_texts, max_chars, request_error),
                           _options(data, request_error), stream)


def _prompts(inputs, max_texts: int, max_chars: int, request_error) -> list[str]:
    prompts = [inputs] if isinstance(inputs, str) else inputs
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise request_error(422, '"inputs" must be a non-empty prompt or a non-empty list of them')
    if len(prompts) > max_texts:
        raise request_error(413, f"{len(prompts)} prompts in one request; at most {max_texts} (--max-texts)")
    for i, prompt in enumerate(prompts):
        check_text(f"prompt {i}", prompt, max_chars)
    return prompts


def _options(data: dict, request_error) -> dict:
    """The GenerationConfig keywords of the body, type-checked and validated."""
    options = {}
    for key, kind in OPTION_TYPES.items():
        value = data.get(key)
        if value is None:
            continue
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not (isinstance(value, bool) if kind is bool else number and (kind is not int or float(value).is_integer())):
            raise request_error(422, f'"{key}" must be {"true or false" if kind is bool else f"a number ({kind.__name__})"}')
        options[key] = kind(value)
    if options.get("max_new_tokens", 0) > MAX_NEW_TOKENS_LIMIT:
        raise request_error(422, f'"max_new_tokens" is at most {MAX_NEW_TOKENS_LIMIT}')
    try:
        GenerationConfig(**options)
    except ConfigError as err:
        raise request_error(422, str(err)) from err
    return options


def _collect(events: list[dict], n: int) -> list[dict]:
    """The non-streamed answer assembled from stream events."""
    out = [{"text": "", "token_ids": [], "finish_reason": "length"} for _ in range(n)]
    for e in events:
        row = out[e["index"]]
        row["text"] += e["text"]
        row["token_ids"].append(e["token_id"])
        row["finish_reason"] = e.get("finish_reason", row["finish_reason"])
    return out


class GenerationService:
    """Runs generations on one model thread and streams their events to the event loop."""

    def __init__(self, predictor):
        self.predictor = predictor
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adalora-generate")

    async def generate(self, req: GenerateRequest) -> list[dict]:
        """The generations; cancelling the caller stops the work before its next step (or before it starts)."""
        loop = asyncio.get_running_loop()
        cancelled = threading.Event()
        try:
            return await loop.run_in_executor(
                self.executor, lambda: self.predictor.generate(req.prompts, should_stop=cancelled.is_set, **req.options)
            )
        finally:
            cancelled.set()  # the client went away or timed out (no-op once done)

    async def events(self, req: GenerateRequest, on_end=None):
        """NDJSON lines; the first event is produced before this returns, so that a bad request
        (e.g. a prompt too long for the model) still gets a 4xx status instead of a broken stream.
        Cancelling this call before it returns stops the producer; `on_end` runs when the stream ends."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()
        end = object()

        def produce() -> None:
            try:
                if cancelled.is_set():  # dropped while it waited for the model thread
                    return
                for event in self.predictor.stream(req.prompts, **req.options):
                    if cancelled.is_set():
                        break
                    loop.call_soon_threadsafe(queue.put_nowait, event)
                loop.call_soon_threadsafe(queue.put_nowait, end)
            except Exception as err:  # handed to the response, which reports it
                loop.call_soon_threadsafe(queue.put_nowait, err)

        self.executor.submit(produce)
        try:
            first = await queue.get()
        except BaseException:
            cancelled.set()
            raise
        if isinstance(first, Exception):
            cancelled.set()
            raise first

        async def lines():
            seen, item = [], first
            try:
                while item is not end:
                    if isinstance(item, Exception):
                        yield json.dumps({"error": f"generation failed: {item}"}) + "\n"
                        return
                    seen.append(item)
                    yield json.dumps(item) + "\n"
                    item = await queue.get()
                yield json.dumps({"done": True, "generations": _collect(seen, len(req.prompts))}) + "\n"
            finally:
                cancelled.set()  # the client went away, or we are done: stop the producer
                if on_end is not None:
                    on_end()

        return lines()

    def shutdown(self) -> None:
        self.executor.shutdown(wait=True)


def generate_tokens(req: GenerateRequest, max_length: int) -> int:
    """An upper bound of the tokens a generation holds: its prompts' (estimated) and the new ones."""
    new = req.options.get("max_new_tokens", GenerationConfig.max_new_tokens)
    return token_estimate(req.prompts, max_length) + len(req.prompts) * new


def add_generate_route(app, predictor, config, admission: Admission) -> GenerationService:
    """Register POST /v1/generate on `app`; it answers 422 for exports that are not causal LMs. Its
    requests share `admission` (the queue bounds) with /v1/predict."""
    service = GenerationService(predictor)

    @app.post("/v1/generate")
    async def generate(request: Request):
        if predictor.task != CAUSAL_LM:
            raise RequestError(422, f"this server runs a {predictor.task} model: use POST /v1/predict")
        data = load_json(await read_body(request, config.max_body_bytes, config.body_timeout))
        req = parse_generate(data, config.max_texts, config.max_chars, RequestError)
        tokens = generate_tokens(req, predictor.max_length)
        admission.admit(len(req.prompts), tokens)
        streaming = False  # once the stream is handed over, it releases its room when it ends
        try:
            if req.stream:  # the deadline covers the wait for the first token; the stream ends with its client
                release = lambda: admission.release(len(req.prompts), tokens)  # noqa: E731
                lines = await until_done_or_gone(service.events(req, on_end=release), request, config.request_timeout)
                streaming = True
                return StreamingResponse(lines, media_type="application/x-ndjson")
            return {"generations": await until_done_or_gone(service.generate(req), request, config.request_timeout)}
        except ConfigError as err:
            raise RequestError(422, str(err)) from err
        finally:
            if not streaming:
                admission.release(len(req.prompts), tokens)

    return service
