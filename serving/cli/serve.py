"""``modeld serve``: run the application on a TCP port or a Unix socket until a signal."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from serving.config import Config

log = logging.getLogger("modeld")


def serve(
    config: Config, *, banner: str | None = None, reload: Callable[[], Config] | None = None
) -> int:
    from aiohttp import web

    from serving.app import create_app
    from serving.logsetup import setup_logging

    setup_logging(config.server.log_level, config.server.log_format)
    app = create_app(config, reload=reload)
    server = config.server
    ssl_context = None
    if server.ssl_certfile:
        import ssl

        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_context.load_cert_chain(server.ssl_certfile, server.ssl_keyfile)
    where: dict[str, Any]
    if server.unix_socket:
        where = {"path": server.unix_socket}
        address = f"unix:{server.unix_socket}"
    else:
        where = {"host": server.host, "port": server.port, "reuse_port": server.workers > 1}
        address = f"{'https' if ssl_context else 'http'}://{server.host}:{server.port}"

    async def announce(_: web.Application) -> None:
        routes = ", ".join(f"{m.name}={m.uri}" for m in config.models)
        log.info("modeld listening on %s serving %s", address, routes)
        if banner:
            print(banner, flush=True)

    app.on_startup.append(announce)
    web.run_app(
        app,
        **where,
        ssl_context=ssl_context,
        shutdown_timeout=config.server.drain_timeout_s,
        access_log=None,
        print=None,
        handle_signals=True,
    )
    log.info("modeld stopped")
    return 0
