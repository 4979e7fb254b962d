"""Typed keys: what the app holds (the daemon) and what a request carries (what it is served)."""

from __future__ import annotations

from aiohttp import web

from serving.runtime.dataplane import Served
from serving.runtime.lifecycle import Daemon

#: The running server's state; sub-apps read it through ``request.config_dict``.
DAEMON: web.AppKey[Daemon] = web.AppKey("daemon", Daemon)
#: The route and handle a prediction request is answered by, set once by its handler.
SERVED: web.RequestKey[Served] = web.RequestKey("served", Served)


def daemon_of(request: web.Request) -> Daemon:
    """The daemon serving ``request``: on its app (each sub-app holds it too), else found up
    the app chain (``config_dict`` builds a chain of mappings per request: slower)."""
    daemon = request.app.get(DAEMON)
    return daemon if daemon is not None else request.config_dict[DAEMON]
