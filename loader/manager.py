"""The Manager: the only part that decides which version each route serves.

For each route: aspired version -> fetch -> dependency check -> load -> warm-up -> swap. A swap
replaces one reference; a request that took the old :class:`ModelHandle` keeps it to the end, and
the old model is freed with its last reference. Any failing step leaves the old version serving
and is recorded as a :class:`Rejection`, retried with capped exponential backoff (at once if the
registry shows the version changed).

Synchronous: the daemon runs :meth:`ModelManager.refresh` in its load executor and
:class:`~loader.live.LiveModel` in a thread.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from loader.errors import (
    ConfigError,
    LoaderError,
    ModelLoadError,
    ModelNotReady,
    RegistryUnavailable,
)
from loader.pipeline import ModelSource, Prepared, Resolution
from loader.pyfunc import PyFuncLoader, warm_up
from loader.registry import ModelVersion
from loader.uri import ModelRef, parse_uri

log = logging.getLogger(__name__)

SwapPolicy = Literal["availability", "memory"]
SWAP_POLICIES = ("availability", "memory")
RETRY_BASE_S = 30.0
RETRY_MAX_S = 3600.0
LOAD_TIMEOUT_S = 600.0
MAX_REJECTIONS_KEPT = 10


@dataclass(frozen=True, slots=True)
class ModelHandle:
    """One loaded version. A request takes a handle and keeps it until it answers."""

    route: str
    model: Any
    version: ModelVersion
    prepared: Prepared
    stale: bool
    loaded_at: float

    @property
    def label(self) -> str:
        return self.version.label

    def predict(self, data: Any, params: dict[str, Any] | None = None) -> Any:
        if params:
            return self.model.predict(data, params=params)
        return self.model.predict(data)


@dataclass(slots=True)
class Rejection:
    """A version that failed a step and is not served."""

    version: ModelVersion
    step: str
    reason: str
    at: float
    attempts: int
    retry_at: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version.version,
            "step": self.step,
            "reason": self.reason,
            "at": self.at,
            "attempts": self.attempts,
            "retry_at": self.retry_at,
        }


@dataclass(slots=True)
class Route:
    """A served model: its ref, what it resolves to, what answers, and what was refused."""

    name: str
    ref: ModelRef
    swap: SwapPolicy = "availability"
    warmup: bool = True
    handle: ModelHandle | None = None
    resolved: ModelVersion | None = None
    stale: bool = False
    problem: str | None = None
    pinned: int | None = None
    rejections: dict[str, Rejection] = field(default_factory=dict)
    swaps: int = 0
    last_swap_at: float | None = None
    lease: contextlib.ExitStack | None = None
    #: The last failure as an exception (LiveModel re-raises it when nothing could load).
    last_error: BaseException | None = None
    #: Payload for the warm-up prediction instead of the model's saved input example.
    warmup_example: dict[str, Any] | None = None


class ModelManager:
    """Serve named routes, each following a ref, and swap versions safely.

    Args:
        source: the shared resolve/fetch/check/load pipeline.
        retry_base_s, retry_max_s: backoff for retrying a rejected version.
        load_timeout_s: a load plus warm-up taking longer is rejected (step ``load``) so that a
            model hanging in its own code cannot stop the manager; None waits for ever.
        on_swap: called as ``on_swap(route, old_handle, new_handle)`` after each swap.
        observer: called as ``observer(event, fields)`` for ``"swap"`` (route, version,
            load_s, warmup_s), ``"reject"`` (route, version, step) and ``"poll"`` (seconds, ok):
            the daemon turns these into metrics; the loader knows no metrics library.
        clock: wall-clock seconds; injected by tests.
    """

    def __init__(
        self,
        source: ModelSource,
        *,
        retry_base_s: float = RETRY_BASE_S,
        retry_max_s: float = RETRY_MAX_S,
        load_timeout_s: float | None = LOAD_TIMEOUT_S,
        on_swap: Callable[[str, ModelHandle | None, ModelHandle], None] | None = None,
        observer: Callable[[str, dict[str, Any]], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.observer = observer
        self.source = source
        self.retry_base_s = retry_base_s
        self.retry_max_s = retry_max_s
        self.load_timeout_s = load_timeout_s
        self.on_swap = on_swap
        self.clock = clock
        self._routes: dict[str, Route] = {}
        self._refresh_lock = threading.RLock()
        self.registry_down_since: float | None = None
        self.last_poll_at: float | None = None

    # -- routes -------------------------------------------------------------------------------

    def add(
        self,
        name: str,
        uri: str | ModelRef,
        *,
        swap: SwapPolicy = "availability",
        warmup: bool = True,
        warmup_example: dict[str, Any] | None = None,
    ) -> Route:
        """Follow ``uri`` under route ``name`` (nothing loads until :meth:`refresh`).

        Raises:
            InvalidModelURI: the URI does not parse.
            ConfigError: bad swap policy or duplicate route name.
        """
        ref = _checked_ref(name, uri, swap)
        with self._refresh_lock:
            if name in self._routes:
                raise ConfigError("models.name", name, "a route name used once")
            route = Route(
                name=name, ref=ref, swap=swap, warmup=warmup, warmup_example=warmup_example
            )
            self._routes[name] = route
            return route

    def update(
        self,
        name: str,
        uri: str | ModelRef,
        *,
        swap: SwapPolicy = "availability",
        warmup: bool = True,
        warmup_example: dict[str, Any] | None = None,
    ) -> None:
        """Point an existing route at another ref; the old version serves until the new one
        is ready (at the next :meth:`refresh`).

        Raises:
            InvalidModelURI, ConfigError, ModelNotReady (unknown route)
        """
        ref = _checked_ref(name, uri, swap)
        with self._refresh_lock:
            route = self.route(name)
            if route.ref != ref:
                route.ref, route.resolved, route.pinned = ref, None, None
                route.rejections.clear()
            route.swap, route.warmup, route.warmup_example = swap, warmup, warmup_example

    def remove(self, name: str) -> None:
        with self._refresh_lock:
            route = self._routes.pop(name, None)
            if route is not None:
                self._unload(route)

    def names(self) -> list[str]:
        return list(self._routes)

    def routes(self) -> list[Route]:
        return list(self._routes.values())

    def route(self, name: str) -> Route:
        try:
            return self._routes[name]
        except KeyError:
            raise ModelNotReady(name, self._routes) from None

    def get(self, name: str) -> ModelHandle:
        """The handle serving ``name`` now. Lock-free: one reference read.

        Raises:
            ModelNotReady: unknown route, or nothing loaded for it yet.
        """
        route = self._routes.get(name)
        handle = route.handle if route is not None else None
        if handle is None:
            raise ModelNotReady(name, [n for n, r in self._routes.items() if r.handle])
        return handle

    # -- pin ----------------------------------------------------------------------------------

    def pin(self, name: str, version: int) -> None:
        """Freeze ``name`` at ``version`` (a rollback); takes effect at the next refresh."""
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ConfigError("version", version, "a model version number >= 1")
        route = self.route(name)
        if not route.ref.is_registry:
            raise ConfigError(
                "pin", route.ref.uri, "a models:/ ref (local models have no versions)"
            )
        route.pinned = version

    def unpin(self, name: str) -> None:
        self.route(name).pinned = None

    # -- the refresh cycle --------------------------------------------------------------------

    def refresh(self, names: Iterable[str] | None = None, *, force: bool = False) -> None:
        """Resolve every route's ref (one registry request) and swap in changed versions.

        Never raises for a registry outage or a bad version: the old version keeps serving and
        the route records why.
        """
        with self._refresh_lock:
            routes = [self._routes[n] for n in (names or self._routes) if n in self._routes]
            if not routes:
                return
            refs = {r.name: self._aspired_ref(r) for r in routes}
            known = {refs[r.name]: r.resolved for r in routes if r.resolved is not None}
            started = time.perf_counter()
            answers = self.source.resolve_many(set(refs.values()), known=known)
            self.last_poll_at = self.clock()
            down = any(
                isinstance(a, RegistryUnavailable) or (isinstance(a, Resolution) and a.stale)
                for a in answers.values()
            )
            if down and any(r.ref.is_registry for r in routes):
                if self.registry_down_since is None:
                    self.registry_down_since = self.clock()
                    log.warning("registry %s unreachable", self.source.registry.identity)
            elif self.registry_down_since is not None:
                log.info("registry %s reachable again", self.source.registry.identity)
                self.registry_down_since = None
            self._emit("poll", seconds=time.perf_counter() - started, ok=not down)
            for route in routes:
                answer = answers.get(refs[route.name])
                if answer is not None:
                    self._apply(route, answer, force=force)

    def _aspired_ref(self, route: Route) -> ModelRef:
        if route.pinned is None:
            return route.ref
        return parse_uri(f"models:/{route.ref.name}/{route.pinned}")

    def _apply(self, route: Route, answer: Resolution | LoaderError, *, force: bool) -> None:
        served = route.handle
        if isinstance(answer, LoaderError):
            route.problem = str(answer)
            route.last_error = answer
            if served is not None:
                log.warning("%s: %s; still serving %s", route.name, answer, served.label)
            else:
                log.error("%s: %s; nothing to serve", route.name, answer)
            return
        version = answer.version
        route.resolved, route.stale = version, answer.stale
        route.problem = None
        if served is not None and _same_files(served.version, version):
            if served.version != version or served.stale != answer.stale:
                # Tags, description, stage or aliases changed: show them, no reload.
                route.handle = replace(served, version=version, stale=answer.stale)
            return
        rejection = route.rejections.get(version.cache_key)
        if (
            rejection is not None
            and not force
            and rejection.version == version
            and self.clock() < rejection.retry_at
        ):
            return
        self._swap_in(route, answer)

    def _swap_in(self, route: Route, answer: Resolution) -> None:
        version = answer.version
        old = route.handle
        step = "fetch"
        if route.swap == "memory" and old is not None:
            log.info(
                "%s: unloading %s before loading %s (swap = memory)",
                route.name,
                old.label,
                version.label,
            )
            self._unload(route)
        lease = contextlib.ExitStack()
        try:
            prepared = self.source.prepare(version)
            step = "load"
            if prepared.cache_key is not None:
                lease.enter_context(self.source.cache.lease(prepared.cache_key))
            model, load_s, warmup_s = self._bounded(
                lambda: self._load_and_warm(route, prepared, answer), version.label
            )
        except LoaderError as exc:
            lease.close()
            self._reject(route, version, _step_of(exc, step), exc, old)
            return
        except Exception as exc:  # a model's own code may raise anything
            lease.close()
            log.exception("%s: unexpected error at %s", version.label, step)
            self._reject(route, version, step, exc, old)
            return
        handle = ModelHandle(
            route=route.name,
            model=model,
            version=version,
            prepared=prepared,
            stale=answer.stale,
            loaded_at=self.clock(),
        )
        old_lease = route.lease
        route.handle, route.lease = handle, lease
        route.rejections.pop(version.cache_key, None)
        route.last_error = None
        route.swaps += 1
        route.last_swap_at = handle.loaded_at
        if old_lease is not None:
            old_lease.close()
        if old is not None and route.swap != "memory":
            log.info("%s: swapped %s -> %s", route.name, old.label, version.label)
        else:
            log.info(
                "%s: serving %s%s",
                route.name,
                version.label,
                " (stale: registry unreachable)" if answer.stale else "",
            )
        self._emit(
            "swap", route=route.name, version=version.version, load_s=load_s, warmup_s=warmup_s
        )
        if self.on_swap is not None:
            self.on_swap(route.name, old, handle)

    def _load_and_warm(
        self, route: Route, prepared: Prepared, answer: Resolution
    ) -> tuple[Any, float, float]:
        started = time.perf_counter()
        model = self.source.load(prepared, uri=route.ref.uri, stale=answer.stale)
        load_s = time.perf_counter() - started
        if route.warmup:
            example = route.warmup_example or PyFuncLoader(prepared.path).input_example()
            try:
                warm_up(model, example, answer.version.label)
            except LoaderError as exc:
                exc.step = "warm-up"  # type: ignore[attr-defined]
                raise
        return model, load_s, time.perf_counter() - started - load_s

    def _bounded(self, work: Callable[[], Any], label: str) -> Any:
        """Run ``work`` in its own thread, giving up after ``load_timeout_s``.

        A model's code can hang (a lock, a network call); the thread cannot be killed, but the
        manager moves on, keeps the old version serving and keeps following the registry.
        """
        if self.load_timeout_s is None:
            return work()
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                box["value"] = work()
            except BaseException as exc:  # handed back to the caller below
                box["error"] = exc

        thread = threading.Thread(target=run, name=f"modeld-load-{label}", daemon=True)
        thread.start()
        thread.join(self.load_timeout_s)
        if thread.is_alive():
            raise ModelLoadError(
                f"{label} did not load and warm up within {self.load_timeout_s:.0f}s "
                "(load_timeout_s); its thread is abandoned"
            )
        if "error" in box:
            raise box["error"]
        return box["value"]

    def _reject(
        self,
        route: Route,
        version: ModelVersion,
        step: str,
        exc: BaseException,
        old: ModelHandle | None,
    ) -> None:
        previous = route.rejections.get(version.cache_key)
        attempts = 1 if previous is None or previous.version != version else previous.attempts + 1
        delay = min(self.retry_max_s, self.retry_base_s * 2 ** (attempts - 1))
        now = self.clock()
        reason = str(exc) or type(exc).__name__
        route.rejections.pop(version.cache_key, None)  # re-insert: newest last
        route.rejections[version.cache_key] = Rejection(
            version, step, reason, now, attempts, now + delay
        )
        while len(route.rejections) > MAX_REJECTIONS_KEPT:
            route.rejections.pop(next(iter(route.rejections)))
        route.last_error = exc
        self._emit("reject", route=route.name, version=version.version, step=step)
        still = route.handle or old
        tail = f"still serving {still.label}" if still else "nothing served"
        log.warning("%s rejected at %s (%s); %s", version.label, step, reason, tail)

    def _emit(self, event: str, **fields: Any) -> None:
        if self.observer is not None:
            try:
                self.observer(event, fields)
            except Exception:  # metrics must never break serving
                log.exception("observer failed on %s", event)

    def _unload(self, route: Route) -> None:
        route.handle = None
        if route.lease is not None:
            route.lease.close()
            route.lease = None

    def close(self) -> None:
        with self._refresh_lock:
            for route in self._routes.values():
                self._unload(route)

    # -- status -------------------------------------------------------------------------------

    def status(self, name: str | None = None) -> dict[str, Any]:
        routes = [self.route(name)] if name is not None else list(self._routes.values())
        items = [_route_status(r) for r in routes]
        if name is not None:
            return items[0]
        return {
            "models": items,
            "registry": {
                "identity": self.source.registry.identity,
                "reachable": self.registry_down_since is None,
                "unreachable_since": self.registry_down_since,
                "last_poll_at": self.last_poll_at,
            },
        }


def _checked_ref(name: str, uri: str | ModelRef, swap: str) -> ModelRef:
    if swap not in SWAP_POLICIES:
        raise ConfigError(f"models.{name}.swap", swap, " | ".join(SWAP_POLICIES))
    return uri if isinstance(uri, ModelRef) else parse_uri(uri)


def _same_files(a: ModelVersion, b: ModelVersion) -> bool:
    if a.local_path is not None or b.local_path is not None:
        return a.local_path == b.local_path and a.last_updated_ms == b.last_updated_ms
    return a.cache_key == b.cache_key


def _step_of(exc: LoaderError, step: str) -> str:
    if type(exc).__name__ == "DependencyMismatch":
        return "dependency check"
    return getattr(exc, "step", step)


def _route_status(route: Route) -> dict[str, Any]:
    handle = route.handle
    version = handle.version if handle else None
    state = "loaded" if handle else ("failed" if route.rejections or route.problem else "loading")
    return {
        "name": route.name,
        "ref": route.ref.uri,
        "state": state,
        "stale": bool(handle and handle.stale),
        "version": version.version if version else None,
        "stage": version.stage if version else None,
        "aliases": list(version.aliases) if version else [],
        "tags": dict(version.tags) if version else {},
        "description": version.description if version else None,
        "run_id": version.run_id if version else None,
        "source": version.source if version else None,
        "loaded_at": handle.loaded_at if handle else None,
        "cache_path": str(handle.prepared.path) if handle else None,
        "dependency_report": handle.prepared.report.to_dict() if handle else None,
        "resolved_version": route.resolved.version if route.resolved else None,
        "pinned": route.pinned,
        "problem": route.problem,
        "swaps": route.swaps,
        "last_swap_at": route.last_swap_at,
        "rejected": [r.to_dict() for r in route.rejections.values()],
    }
