"""The one place that maps errors to HTTP statuses, with MLflow's envelope as the body."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from loader.errors import ConfigError, InvalidModelURI, LoaderError, ModelNotFound, ModelNotReady
from serving.protocol import JSON, ProtocolError, error_body

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_CODES = {
    400: "BAD_REQUEST",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "RESOURCE_DOES_NOT_EXIST",
    405: "BAD_REQUEST",
    413: "REQUEST_LIMIT_EXCEEDED",
    415: "BAD_REQUEST",
    503: "TEMPORARILY_UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


def envelope(status: int, message: str, error_code: str | None = None) -> web.Response:
    code = error_code or _CODES.get(status, "INTERNAL_ERROR")
    return web.Response(status=status, body=error_body(code, message), content_type=JSON)


def loader_error_response(exc: LoaderError) -> web.Response:
    if isinstance(exc, ModelNotReady):
        return envelope(503, str(exc))
    if isinstance(exc, ModelNotFound):
        return envelope(404, str(exc))
    if isinstance(exc, ConfigError | InvalidModelURI):
        return envelope(400, str(exc), "INVALID_PARAMETER_VALUE")
    log.error("request failed: %s", exc)
    return envelope(500, str(exc), "INTERNAL_ERROR")


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ProtocolError as exc:
        return envelope(exc.status, exc.message, exc.error_code)
    except LoaderError as exc:
        return loader_error_response(exc)
    except web.HTTPRequestEntityTooLarge:
        limit = getattr(request, "_client_max_size", "?")
        return envelope(
            413, f"request body too large: the limit is {limit} bytes (server.max_body_bytes)"
        )
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        reason = exc.text if exc.text and not exc.text.startswith(str(exc.status)) else exc.reason
        return envelope(exc.status, f"{reason}: {request.method} {request.path[:200]}")
    except TimeoutError:
        return envelope(504, "Request processing time exceeded limit (server.request_timeout_s)")
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path[:200])
        return envelope(500, "internal server error (logged on the server)", "INTERNAL_ERROR")
