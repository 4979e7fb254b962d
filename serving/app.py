"""The composition root: ``create_app(config)`` wires the layers into one aiohttp application.

Nothing imports this module but the command line (and tests). The request path, left to right:
aiohttp -> :mod:`serving.http` (route family, auth, errors; or grpc -> :mod:`serving.grpc`) ->
:mod:`serving.runtime.dataplane` (the one handle, the route's worker) -> :mod:`serving.codecs`
(bytes <-> model input) -> ``predict`` on the route's thread -> back the same way.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web

from serving.config import Config
from serving.http import admin, mlflow, oip, status
from serving.http.errors import Style, error_middleware, install_protocol_errors
from serving.http.keys import DAEMON
from serving.runtime.lifecycle import Daemon

__all__ = ["DAEMON", "create_app"]


def create_app(config: Config, *, reload: Callable[[], Config] | None = None) -> web.Application:
    """The aiohttp application serving ``config``'s models.

    ``reload`` re-reads the configuration when its file changes (default: the file alone).
    """
    install_protocol_errors(config.server.max_connections)
    daemon = Daemon(config, reload=reload)
    app = web.Application(
        client_max_size=config.server.max_body_bytes,
        middlewares=[error_middleware(Style.MLFLOW)],
        # Bodies are decoded by read_body, off the loop and bounded (aiohttp inflates them
        # as they arrive, on the loop, whoever reads them).
        handler_args={"auto_decompress": False},
    )
    app[DAEMON] = daemon

    async def pipeline(app: web.Application) -> AsyncIterator[None]:
        if config.server.workers > 1:
            # A worker accepts on the shared socket only once its models are loaded, so the
            # kernel never hands a connection to a worker that would answer 503 (at start, after
            # a restart or in a new generation); the other workers answer meanwhile.
            await daemon.start()
        else:
            daemon.spawn(daemon.start())  # listen at once: probes see 503 until loaded
        yield
        await daemon.stop()

    app.cleanup_ctx.append(pipeline)
    if config.server.grpc_port:

        async def grpc_transport(app: web.Application) -> AsyncIterator[None]:
            from serving.grpc import server as grpc_server

            transport = await grpc_server.start(daemon)
            yield
            # SIGTERM: in-flight calls finish (up to the drain timeout), new ones are refused.
            await transport.stop(grace=config.server.drain_timeout_s)

        app.cleanup_ctx.append(grpc_transport)
    mlflow.add_routes(app)
    status.add_routes(app)
    v2 = oip.sub_app()
    v2[DAEMON] = daemon  # read per request: one lookup, not a chain of the apps' mappings
    app.add_subapp(oip.PREFIX, v2)

    def cache_root() -> Any:
        return daemon.manager.source.cache.root if daemon.manager is not None else None

    app.add_subapp(admin.PREFIX, admin.sub_app(cache_root))
    return app
