"""The one place that maps errors to HTTP statuses, and the two envelopes they are sent in.

Every route family speaks one error style: MLflow's ``{"error_code", "message"}`` everywhere
but under ``/v2``, where the Open Inference Protocol's ``{"error": "..."}`` is used. A handler
may raise anything; :func:`error_response` turns it into the same status and message in either
style. ``WWW-Authenticate`` and ``Allow`` headers of aiohttp's exceptions are kept.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from enum import Enum
from typing import Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Middleware
from aiohttp.web_protocol import RequestPayloadError

from loader.errors import (
    ConfigError,
    InvalidModelURI,
    LoaderError,
    ModelNotFound,
    ModelNotReady,
    RegistryUnavailable,
    WorkerUnavailable,
)
from serving.codecs.base import (
    ProtocolError,
    TooLarge,
    UnsupportedMediaType,
    mlflow_error_body,
    oip_error_body,
)
from serving.http.keys import DAEMON
from serving.runtime.dataplane import RouteNotFound

log = logging.getLogger(__name__)

JSON = "application/json"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_CODES = {
    400: "BAD_REQUEST",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "RESOURCE_DOES_NOT_EXIST",
    405: "BAD_REQUEST",
    408: "BAD_REQUEST",
    413: "REQUEST_LIMIT_EXCEEDED",
    415: "BAD_REQUEST",
    503: "TEMPORARILY_UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
_KEPT_HEADERS = ("WWW-Authenticate", "Allow")


class Style(Enum):
    MLFLOW = "mlflow"
    OIP = "oip"


def classify(request: web.Request, exc: BaseException) -> tuple[int, str, str]:
    """(HTTP status, MLflow error code, message) for ``exc``, the one error map."""
    if isinstance(exc, UnsupportedMediaType):
        return 415, exc.error_code, exc.message
    if isinstance(exc, TooLarge):
        return 413, exc.error_code, exc.message
    if isinstance(exc, ProtocolError):
        return 400, exc.error_code, exc.message
    if isinstance(exc, RouteNotFound):
        return 404, _CODES[404], exc.message
    if isinstance(exc, ModelNotReady | RegistryUnavailable | WorkerUnavailable):
        return 503, _CODES[503], str(exc)
    if isinstance(exc, ModelNotFound):
        return 404, _CODES[404], str(exc)
    if isinstance(exc, ConfigError | InvalidModelURI):
        return 400, "INVALID_PARAMETER_VALUE", str(exc)
    if isinstance(exc, LoaderError):
        log.error("request failed: %s", exc)
        return 500, "INTERNAL_ERROR", str(exc)
    if isinstance(exc, RequestPayloadError):  # e.g. a corrupt gzip or brotli body
        reason = str(exc).strip().splitlines()[-1].strip() if str(exc).strip() else ""
        return 400, _CODES[400], f"the request body could not be read: {reason[:200]}"
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        limit = getattr(request, "_client_max_size", "?")
        return (
            413,
            _CODES[413],
            f"request body too large: the limit is {limit} bytes (server.max_body_bytes)",
        )
    if isinstance(exc, web.HTTPException) and exc.status >= 400:
        text = exc.text or ""
        reason = text if text and not text.startswith(str(exc.status)) else exc.reason
        return (
            exc.status,
            _CODES.get(exc.status, "INTERNAL_ERROR"),
            f"{reason}: {request.method} {request.path[:200]}",
        )
    if isinstance(exc, TimeoutError):
        return 504, _CODES[504], "Request processing time exceeded limit (server.request_timeout_s)"
    log.error("unhandled error on %s %s", request.method, request.path[:200], exc_info=exc)
    return 500, "INTERNAL_ERROR", "internal server error (logged on the server)"


def error_response(request: web.Request, exc: BaseException, style: Style) -> web.Response:
    """The response for ``exc`` in ``style``'s envelope (MLflow's carries the model's
    ``stack_trace`` when ``server.stack_traces`` is on)."""
    status, code, message = classify(request, exc)
    if style is Style.OIP:
        body = oip_error_body(message)
    else:
        trace = getattr(exc, "stack_trace", None) if _stack_traces(request) else None
        body = mlflow_error_body(code, message, trace)
    response = web.Response(status=status, body=body, content_type=JSON)
    if isinstance(exc, web.HTTPException):
        for name in _KEPT_HEADERS:
            if name in exc.headers:
                response.headers[name] = exc.headers[name]
    if isinstance(exc, web.HTTPRequestTimeout) or (
        isinstance(exc, web.HTTPRequestEntityTooLarge) and _inflating(request)
    ):
        # A body that will not arrive, or a large compressed one already too large (aiohttp
        # would drain it through the decompressor without yielding: a 1 MB gzip bomb held
        # every probe for seconds): answer, then close without reading the rest.
        close_after_answer(request, response)
    return response


def close_after_answer(request: web.Request, response: web.StreamResponse) -> None:
    """Send ``response``, then close the connection without reading what is left of the body.

    aiohttp reads an unread body to its end ("lingering", up to 10 s) before it closes; its
    only switch is the protocol's lingering time (private: there is no per-request setting).
    ``force_close()`` on the protocol would drop the answer with the connection."""
    response.force_close()
    if hasattr(request.protocol, "_lingering_time"):
        request.protocol._lingering_time = 0.0


#: A compressed remainder up to this size inflates to at most ~64 MB (deflate's ratio is at
#: most ~1:1000): drained in tens of ms, so the client reads its 413 on a kept connection.
_DRAIN_COMPRESSED_BYTES = 64 * 1024


def _inflating(request: web.Request) -> bool:
    """Whether draining this request's unread body would inflate a lot on the event loop."""
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        return False
    length = request.content_length
    return length is None or length > _DRAIN_COMPRESSED_BYTES


