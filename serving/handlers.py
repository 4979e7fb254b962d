"""HTTP handlers: MLflow's scoring routes, multi-model routes and status."""

from __future__ import annotations

import asyncio
import hmac
import os
from typing import Any

import orjson
from aiohttp import web

from loader.errors import ModelNotReady
from loader.manager import ModelHandle
from serving import protocol
from serving.app import DAEMON, Daemon
from serving.errors import envelope

HEADER_NAME = "X-Model-Name"
HEADER_VERSION = "X-Model-Version"
HEADER_ROUTE = "X-Model-Route"
HEADER_STALE = "X-Model-Stale"
HEADER_WORKER = "X-Modeld-Worker"


def add_routes(app: web.Application) -> None:
    app.router.add_get("/ping", health)
    app.router.add_get("/health", health)
    app.router.add_get("/version", version)
    app.router.add_post("/invocations", invocations)
    app.router.add_get("/models", list_models)
    app.router.add_get("/models/{name}", get_model)
    app.router.add_post("/models/{name}/invocations", model_invocations)
    app.router.add_get("/metrics", metrics)
    from serving.statuspage import status_page

    app.router.add_get("/", status_page)


PROTECTED_POSTS = ("/invocations", "/models/", "/v2/models/")


@web.middleware
async def prediction_auth(request: web.Request, handler: Any) -> web.StreamResponse:
    """``server.token`` guards prediction routes (probes, status and metrics stay open)."""
    if request.method == "POST" and request.path.startswith(PROTECTED_POSTS):
        token = request.app[DAEMON].config.server.token
        if token and not bearer_matches(request, token):
            raise web.HTTPUnauthorized(
                text="prediction routes need 'Authorization: Bearer <server.token>'",
                headers={"WWW-Authenticate": "Bearer"},
            )
    return await handler(request)


def bearer_matches(request: web.Request, token: str) -> bool:
    """Constant-time check of ``Authorization: Bearer <token>``."""
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        value.strip().encode(), token.encode()
    )


def _daemon(request: web.Request) -> Daemon:
    return request.app[DAEMON]


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps(data, default=str, option=orjson.OPT_NON_STR_KEYS),
        content_type=protocol.JSON,
    )


async def health(request: web.Request) -> web.Response:
    """200 when every configured model is loaded, else 503 saying which are not."""
    daemon = _daemon(request)
    if daemon.start_error:
        return json_response({"status": "failed", "error": daemon.start_error}, 503)
    manager = daemon.manager
    names = [m.name for m in daemon.config.models]
    if manager is None:
        return json_response({"status": "starting", "not_ready": names}, 503)
    not_ready = {}
    for route in manager.routes():
        if route.handle is None:
            problems = [r.reason for r in route.rejections.values()]
            not_ready[route.name] = route.problem or (problems[-1] if problems else "loading")
    if not_ready:
        return json_response({"status": "not ready", "not_ready": not_ready}, 503)
    return web.Response(text="\n", content_type=protocol.JSON)


async def version(request: web.Request) -> web.Response:
    from mlflow.version import VERSION

    return web.Response(text=VERSION, content_type=protocol.JSON)


async def invocations(request: web.Request) -> web.Response:
    daemon = _daemon(request)
    name = daemon.config.default_model
    if name is None:
        served = ", ".join(m.name for m in daemon.config.models) or "none"
        return envelope(
            404,
            f"no default model: POST /models/{{name}}/invocations (served: {served}) or mark one "
            "[[models]] entry default = true",
        )
    return await _invoke(request, daemon, name)


async def model_invocations(request: web.Request) -> web.Response:
    return await _invoke(request, _daemon(request), request.match_info["name"])


async def _invoke(request: web.Request, daemon: Daemon, name: str) -> web.Response:
    # One handle for the whole request, whatever swaps meanwhile.
    handle = serving_handle(daemon, name)
    mime = protocol.check_content_type(request.headers.get("Content-Type"))
    body = await request.read()
    work = daemon.worker(name).submit(handle, body, protocol.MlflowCodec(mime))
    payload = await asyncio.wait_for(work, daemon.config.server.request_timeout_s)
    response = web.Response(body=payload, content_type=protocol.JSON)
    response.headers[HEADER_ROUTE] = name
    response.headers[HEADER_NAME] = handle.version.name
    response.headers[HEADER_VERSION] = str(handle.version.version)
    if handle.stale:
        response.headers[HEADER_STALE] = "true"
    if daemon.config.server.workers > 1:
        response.headers[HEADER_WORKER] = str(os.getpid())
    return response


def require_route(daemon: Daemon, name: str) -> None:
    """404 naming the served models unless ``name`` is one (shared by every route family)."""
    manager = daemon.manager
    names = manager.names() if manager is not None else [m.name for m in daemon.config.models]
    if name not in names:
        served = ", ".join(names) or "none"
        raise web.HTTPNotFound(text=f"no model named {name[:100]!r}; served models: {served}")


def serving_handle(daemon: Daemon, name: str) -> ModelHandle:
    """The handle answering for ``name`` now (404 unknown, 503 not loaded yet)."""
    require_route(daemon, name)
    if daemon.manager is None:
        raise ModelNotReady(name)
    return daemon.manager.get(name)


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text format, collected off the loop (the cache index is on disk) and not in
    the load executor: a scrape must not wait behind a model that takes minutes to load."""
    from prometheus_client import CONTENT_TYPE_LATEST

    daemon = _daemon(request)
    body = await asyncio.to_thread(daemon.metrics.exposition)
    response = web.Response(body=body)
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


async def list_models(request: web.Request) -> web.Response:
    daemon = _daemon(request)
    if daemon.manager is None:
        return json_response({"models": [], "status": daemon.start_error or "starting"})
    return json_response(daemon.manager.status())


async def get_model(request: web.Request) -> web.Response:
    daemon = _daemon(request)
    name = request.match_info["name"]
    require_route(daemon, name)
    if daemon.manager is None:
        raise ModelNotReady(name)
    return json_response(daemon.manager.status(name))
