"""Open Inference Protocol v2 (REST), as spoken by KServe, Triton and MLServer clients: a
sub-app at ``/v2`` whose every failure has the protocol's ``{"error": "..."}`` body.

``/v2`` (server metadata), ``/v2/health/live``, ``/v2/health/ready``,
``/v2/models/{name}[/versions/{v}]`` (metadata), ``.../ready``, ``.../infer`` and ``.../stats``
(Triton's statistics extension), and the model repository extension
(``/v2/repository/index``, ``/v2/repository/models/{name}/load`` and ``/unload``, behind the
admin token). Inference goes through the same data plane (and batching) as ``/invocations``,
and its answers carry the same ``X-Model-*`` headers.
"""

from __future__ import annotations

from importlib.metadata import version as package_version
from typing import Any

import orjson
from aiohttp import web

from loader.errors import ModelNotReady
from serving.codecs.base import ProtocolError
from serving.codecs.oip import OipCodec, model_metadata
from serving.http.admin import admin_only
from serving.http.errors import Style, error_middleware, error_response, json_response
from serving.http.keys import daemon_of
from serving.http.predict import answer, prediction, read_body, serve_request
from serving.runtime import repository
from serving.runtime.dataplane import Served

PREFIX = "/v2"
#: What ``GET /v2`` advertises, by the names clients look for.
EXTENSIONS = ["binary_tensor_data", "classification", "model_repository", "statistics"]


def sub_app() -> web.Application:
    app = web.Application(middlewares=[error_middleware(Style.OIP)])
    r = app.router
    r.add_get("", server_metadata)
    r.add_get("/", server_metadata)
    r.add_get("/health/live", live)
    r.add_get("/health/ready", ready)
    for prefix in ("/models/{name}", "/models/{name}/versions/{version}"):
        r.add_get(prefix, metadata)
        r.add_get(prefix + "/ready", model_ready)
        r.add_post(prefix + "/infer", infer)
        r.add_get(prefix + "/stats", stats)
    r.add_get("/models/stats", stats)
    r.add_post("/repository/index", repository_index)
    r.add_post("/repository/models/{name}/load", repository_load)
    r.add_post("/repository/models/{name}/unload", repository_unload)
    return app


async def server_metadata(request: web.Request) -> web.Response:
    return json_response(
        {"name": "modeld", "version": package_version("modeld"), "extensions": EXTENSIONS}
    )


async def live(request: web.Request) -> web.Response:
    return json_response({"live": True})


async def ready(request: web.Request) -> web.Response:
    manager = daemon_of(request).manager
    ok = manager is not None and daemon_of(request).dataplane.ready(manager.status())
    return json_response({"ready": ok}, 200 if ok else 503)


async def model_ready(request: web.Request) -> web.Response:
    try:
        served = _served(request)
    except ModelNotReady as exc:
        return error_response(request, exc, Style.OIP)
    return json_response({"name": served.route, "ready": True})


async def metadata(request: web.Request) -> web.Response:
    served = _served(request)
    return json_response(model_metadata(served.route, served.version, served.handle.model.metadata))


@prediction(Style.OIP)
async def infer(request: web.Request) -> web.Response:
    served = _served(request)
    body = await read_body(request)
    codec = OipCodec(request.headers.get("Inference-Header-Content-Length"))
    payload = await daemon_of(request).dataplane.predict(
        served, body, codec, headers=request.headers, endpoint=request.path
    )
    response = answer(request, served, payload)
    if codec.header_length is not None:  # binary tensors follow the JSON
        response.content_type = "application/octet-stream"
        response.headers["Inference-Header-Content-Length"] = str(codec.header_length)
    return response


async def stats(request: web.Request) -> web.Response:
    """Triton's statistics extension, from the counters the metrics keep."""
    served = [_served(request)] if "name" in request.match_info else None
    return json_response({"model_stats": repository.statistics(daemon_of(request), served)})


@admin_only
async def repository_index(request: web.Request) -> web.Response:
    """Every configured or loaded model, with its state (Triton's repository index)."""
    ready_only = (await _document(request)).get("ready", False)
    if not isinstance(ready_only, bool):
        raise ProtocolError("'ready' must be true or false")
    entries = repository.index(daemon_of(request), ready_only=ready_only)
    return json_response([e.to_json() for e in entries])


@admin_only
async def repository_load(request: web.Request) -> web.Response:
    """Serve ``name``: the ref in the request's ``parameters.uri``, else its configured one."""
    name = request.match_info["name"]
    parameters = await _parameters(request)
    repository.check_load_parameters(parameters)
    uri = parameters.get(repository.URI)
    if uri is not None and not isinstance(uri, str):
        raise ProtocolError("parameters.uri must be a model URI string")
    version = await repository.load(daemon_of(request), name, uri)
    return json_response({"name": name, "version": version})


@admin_only
async def repository_unload(request: web.Request) -> web.Response:
    """Stop serving ``name`` until it is loaded again or the config is reloaded."""
    name = request.match_info["name"]
    await repository.unload(daemon_of(request), name)
    return json_response({"name": name, "state": repository.UNAVAILABLE})


async def _document(request: web.Request) -> dict[str, Any]:
    body = await read_body(request)
    if not body.strip():
        return {}
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"invalid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise ProtocolError("expected a JSON object")
    return document


async def _parameters(request: web.Request) -> dict[str, Any]:
    parameters = (await _document(request)).get("parameters", {})
    if not isinstance(parameters, dict):
        raise ProtocolError('expected {"parameters": {...}}')
    return parameters


def _served(request: web.Request) -> Served:
    """The route (and version, when the path names one) in the URL, resolved once."""
    return serve_request(
        request, request.match_info["name"], version=request.match_info.get("version")
    )
