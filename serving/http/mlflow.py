"""MLflow's scoring routes (``/ping``, ``/health``, ``/version``, ``/invocations``) and the
multi-model routes (``/models``, ``/models/{name}``, ``/models/{name}/invocations``)."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from loader.errors import ModelNotReady
from serving.codecs.base import Limits
from serving.codecs.mlflow import JSON, MlflowCodec, check_content_type
from serving.http.errors import Style, json_response
from serving.http.keys import daemon_of
from serving.http.predict import answer, prediction, read_body, serve_request, version_headers
from serving.runtime.dataplane import Served
from serving.runtime.streaming import Stream, streaming_request


def add_routes(app: web.Application) -> None:
    app.router.add_get("/ping", health)
    app.router.add_get("/health", health)
    app.router.add_get("/version", version)
    app.router.add_post("/invocations", invocations)
    app.router.add_get("/models", list_models)
    app.router.add_get("/models/{name}", get_model)
    app.router.add_post("/models/{name}/invocations", model_invocations)


async def health(request: web.Request) -> web.Response:
    """200 when every configured model is loaded, else 503 saying which are not."""
    daemon = daemon_of(request)
    if daemon.start_error:
        return json_response({"status": "failed", "error": daemon.start_error}, 503)
    if daemon.manager is None:
        names = [m.name for m in daemon.config.models]
        return json_response({"status": "starting", "not_ready": names}, 503)
    not_ready = daemon.dataplane.unready(daemon.manager.status())
    if not_ready:
        return json_response({"status": "not ready", "not_ready": not_ready}, 503)
    return web.Response(text="\n", content_type=JSON)


async def version(request: web.Request) -> web.Response:
    from mlflow.version import VERSION

    return web.Response(text=VERSION, content_type=JSON)


@prediction(Style.MLFLOW)
async def invocations(request: web.Request) -> web.StreamResponse:
    return await _invoke(request, daemon_of(request).dataplane.default_route())


@prediction(Style.MLFLOW)
async def model_invocations(request: web.Request) -> web.StreamResponse:
    return await _invoke(request, request.match_info["name"])


async def _invoke(request: web.Request, name: str) -> web.StreamResponse:
    served = serve_request(request, name)  # one handle for the whole request
    mime = check_content_type(request.headers.get("Content-Type"))
    body = await read_body(request)
    if mime == JSON and b'"stream"' in body:
        document = await asyncio.to_thread(streaming_request, body)
        if document is not None:
            return await _stream(request, served, document)
    daemon = daemon_of(request)
    server = daemon.config.server
    codec = MlflowCodec(mime, Limits(server.max_cells, server.max_columns))
    payload = await daemon.dataplane.predict(
        served, body, codec, headers=request.headers, endpoint=request.path
    )
    return answer(request, served, payload)


async def _stream(
    request: web.Request, served: Served, document: dict[str, Any]
) -> web.StreamResponse:
    """``"stream": true``: the model's ``predict_stream`` as server-sent events. Until the
    first chunk an error is an ordinary JSON error; after it, an error event."""
    stream = Stream(served, document, timeout_s=daemon_of(request).config.server.request_timeout_s)
    try:
        first = await stream.first()
        response = web.StreamResponse(headers={"Cache-Control": "no-cache"})
        response.content_type = "text/event-stream"
        version_headers(request, served, response)
        await response.prepare(request)
        if first is not None:
            await response.write(first)
        async for chunk in stream.rest():
            await response.write(chunk)
        await response.write_eof()
        return response
    finally:
        stream.close()  # the caller went away, or the stream ended: stop the generator


async def list_models(request: web.Request) -> web.Response:
    """Every route's status; with --workers, every worker's view merged (``workers``)."""
    daemon = daemon_of(request)
    if daemon.manager is None:
        return json_response({"models": [], "status": daemon.start_error or "starting"})
    return json_response(await asyncio.to_thread(daemon.status_view))


async def get_model(request: web.Request) -> web.Response:
    daemon = daemon_of(request)
    name = request.match_info["name"]
    daemon.dataplane.require(name)
    if daemon.manager is None:
        raise ModelNotReady(name)
    return json_response(await asyncio.to_thread(daemon.status_view, name))
