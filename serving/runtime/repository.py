"""The Open Inference Protocol's model repository and statistics extensions, for both
transports: ``/v2/repository/...`` and ``/v2/models/{name}/stats`` over HTTP, the
``Repository*`` and ``ModelStatistics`` RPCs over gRPC. Each transport only translates its
request into these calls and their answers (or typed errors) into its own shapes.

A route loaded through the repository lasts until the next config reload or restart: the
config file is the truth, the repository a runtime edit of it (as ``/admin`` pins are). With
``--workers``, every worker applies it (:mod:`serving.runtime.edits`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from loader.errors import LoaderError, ModelNotReady
from serving.codecs.base import ProtocolError
from serving.runtime import edits
from serving.runtime.dataplane import RouteNotFound, Served
from serving.runtime.lifecycle import Daemon

#: The index states Triton's repository extension reports.
READY, LOADING, UNAVAILABLE = "READY", "LOADING", "UNAVAILABLE"
#: The one load parameter: the model ref to serve (Triton's ``config`` and ``file:...``
#: parameters describe files of a Triton model repository, which modeld does not have).
URI = "uri"


def check_load_parameters(names: Iterable[str]) -> None:
    """Raises ProtocolError for any load parameter but ``uri`` (never quoting it)."""
    if any(name != URI for name in names):
        raise ProtocolError(
            "a load takes one parameter, 'uri' (the model ref to serve, e.g. "
            "models:/NAME/VERSION); Triton's 'config' and 'file:' parameters describe files "
            "of a Triton model repository, which modeld does not have"
        )


class LoadFailed(ModelNotReady):
    """A repository load whose version did not become ready (the reason is the route's)."""

    def __init__(self, name: str, reason: str | None) -> None:
        self.name = name
        LoaderError.__init__(self, f"{name} did not load: {reason or 'no version ready'}")


@dataclass(frozen=True, slots=True)
class IndexEntry:
    name: str
    state: str
    version: str | None = None
    reason: str | None = None

    def to_json(self) -> dict[str, str]:
        entry = {"name": self.name}
        if self.version is not None:
            entry["version"] = self.version
        entry["state"] = self.state
        if self.reason is not None:
            entry["reason"] = self.reason
        return entry


def index(daemon: Daemon, *, ready_only: bool = False) -> list[IndexEntry]:
    """Every configured or served route with its state: configured routes first, in the
    config's order, then those loaded through the repository."""
    manager = daemon.manager
    status = {m.name: m for m in manager.status().models} if manager is not None else {}
    names = list(dict.fromkeys([*(m.name for m in daemon.config.models), *status]))
    entries = []
    for name in names:
        m = status.get(name)
        if m is None:
            entry = IndexEntry(name, UNAVAILABLE, reason="unloaded")
        elif m.ready and m.version is not None:
            entry = IndexEntry(name, READY, version=str(m.version.version))
        else:
            state = LOADING if m.state == "loading" else UNAVAILABLE
            entry = IndexEntry(name, state, reason=m.waiting_for)
        if entry.state == READY or not ready_only:
            entries.append(entry)
    return entries


async def load(daemon: Daemon, name: str, uri: str | None = None) -> str:
    """Serve ``name`` from ``uri``, else from its configured ref; its version once ready.

    Raises:
        RouteNotFound: no ``uri`` and no configured model of that name.
        ConfigError, InvalidModelURI: a bad ref (the accepted forms in the message).
        ModelNotReady: modeld is still starting, or the version did not load (why).
    """
    configured = next((m for m in daemon.config.models if m.name == name), None)
    if uri is None and configured is None:
        raise RouteNotFound(
            f"no model {name!r} in the config: give its ref as parameters.uri (the load "
            'parameter "uri"), e.g. {"parameters": {"uri": "models:/NAME/VERSION"}}'
        )
    manager = daemon.manager
    if manager is None:
        raise ModelNotReady(name)
    spec = configured.route_spec() if configured is not None else None
    await daemon.in_load_pool(edits.serve_route, manager, name, uri, spec)
    await daemon.share(edits.LOAD, name, uri)  # served (or failing) in every worker alike
    status = manager.status(name)
    if not status.ready or status.version is None:
        raise LoadFailed(name, status.waiting_for)
    return str(status.version.version)


async def unload(daemon: Daemon, name: str) -> None:
    """Stop serving ``name`` until it is loaded again or the config is reloaded.

    Raises:
        ModelNotReady: no such route is served.
    """
    manager = daemon.manager
    if manager is None or not manager.serves(name):
        raise ModelNotReady(name, manager.names() if manager is not None else [])
    await daemon.in_load_pool(manager.remove, name)
    await daemon.share(edits.UNLOAD, name)


def statistics(daemon: Daemon, served: list[Served] | None = None) -> list[dict[str, Any]]:
    """Triton's ``model_stats`` for ``served`` (None: every route with a version loaded)."""
    if served is None:
        manager = daemon.manager
        served = []
        for route in manager.names() if manager is not None else []:
            try:
                served.append(daemon.dataplane.serving(route))
            except ModelNotReady:
                continue
    return [daemon.metrics.stats_of(s.route).to_triton(s.route, str(s.version)) for s in served]
