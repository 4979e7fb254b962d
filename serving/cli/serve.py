"""``modeld serve``: run the application on a TCP port or a Unix socket until a signal."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from serving.config import Config
from serving.runtime.edits import RELAY_SIGNAL
from serving.runtime.supervisor import inherited_socket, is_worker

log = logging.getLogger("modeld")
EXIT_CANNOT_LISTEN = 1
BACKLOG = 128
PR_SET_DUMPABLE = 4
#: How long a stopping server waits for the first request of connections it has just accepted.
FIRST_REQUEST_GRACE_S = 0.5


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port``.

    Raises:
        OSError: the address is taken, not local, or not allowed (the caller says which).
    """
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    return socket.create_server((host, port), family=family, backlog=BACKLOG)


def cannot_listen(host: str, port: int, exc: OSError) -> int:
    print(
        f"modeld: cannot listen on {host}:{port}: {os.strerror(exc.errno) if exc.errno else exc} "
        "(is another server "
        "using the port? pick another with --port)",
        file=sys.stderr,
    )
    return EXIT_CANNOT_LISTEN


def keep_secrets_in(config: Config) -> bool:
    """With a token or webhook secret loaded, make this process non-dumpable (Linux): no core
    file, and no ptrace or /proc/PID/mem by other processes of the same user, can read them
    out of memory. Returns whether it did."""
    secrets = (config.server.token, config.admin.token, config.admin.webhook_secret)
    if not any(secrets) or not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def serve(config: Config, *, reload: Callable[[], Config] | None = None) -> int:
    from aiohttp import web

    from serving.app import create_app
    from serving.logsetup import setup_logging

    setup_logging(config.server.log_level, config.server.log_format)
    if keep_secrets_in(config):
        log.debug("tokens loaded: this process is not dumpable")
    server = config.server
    sock = inherited_socket()  # a --workers worker: the supervisor's, shared by all
    if sock is None and not server.unix_socket:
        # Bind before anything starts: a port in use is a clear error at once, not a
        # "listening" line and a stop that waits for the models to load.
        try:
            sock = bind(server.host, server.port)
        except OSError as exc:
            return cannot_listen(server.host, server.port, exc)
    app = create_app(config, reload=reload)
    ssl_context = None
    if server.ssl_certfile:
        import ssl

        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_context.load_cert_chain(server.ssl_certfile, server.ssl_keyfile)
    if server.unix_socket:
        address = f"unix:{server.unix_socket}"
    else:
        assert sock is not None
        scheme = "https" if ssl_context else "http"
        address = f"{scheme}://{server.host}:{sock.getsockname()[1]}"

    async def announce(_: web.Application) -> None:
        routes = ", ".join(f"{m.name}={m.uri}" for m in config.models)
        log.info("modeld listening on %s serving %s", address, routes)

    async def reload_on_hangup(app: web.Application) -> None:
        """SIGHUP re-reads the config, as daemons do (it used to kill modeld at once)."""
        from serving.app import DAEMON

        daemon = app[DAEMON]

        def hangup() -> None:
            log.info("SIGHUP: reloading the config")
            daemon.spawn(daemon.reload_config())

        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, hangup)
        if is_worker():  # --workers: another worker made a runtime edit
            loop.add_signal_handler(RELAY_SIGNAL, lambda: daemon.spawn(daemon.apply_edits()))
            daemon.spawn(daemon.apply_edits())  # one made before this handler was set

    app.on_startup.append(announce)
    app.on_startup.append(reload_on_hangup)

    def site(runner: web.AppRunner) -> web.BaseSite:
        if server.unix_socket:
            return web.UnixSite(runner, server.unix_socket, ssl_context=ssl_context)
        assert sock is not None
        return web.SockSite(runner, sock, ssl_context=ssl_context)

    run_until_signal(app, site, drain_timeout_s=config.server.drain_timeout_s)
    log.info("modeld stopped")
    return 0


def run_until_signal(app: Any, site: Callable[[Any], Any], *, drain_timeout_s: float) -> None:
    """Serve ``app`` on ``site(runner)`` until SIGTERM or SIGINT, then drain: what aiohttp's
    ``run_app`` does, with one step more between "stop accepting" and "close idle connections".

    aiohttp closes every connection with no request in progress as soon as it stops
    accepting, which includes connections it has just accepted whose request has not been
    read yet: their clients get no answer. Those are given :data:`FIRST_REQUEST_GRACE_S` to
    deliver it. It matters most with ``--workers``, where an old generation is stopped at every
    roll while clients keep connecting to the shared socket.
    """
    from aiohttp import web

    async def main() -> None:
        runner = web.AppRunner(
            app, handle_signals=True, access_log=None, shutdown_timeout=drain_timeout_s
        )
        started = None
        try:
            await runner.setup()  # loads the models; SIGTERM meanwhile ends it
            started = site(runner)
            await started.start()
            await asyncio.Event().wait()  # until a signal cancels this task
        finally:
            if started is not None and runner.server is not None:
                await started.stop()  # no new connections (workers: the others accept them)
                await _first_requests(runner.server.connections, FIRST_REQUEST_GRACE_S)
            await runner.cleanup()

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    task = loop.create_task(main())
    try:
        loop.run_until_complete(task)
    except (web.GracefulExit, KeyboardInterrupt):  # raised by the signal handlers
        pass
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                loop.run_until_complete(task)
        rest = asyncio.all_tasks(loop)
        for leftover in rest:
            leftover.cancel()
        loop.run_until_complete(asyncio.gather(*rest, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.run_until_complete(loop.shutdown_default_executor())
        asyncio.set_event_loop(None)
        loop.close()


async def _first_requests(connections: list[Any], grace_s: float) -> None:
    """Wait (up to ``grace_s``) until every accepted connection has sent its first request."""
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:  # polled: aiohttp signals no "first request" event
        if not any(
            getattr(c, "_request_count", 1) == 0 and c.transport is not None for c in connections
        ):
            return
        await asyncio.sleep(0.01)
