"""What every prediction route shares, whatever its protocol: the prediction token, the request
metrics, the version headers, and its protocol's error envelope.

A prediction handler is wrapped by :func:`prediction`; it resolves its :class:`Served` once
with :func:`serve_request` (which stores it in the request), so metrics and headers read what
answered instead of guessing from paths or response headers.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import Awaitable, Callable

from aiohttp import web

from serving.http.auth import require_token
from serving.http.errors import Style, error_response
from serving.http.keys import SERVED, daemon_of
from serving.runtime.dataplane import Served
from serving.runtime.metrics import UNKNOWN_ROUTE

HEADER_NAME = "X-Model-Name"
HEADER_VERSION = "X-Model-Version"
HEADER_ROUTE = "X-Model-Route"
HEADER_ARM = "X-Model-Arm"
HEADER_STALE = "X-Model-Stale"
HEADER_WORKER = "X-Modeld-Worker"
#: The status counted for a request whose client went away before its answer (nginx's 499).
CLIENT_CLOSED = 499

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def prediction(style: Style) -> Callable[[Handler], Handler]:
    """Wrap a prediction handler: token check, metrics, and errors in ``style``'s envelope."""

    def wrap(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def wrapped(request: web.Request) -> web.StreamResponse:
            daemon = daemon_of(request)
            label = request.match_info.get("name") or daemon.config.default_model or "default"
            if not daemon.dataplane.serves(label):  # labels come from configured routes only
                label = UNKNOWN_ROUTE
            track = daemon.metrics.track(label)
            status, answered = 500, False
            try:
                try:
                    require_token(request, daemon.config.server.token, setting="server.token")
                    response = await handler(request)
                except asyncio.CancelledError:
                    # The client went away (or the server stops): not a server error.
                    status = CLIENT_CLOSED
                    log.debug("%s %s: the client closed the connection", request.method,
                              request.path[:200])  # fmt: skip
                    raise
                except Exception as exc:
                    response = error_response(request, exc, style)
                status, answered = response.status, True
                return response
            finally:
                # The version label, like the version headers, is on answers only.
                served = request.get(SERVED)
                track.done(
                    status,
                    route=served.route if served else None,
                    version=served.version if served and status < 400 else None,
                    answered=answered,
                    arm=(served.name, served.arm) if served and served.arm else None,
                )

        return wrapped

    return wrap


async def read_body(request: web.Request) -> bytes:
    """The whole body, arriving within ``server.body_timeout_s`` (a client sending it slowly,
    or a chunked body that never ends, is answered 408 and its connection closed instead of
    holding a connection and a buffer for ever), decoded from its Content-Encoding off the
    event loop and to ``server.max_body_bytes`` at most (aiohttp's own decoding inflated a
    1 MB gzip bomb on the loop, holding every other request for a second).

    Raises:
        web.HTTPRequestTimeout: the body did not arrive in time.
        ProtocolError: an encoding it cannot decode (415), too large once inflated (413).
    """
    daemon = daemon_of(request)
    if request.content.is_eof():  # all of it came with the headers: nothing to wait for
        body = await request.read()
    else:
        timeout = daemon.config.server.body_timeout_s
        try:
            body = await asyncio.wait_for(request.read(), timeout)
        except TimeoutError:
            raise web.HTTPRequestTimeout(
                text=f"the request body did not arrive within {timeout:g}s (server.body_timeout_s)"
            ) from None
    encoding = request.headers.get("Content-Encoding")
    if encoding and encoding.strip().lower() != "identity":
        body = await daemon.dataplane.inflate(body, encoding, daemon.config.server.max_body_bytes)
    return body


def serve_request(request: web.Request, name: str, *, version: str | None = None) -> Served:
    """Resolve the handle answering ``request`` for route ``name`` (once) and remember it.

    Raises:
        RouteNotFound, ModelNotReady
    """
    served = daemon_of(request).dataplane.serving(
        name, version=version, lookup=lambda source, key: _sticky(request, source, key)
    )
    request[SERVED] = served
    return served


def _sticky(request: web.Request, source: str, key: str) -> str | None:
    """A split's sticky key: a header or a query parameter of the request."""
    return request.headers.get(key) if source == "header" else request.query.get(key)


def answer(request: web.Request, served: Served, body: bytes) -> web.Response:
    """A prediction's response, with the headers saying which version answered."""
    headers = served_headers(request, served)
    headers["Content-Type"] = "application/json"
    return web.Response(body=body, headers=headers)


def version_headers(request: web.Request, served: Served, response: web.StreamResponse) -> None:
    """Set the headers saying which route and version answer on ``response``."""
    response.headers.update(served_headers(request, served))


def served_headers(request: web.Request, served: Served) -> dict[str, str]:
    """The headers saying which route and version answer (and whether stale, which worker)."""
    handle = served.handle
    headers = {
        HEADER_ROUTE: served.name,
        HEADER_NAME: handle.version.name,
        HEADER_VERSION: str(handle.version.version),
    }
    if served.arm is not None:
        headers[HEADER_ARM] = served.arm
    if handle.stale:
        headers[HEADER_STALE] = "true"
    if daemon_of(request).config.server.workers > 1:
        headers[HEADER_WORKER] = str(os.getpid())
    return headers
