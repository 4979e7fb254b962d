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
    daemon = daemon_of(request)
    name = request.match_info.get("name")
    if name is not None:
        served = [_served(request)]
    else:
        manager = daemon.manager
        served = []
        for route in manager.names() if manager is not None else []:
            try:
                served.append(daemon.dataplane.serving(route))
            except ModelNotReady:
                continue
    return json_response(
        {
            "model_stats": [
                daemon.metrics.stats_of(s.route).to_triton(s.route, str(s.version)) for s in served
            ]
        }
    )


@admin_only
async def repository_index(request: web.Request) -> web.Response:
    """Every configured or loaded model, with its state (Triton's repository index)."""
    daemon = daemon_of(request)
    manager = daemon.manager
    routes = {m.name: None for m in daemon.config.models}
    entries = []
    status = {m.name: m for m in manager.status().models} if manager is not None else {}
    for name in [*routes, *(n for n in status if n not in routes)]:
        m = status.get(name)
        if m is None:
            entries.append({"name": name, "state": "UNAVAILABLE", "reason": "unloaded"})
        elif m.ready:
            assert m.version is not None
            entries.append({"name": name, "version": str(m.version.version), "state": "READY"})
        else:
            state = "LOADING" if m.state == "loading" else "UNAVAILABLE"
            entries.append({"name": name, "state": state, "reason": m.waiting_for})
    return json_response(entries)


@admin_only
async def repository_load(request: web.Request) -> web.Response:
    """Serve ``name``: the ref in the request's ``parameters.uri``, else its configured one.
    A loaded route lasts until the next config reload or restart (the config is the truth)."""
    daemon = daemon_of(request)
    name = request.match_info["name"]
    parameters = await _parameters(request)
    uri = parameters.get("uri")
    configured = next((m for m in daemon.config.models if m.name == name), None)
    if uri is None and configured is None:
        raise web.HTTPNotFound(
            text=f"no model {name!r} in the config: give its ref as parameters.uri, e.g. "
            '{"parameters": {"uri": "models:/NAME/VERSION"}}'
        )
    if uri is not None and not isinstance(uri, str):
        raise ProtocolError("parameters.uri must be a model URI string")
    manager = daemon.manager
    if manager is None:
        raise web.HTTPServiceUnavailable(text="modeld is still starting")
    spec = configured.route_spec() if configured is not None else None
    target = uri or (spec.uri if spec else "")

    def load() -> None:
        # The route's own options stay (a served route's, else the configured ones).
        if manager.serves(name):
            manager.update(name, target, **manager.route(name).spec.options())
        else:
            manager.add(name, target, **(spec.options() if spec is not None else {}))
        manager.refresh([name], force=True)

    await daemon.in_load_pool(load)  # a bad URI or option: 400 with the accepted forms
    status = manager.status(name)
    if not status.ready:
        raise web.HTTPServiceUnavailable(text=f"{name} did not load: {status.waiting_for}")
    return json_response({"name": name, "version": str(status.version.version)})  # type: ignore[union-attr]


@admin_only
async def repository_unload(request: web.Request) -> web.Response:
    """Stop serving ``name`` until it is loaded again or the config is reloaded."""
    daemon = daemon_of(request)
    name = request.match_info["name"]
    manager = daemon.manager
    if manager is None or not manager.serves(name):
        raise ModelNotReady(name, manager.names() if manager is not None else [])
    await daemon.in_load_pool(manager.remove, name)
    return json_response({"name": name, "state": "UNAVAILABLE"})


async def _parameters(request: web.Request) -> dict[str, Any]:
    body = await read_body(request)
    if not body.strip():
        return {}
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"invalid JSON: {exc}") from None
    parameters = document.get("parameters", {}) if isinstance(document, dict) else None
    if not isinstance(parameters, dict):
        raise ProtocolError('expected {"parameters": {...}}')
    return parameters


def _served(request: web.Request) -> Served:
    """The route (and version, when the path names one) in the URL, resolved once."""
    return serve_request(
        request, request.match_info["name"], version=request.match_info.get("version")
    )
