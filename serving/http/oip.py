"""Open Inference Protocol v2 (REST), as spoken by KServe, Triton and MLServer clients: a
sub-app at ``/v2`` whose every failure has the protocol's ``{"error": "..."}`` body.

``/v2`` (server metadata), ``/v2/health/live``, ``/v2/health/ready``,
``/v2/models/{name}[/versions/{v}]`` (metadata), ``.../ready`` and ``.../infer``. Inference goes
through the same data plane (and batching) as ``/invocations``, and its answers carry the same
``X-Model-*`` headers.
"""

from __future__ import annotations

from importlib.metadata import version as package_version

from aiohttp import web

from loader.errors import ModelNotReady
from serving.codecs.oip import OipCodec, model_metadata
from serving.http.errors import Style, error_middleware, error_response, json_response
from serving.http.keys import daemon_of
from serving.http.predict import answer, prediction, serve_request
from serving.runtime.dataplane import Served

PREFIX = "/v2"


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
    return app


async def server_metadata(request: web.Request) -> web.Response:
    return json_response(
        {"name": "modeld", "version": package_version("modeld"), "extensions": ["binary_data"]}
    )


async def live(request: web.Request) -> web.Response:
    return json_response({"live": True})


async def ready(request: web.Request) -> web.Response:
    manager = daemon_of(request).manager
    ok = manager is not None and manager.status().ready
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
    body = await request.read()
    codec = OipCodec(request.headers.get("Inference-Header-Content-Length"))
    payload = await daemon_of(request).dataplane.predict(served, body, codec)
    return answer(request, served, payload)


def _served(request: web.Request) -> Served:
    """The route (and version, when the path names one) in the URL, resolved once."""
    return serve_request(
        request, request.match_info["name"], version=request.match_info.get("version")
    )
