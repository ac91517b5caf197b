"""What keeps the server bounded under load and hostile input (docs/refusals.md):

- request bodies: a byte limit and a deadline for receiving them (slow clients get 408);
- JSON: too deep nesting and oversized integers answer 400, never a 500;
- admission: the texts and (estimated) tokens waiting in the queue are bounded; past the bound a
  request gets 503 with Retry-After instead of waiting behind minutes of work;
- deadlines: work is awaited until it is done, its client disconnects (dropped before it runs) or
  --request-timeout passes (504);
- the listening socket is bound before the model loads, so a busy port fails fast.
"""

from __future__ import annotations

import asyncio
import errno
import json
import math
import socket
from dataclasses import dataclass

from adalora_deploy.errors import ConfigError


class RequestError(Exception):
    """A bad request: its HTTP status and a message for the client (and optional headers)."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


def check_text(where: str, text, max_chars: int) -> str:
    """A text of a request body, checked: a string, at most max_chars long, valid Unicode."""
    if not isinstance(text, str):
        raise RequestError(422, f"{where} must be a string, got {type(text).__name__}")
    if len(text) > max_chars:
        raise RequestError(413, f"{where} has {len(text)} characters; at most {max_chars} (--max-chars)")
    try:
        text.encode("utf-8")  # JSON escapes can smuggle in lone surrogates, which no tokenizer takes
    except UnicodeEncodeError as err:
        raise RequestError(400, f"{where} is not valid Unicode (lone surrogate at {err.start})") from err
    return text


def load_json(body: bytes) -> object:
    """Decode a JSON body; every malformed or hostile body raises RequestError 400."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RequestError(400, f"request body is not valid UTF-8 (byte {err.start})") from err
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise RequestError(400, f"malformed JSON: {err.msg} at line {err.lineno} column {err.colno}") from err
    except RecursionError:  # the C decoder recurses once per level: ~1,000 levels exhaust the stack
        raise RequestError(400, "JSON nested too deeply") from None
    except ValueError as err:  # e.g. an integer of 100,000 digits (over sys.get_int_max_str_digits)
        raise RequestError(400, f"unreadable JSON ({str(err)[:120]})") from None


async def read_body(request, limit: int, timeout: float | None = None) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes, and with 408 when it has
    not arrived in full within `timeout` seconds (a slow or stalled client)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"request body of {declared} bytes is over the limit of {limit} bytes")

    async def receive() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(413, f"request body is over the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(receive(), timeout)
    except asyncio.TimeoutError:
        raise RequestError(408, f"the request body did not arrive within {timeout:g} s") from None


async def until_done_or_gone(work, request, timeout: float):
    """Await `work`, cancelling it when the client disconnects (499-like: nobody reads the answer)
    or after `timeout` seconds (504)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, gone}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        if gone in done:
            raise RequestError(499, "client closed the request")
        raise RequestError(504, f"the request did not complete within {timeout:g} s (--request-timeout); retry later")
    finally:
        task.cancel()
        gone.cancel()


async def _disconnected(request) -> None:
    # After the body has been read, the next ASGI message is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


def token_estimate(inputs: list, max_length: int) -> int:
    """An upper bound of the tokens `inputs` will have after truncation to max_length: a text of n
    characters has at most n + 2 tokens here (no token is empty; [CLS]/[SEP] added)."""
    total = 0
    for item in inputs:
        chars = len(item) if isinstance(item, str) else sum(len(t) for t in item) + 1
        total += min(chars + 2, max_length)
    return total


@dataclass
class Admission:
    """Counts what waits or runs in the batcher, and refuses work beyond the bounds.

    Args:
        max_texts: most inputs queued or running at once.
        max_tokens: most (estimated) tokens queued or running at once.
        drain_tokens_per_s: a throughput estimate for the Retry-After hint.
    """

    max_texts: int
    max_tokens: int
    drain_tokens_per_s: float = 20_000.0
    texts: int = 0
    tokens: int = 0
    refused: int = 0

    def admit(self, texts: int, tokens: int) -> None:
        """Reserve room for one request, or raise RequestError 503 with Retry-After."""
        if self.texts and (self.texts + texts > self.max_texts or self.tokens + tokens > self.max_tokens):
            self.refused += 1
            retry = max(1, math.ceil(self.tokens / self.drain_tokens_per_s))
            raise RequestError(
                503, f"server busy: {self.texts} texts ({self.tokens} tokens) already queued; retry in {retry} s",
                headers={"Retry-After": str(retry)},
            )
        self.texts += texts
        self.tokens += tokens

    def release(self, texts: int, tokens: int) -> None:
        self.texts -= texts
        self.tokens -= tokens


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind the listening socket now (before the model loads), as uvicorn would; a taken port, a
    privileged one or an unknown host raises ConfigError with what to do."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as err:
        raise ConfigError(f"cannot resolve --host {host!r} ({err}): pass an address such as 127.0.0.1 or 0.0.0.0") from None
    family, _, proto, _, address = infos[0]
    # The protocol must be IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on connections of sockets
    # that say so. Without it Nagle holds the body segment of each response (written after its headers)
    # until the client's delayed ACK, about 40 ms per request on loopback.
    sock = socket.socket(family, socket.SOCK_STREAM, proto or socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind(address)
    except PermissionError:
        sock.close()
        raise ConfigError(f"port {port} needs privileges to bind: choose --port 1024 or above") from None
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise ConfigError(f"port {port} on {host} is already in use: stop the other server or choose another --port") from None
        raise ConfigError(f"cannot listen on {host}:{port} ({err.strerror}): check --host and --port") from None
    sock.set_inheritable(True)
    return sock