def _stack_traces(request: web.Request) -> bool:
    daemon = request.config_dict.get(DAEMON)
    return bool(daemon and daemon.config.server.stack_traces)


def envelope(status: int, message: str, error_code: str | None = None) -> web.Response:
    """An MLflow-style error response a handler returns itself (not an exception)."""
    code = error_code or _CODES.get(status, "INTERNAL_ERROR")
    return web.Response(status=status, body=mlflow_error_body(code, message), content_type=JSON)


def error_middleware(style: Style) -> Middleware:
    """Turn whatever a handler raises into ``style``'s error response (redirects pass)."""

    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except asyncio.CancelledError:
            raise
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return error_response(request, exc, style)
        except Exception as exc:
            return error_response(request, exc, style)

    return errors


#: Open connections one process keeps (0: no cap); set by :func:`install_protocol_errors`.
_connection_cap = {"limit": 0, "logged": False}


def connection_cap(configured: int) -> int:
    """The connection cap: ``configured``, else (0) the descriptor limit less a reserve for
    models, the cache and logs, so a flood of connections meets a cap and one log line
    instead of EMFILE on every accept."""
    if configured:
        return configured
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 0
    return max(16, int(soft * 0.8) - 64)


def install_protocol_errors(max_connections: int = 0) -> None:
    """Replace aiohttp's own error page for requests it cannot parse (bad header bytes, a bad
    URL, a bad Content-Length...): its body quoted the offending request line, which can be an
    ``Authorization`` header, and each one logged an ERROR traceback. Ours: MLflow's envelope
    with the reason only (never the bytes), logged at DEBUG; the connection closes, as before.
    Also caps open connections at ``max_connections`` (see :func:`connection_cap`): one over
    is closed at once, and the first time is logged. aiohttp has settings for neither, so its
    ``RequestHandler.handle_error`` and ``connection_made`` are wrapped once per process."""
    from aiohttp import web_protocol

    _connection_cap["limit"] = connection_cap(max_connections)
    handler_class: Any = web_protocol.RequestHandler
    if getattr(handler_class, "_modeld_errors", False):
        return
    original = handler_class.handle_error
    original_made = handler_class.connection_made

    def connection_made(self: Any, transport: Any) -> None:
        original_made(self, transport)
        limit = _connection_cap["limit"]
        manager = getattr(self, "_manager", None)
        if limit and manager is not None and len(manager.connections) > limit:
            if not _connection_cap["logged"]:
                _connection_cap["logged"] = True
                log.warning(
                    "%d open connections: new ones are closed at once until some end "
                    "(server.max_connections = %d; logged once)",
                    len(manager.connections),
                    limit,
                )
            transport.close()

    def handle_error(
        self: Any,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500 or request.writer.output_size > 0:
            return original(self, request, status, exc, message)
        log.debug("unparseable request from %s: %s", request.remote, _reason(exc, message))
        response = web.Response(
            status=status,
            body=mlflow_error_body(
                _CODES.get(status, "BAD_REQUEST"),
                f"malformed HTTP request: {_reason(exc, message)}",
            ),
            content_type=JSON,
        )
        response.force_close()
        return response

    handler_class.handle_error = handle_error
    handler_class.connection_made = connection_made
    handler_class._modeld_errors = True


def _reason(exc: BaseException | None, message: str | None) -> str:
    """The parser's reason without the request bytes it quotes (its first line)."""
    text = str(getattr(exc, "message", None) or message or exc or "bad request")
    first = text.strip().splitlines()[0] if text.strip() else "bad request"
    return first.rstrip(":").strip()[:200]


def json_response(data: object, status: int = 200) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps(data, default=str, option=orjson.OPT_NON_STR_KEYS),
        content_type=JSON,
    )
