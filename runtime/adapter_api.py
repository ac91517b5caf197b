"""The adapter routes of a server on a multi graph (docs/adapter_pack.md):

    POST   /v1/predict        {"adapter": "NAME", "inputs": [...]}   ("adapter" may also be one name per input)
    GET    /v1/adapters       -> {"adapters": [{"name", "task", "num_labels", "id2label", "ranks", ...}]}
    PUT    /v1/adapters/NAME  {"path": "DIR"}  load or replace NAME from a pack inside --adapter-root
    DELETE /v1/adapters/NAME  stop serving NAME

PUT and DELETE are off unless the server was started with --adapter-root. A refused load (a path outside
the root, a corrupt pack, a pack of another base model) changes nothing: the loaded adapters keep serving.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from fastapi import Request

from adalora_deploy.errors import AdaLoraDeployError

from .adapters import UnknownAdapterError


def parse_adapter_predict(body: bytes, config) -> tuple[list, list[str]]:
    """(inputs, one adapter name per input) from a multi graph's /v1/predict body."""
    from .limits import RequestError, load_json
    from .server import check_inputs

    data = load_json(body)
    if not isinstance(data, dict) or set(data) != {"adapter", "inputs"}:
        raise RequestError(422, 'body must be a JSON object with "adapter" and "inputs": '
                                '{"adapter": "NAME", "inputs": ["text", ...]}')
    inputs = check_inputs(data["inputs"], config)
    adapter = data["adapter"]
    names = [adapter] * len(inputs) if isinstance(adapter, str) else adapter
    if not isinstance(names, list) or len(names) != len(inputs) or not all(isinstance(n, str) for n in names):
        raise RequestError(422, '"adapter" must be an adapter name, or a list of one name per input')
    return inputs, names


def pack_path(root: str, given, request_error) -> Path:
    """The pack directory a PUT names, resolved (links followed) and refused when outside `root`."""
    if not isinstance(given, str) or not given:
        raise request_error(422, 'body must be {"path": "DIR"}, DIR a pack directory inside --adapter-root')
    base = Path(root).resolve()
    path = (base / given).resolve()  # an absolute `given` replaces base
    if not path.is_relative_to(base):
        raise request_error(403, f"{given} is outside --adapter-root {base}: put the pack inside it")
    return path


def add_adapter_routes(app, predictor, adapter_root: str | None, request_error, read_body) -> None:
    """Register the adapter routes (they answer 404 on a server that is not running a multi graph)."""

    def registry():
        if predictor.adapters is None:
            raise request_error(404, "this server runs one model, not a multi-adapter graph (export --mode multi)")
        return predictor.adapters

    def writable():
        registry()
        if adapter_root is None:
            raise request_error(403, "loading and unloading adapters is off: start the server with --adapter-root DIR")

    @app.get("/v1/adapters")
    async def list_adapters():
        return {"adapters": registry().describe()}

    @app.put("/v1/adapters/{name}")
    async def put_adapter(name: str, request: Request):
        writable()
        from .limits import load_json

        data = load_json(await read_body(request, 64 * 1024, 10.0))
        if not isinstance(data, dict) or set(data) != {"path"}:
            raise request_error(422, 'body must be {"path": "DIR"}')
        path = pack_path(adapter_root, data["path"], request_error)
        start = time.perf_counter()
        try:
            described = await asyncio.to_thread(predictor.load_adapter, name, path)
        except AdaLoraDeployError as err:  # a corrupt pack, another base model, a bad name
            raise request_error(422, str(err)) from err
        return {"adapter": described, "load_ms": round(1000 * (time.perf_counter() - start), 2)}

    @app.delete("/v1/adapters/{name}")
    async def delete_adapter(name: str):
        writable()
        try:
            predictor.unload_adapter(name)
        except UnknownAdapterError as err:
            raise request_error(404, str(err)) from err
        return {"unloaded": name}
