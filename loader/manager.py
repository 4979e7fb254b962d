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

import collections
import contextlib
import logging
import threading
import time
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields, replace
from typing import Any

from loader.deps import POLICIES, DependencyReport, Policy
from loader.envs import EnvInfo
from loader.errors import (
    ConfigError,
    DependencyMismatch,
    LoaderError,
    ModelLoadError,
    ModelNotFound,
    ModelNotReady,
    RegistryUnavailable,
)
from loader.isolated import IsolatedModel
from loader.lean import CallPath, LeanCall, decide
from loader.pipeline import ModelSource, Prepared, Resolution
from loader.policy import (
    SWAP_POLICIES,
    SwapAction,
    SwapPolicy,
    backoff_s,
    swap_action,
    unload_first,
)
from loader.pyfunc import PyFuncLoader, warm_up
from loader.registry import ModelVersion
from loader.uri import ModelRef, RefKind, parse_uri

log = logging.getLogger(__name__)

__all__ = [
    "SWAP_POLICIES",
    "ManagerStatus",
    "ModelHandle",
    "ModelManager",
    "RegistryStatus",
    "Rejection",
    "RouteSpec",
    "RouteStatus",
    "SwapPolicy",
]

RETRY_BASE_S = 30.0
RETRY_MAX_S = 3600.0
LOAD_TIMEOUT_S = 600.0
MAX_REJECTIONS_KEPT = 10
#: Rejections of versions no ref names any more, kept for the status page's history.
MAX_HISTORY_KEPT = 20
#: A problem that persists (a ref that resolves to nothing, an outage) is logged when it starts
#: and then at most this often, not at every poll.
PROBLEM_REMINDER_S = 300.0


@dataclass(frozen=True, slots=True)
class ModelHandle:
    """One loaded version. A request takes a handle and keeps it until it answers."""

    route: str
    model: Any
    version: ModelVersion
    prepared: Prepared
    stale: bool
    loaded_at: float
    #: How conformant requests call the model (the lean call or the pyfunc path), decided at
    #: warm-up; None when no warm-up ran.
    call: CallPath | None = None

    @property
    def label(self) -> str:
        return self.version.label

    @property
    def lean(self) -> LeanCall | None:
        """The estimator's own method on a conformant matrix, when proven the same answer."""
        return self.call.lean if self.call is not None else None

    def predict(self, data: Any, params: dict[str, Any] | None = None) -> Any:
        if params:
            return self.model.predict(data, params=params)
        return self.model.predict(data)


@dataclass(frozen=True, slots=True)
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


@dataclass(frozen=True, slots=True)
class RouteSpec:
    """What a route should serve: the unit of :meth:`ModelManager.set_routes`."""

    name: str
    uri: str
    swap: SwapPolicy = "availability"
    warmup: bool = True
    #: Payload for the warm-up prediction instead of the model's saved input example.
    warmup_example: dict[str, Any] | None = field(default=None, hash=False)
    #: ``mlflow.pyfunc.load_model(model_config=...)``: what ``mlflow models serve`` takes from
    #: ``SERVING_MODEL_CONFIG``.
    model_config: dict[str, Any] | None = field(default=None, hash=False)
    #: This route's dependency policy (None: the pipeline's), e.g. ``isolate`` for one model.
    dependency_policy: Policy | None = None

    def options(self) -> dict[str, Any]:
        """Every field but name and uri: the keywords of :meth:`ModelManager.add`/``update``."""
        return {
            f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("name", "uri")
        }


@dataclass(frozen=True, slots=True)
class RouteStatus:
    """A snapshot of one route, for status pages, probes and metrics."""

    name: str
    ref: str
    state: str  #: ``loaded`` | ``loading`` | ``failed``
    stale: bool
    version: ModelVersion | None  #: the version answering, None when nothing is loaded
    loaded_at: float | None
    cache_path: str | None
    dependency_report: DependencyReport | None
    resolved_version: int | None
    pinned: int | None
    problem: str | None
    problem_kind: str | None
    swaps: int
    last_swap_at: float | None
    rejected: tuple[Rejection, ...]
    history: tuple[Rejection, ...] = ()
    #: The isolated environment serving (None: in this process), and its worker's state.
    environment: EnvInfo | None = None
    worker: dict[str, Any] | None = None
    #: How the answering version's conformant requests call the model (lean or pyfunc).
    call: CallPath | None = None
    #: How the answering version was loaded (:attr:`~loader.pipeline.ModelInfo.loaded_by`).
    loaded_by: str | None = None

    @property
    def ready(self) -> bool:
        return self.version is not None

    @property
    def waiting_for(self) -> str:
        """Why a route that is not ready is not: its problem, its last rejection, or loading."""
        if self.problem:
            return self.problem
        return self.rejected[-1].reason if self.rejected else "loading"

    def to_dict(self) -> dict[str, Any]:
        v = self.version
        return {
            "name": self.name,
            "ref": self.ref,
            "state": self.state,
            "stale": self.stale,
            "version": v.version if v else None,
            "stage": v.stage if v else None,
            "aliases": list(v.aliases) if v else [],
            "tags": dict(v.tags) if v else {},
            "description": v.description if v else None,
            "run_id": v.run_id if v else None,
            "source": v.source if v else None,
            "model_id": v.model_id if v else None,
            "logged_name": v.logged_name if v else None,
            "loaded_at": self.loaded_at,
            "cache_path": self.cache_path,
            "dependency_report": self.dependency_report.to_dict()
            if self.dependency_report
            else None,
            "resolved_version": self.resolved_version,
            "pinned": self.pinned,
            "problem": self.problem,
            "problem_kind": self.problem_kind,
            "swaps": self.swaps,
            "last_swap_at": self.last_swap_at,
            "rejected": [r.to_dict() for r in self.rejected],
            "history": [r.to_dict() for r in self.history],
            "environment": self.environment.to_dict() if self.environment else None,
            "env_worker": self.worker,
            "predict_call": self.call.to_dict() if self.call else None,
            "loaded_by": self.loaded_by,
        }


@dataclass(frozen=True, slots=True)
class RegistryStatus:
    identity: str
    reachable: bool
    unreachable_since: float | None
    last_poll_at: float | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "identity": self.identity,
            "reachable": self.reachable,
            "unreachable_since": self.unreachable_since,
            "last_poll_at": self.last_poll_at,
        }


@dataclass(frozen=True, slots=True)
class ManagerStatus:
    """Every route and the registry, as one consistent snapshot."""

    models: tuple[RouteStatus, ...]
    registry: RegistryStatus

    @property
    def ready(self) -> bool:
        return all(m.ready for m in self.models)

    def to_dict(self) -> dict[str, Any]:
        return {"models": [m.to_dict() for m in self.models], "registry": self.registry.to_dict()}


class _StepFailed(Exception):
    """A pipeline step failed: which step, and the error (carried explicitly, not tagged)."""

    def __init__(self, step: str, error: BaseException) -> None:
        super().__init__(step, error)
        self.step, self.error = step, error


@dataclass(slots=True)
class Route:
    """A served model: its ref, what it resolves to, what answers, and what was refused."""

    name: str
    ref: ModelRef
    spec: RouteSpec
    handle: ModelHandle | None = None
    #: Load the aspired version again even though its files are served (its model_config
    #: changed); once, whatever the outcome.
    reload: bool = False
    resolved: ModelVersion | None = None
    stale: bool = False
    problem: str | None = None
    #: What kind of problem: ``unreachable`` (the registry could not be asked and the cache has
    #: no copy), ``not found`` (the registry answered: nothing by that name), ``error``.
    problem_kind: str | None = None
    problem_logged: tuple[str, float] | None = None
    pinned: int | None = None
    rejections: dict[str, Rejection] = field(default_factory=dict)
    #: Rejections of versions the ref no longer names (newest last).
    history: collections.deque[Rejection] = field(
        default_factory=lambda: collections.deque(maxlen=MAX_HISTORY_KEPT)
    )
    swaps: int = 0
    last_swap_at: float | None = None
    lease: contextlib.ExitStack | None = None
    #: The last failure as an exception (LiveModel re-raises it when nothing could load).
    last_error: BaseException | None = None


class ModelManager:
    """Serve named routes, each following a ref, and swap versions safely.

    Args:
        source: the shared resolve/fetch/check/load pipeline.
        retry_base_s, retry_max_s: backoff for retrying a rejected version.
        load_timeout_s: a load plus warm-up taking longer is rejected (step ``load``) so that a
            model hanging in its own code cannot stop the manager; None waits for ever.
        on_swap: called as ``on_swap(route, old_handle, new_handle)`` after each swap
            (``old_handle`` is None for a route's first load).
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
        self._outage_logged_at = 0.0
        self.last_poll_at: float | None = None

    # -- routes -------------------------------------------------------------------------------

    def add(self, name: str, uri: str | ModelRef, **options: Any) -> Route:
        """Follow ``uri`` under route ``name`` (nothing loads until :meth:`refresh`);
        ``options`` are :class:`RouteSpec` fields (``swap``, ``warmup``, ...).

        Raises:
            InvalidModelURI: the URI does not parse.
            ConfigError: a bad option, or a duplicate route name.
        """
        spec, ref = _checked_spec(name, uri, options)
        with self._refresh_lock:
            if name in self._routes:
                raise ConfigError("models.name", name, "a route name used once")
            route = Route(name=name, ref=ref, spec=spec)
            self._routes[name] = route
            return route

    def update(self, name: str, uri: str | ModelRef, **options: Any) -> None:
        """Point an existing route at another ref, or change its options; the old version
        serves until the new one is ready (at the next :meth:`refresh`).

        Raises:
            InvalidModelURI, ConfigError, ModelNotReady (unknown route)
        """
        spec, ref = _checked_spec(name, uri, options)
        with self._refresh_lock:
            route = self.route(name)
            if route.ref != ref:
                route.ref, route.resolved, route.pinned = ref, None, None
                route.rejections.clear()
            if route.spec.model_config != spec.model_config:
                route.reload = True  # same files, loaded another way
                route.rejections.clear()
            route.spec = spec

    def remove(self, name: str) -> None:
        with self._refresh_lock:
            route = self._routes.pop(name, None)
            if route is not None:
                self._unload(route)

    def set_routes(self, specs: Iterable[RouteSpec]) -> list[str]:
        """Make the routes exactly ``specs``: add the new, remove the missing, repoint the
        changed (each keeps serving its old version until the new one is ready). Every spec is
        checked before anything changes, so a bad one changes nothing.

        Returns the names added or changed (to :meth:`refresh`).

        Raises:
            InvalidModelURI, ConfigError: a spec is invalid (nothing was changed).
        """
        wanted = {}
        for spec in specs:
            if spec.name in wanted:
                raise ConfigError("models.name", spec.name, "a route name used once")
            _checked_spec(spec.name, spec.uri, spec.options())
            wanted[spec.name] = spec
        changed = []
        with self._refresh_lock:
            for name in [n for n in self._routes if n not in wanted]:
                self.remove(name)
                log.info("stopped serving %s", name)
            for name, spec in wanted.items():
                if name not in self._routes:
                    self.add(name, spec.uri, **spec.options())
                    log.info("now serving %s = %s", name, spec.uri)
                elif self._routes[name].spec != spec:
                    self.update(name, spec.uri, **spec.options())
                    log.info("%s now follows %s", name, spec.uri)
                else:
                    continue
                changed.append(name)
        return changed

    def names(self) -> list[str]:
        return list(self._routes)

    def serves(self, name: str) -> bool:
        """Whether ``name`` is a route (one dict lookup: the predict path asks it)."""
        return name in self._routes

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

    def pin(self, name: str, version: int, *, verify: bool = False) -> RouteStatus:
        """Freeze ``name`` at ``version`` (a rollback).

        Without ``verify`` it takes effect at the next refresh. With ``verify`` the route is
        refreshed now (a rejected version is retried at once); when the registry has no such
        version the previous pin is restored and :class:`ModelNotFound` raised. The returned
        status says whether ``version`` is now served (it may have been rejected).

        Raises:
            ConfigError: ``version`` is not a version number, or the route is a local model.
            ModelNotReady: unknown route.
            ModelNotFound: (``verify``) the registry has no such version.
            RegistryUnavailable: (``verify``) the registry could not be asked; nothing changed.
        """
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ConfigError("version", version, "a model version number >= 1")
        with self._refresh_lock:
            route = self.route(name)
            if not route.ref.is_registry:
                raise ConfigError(
                    "pin",
                    route.ref.uri,
                    "a registered model's ref, models:/NAME/... (local paths, runs:/ and "
                    "logged models have no versions to pin)",
                )
            previous, route.pinned = route.pinned, version
            if verify:
                self.refresh([name], force=True)
                if route.resolved is None or route.resolved.version != version:
                    error = route.last_error
                    route.pinned = previous
                    self.refresh([name])
                    if isinstance(error, LoaderError) and not isinstance(error, ModelNotFound):
                        raise error  # the registry could not say (an outage): nothing pinned
                    keeps = f"pinned at {previous}" if previous else f"following {route.ref.uri}"
                    raise ModelNotFound(
                        route.ref.name or name, f"version {version}", detail=f"{name} stays {keeps}"
                    )
                log.info("%s pinned at version %s", name, version)
            return self.status(name)

    def unpin(self, name: str) -> None:
        with self._refresh_lock:
            self.route(name).pinned = None

    # -- the refresh cycle --------------------------------------------------------------------

    def refresh(self, names: Iterable[str] | None = None, *, force: bool = False) -> bool:
        """Resolve every route's ref (one registry request) and swap in changed versions.

        Never raises for a registry outage or a bad version: the old version keeps serving and
        the route records why. Returns False when the registry could not be reached.
        """
        with self._refresh_lock:
            routes = [self._routes[n] for n in (names or self._routes) if n in self._routes]
            if not routes:
                return self.registry_down_since is None
            refs = {r.name: self._aspired_ref(r) for r in routes}
            known = {refs[r.name]: r.resolved for r in routes if r.resolved is not None}
            started = time.perf_counter()
            answers = self.source.resolve_many(set(refs.values()), known=known)
            self.last_poll_at = self.clock()
            down = any(  # the registry's (an artifact store's outage shows on its route)
                isinstance(a, RegistryUnavailable) or (isinstance(a, Resolution) and a.stale)
                for ref, a in answers.items()
                if ref.kind is not RefKind.ARTIFACT
            )
            if down and any(r.ref.is_remote for r in routes):
                now = self.clock()
                if self.registry_down_since is None:
                    self.registry_down_since = self._outage_logged_at = now
                    cached = sum(isinstance(a, Resolution) and a.stale for a in answers.values())
                    log.warning(
                        "registry %s unreachable; %d refs serve their cached version (stale) "
                        "until it answers",
                        self.source.registry.identity,
                        cached,
                    )
                elif now - self._outage_logged_at >= PROBLEM_REMINDER_S:
                    self._outage_logged_at = now
                    log.warning(
                        "registry %s still unreachable (for %.0fs)",
                        self.source.registry.identity,
                        now - self.registry_down_since,
                    )
            elif self.registry_down_since is not None:
                log.info("registry %s reachable again", self.source.registry.identity)
                self.registry_down_since = None
            self._emit("poll", seconds=time.perf_counter() - started, ok=not down)
            for route in routes:
                answer = answers.get(refs[route.name])
                if answer is not None:
                    self._apply(route, answer, force=force)
            return self.registry_down_since is None

    def _aspired_ref(self, route: Route) -> ModelRef:
        if route.pinned is None:
            return route.ref
        return parse_uri(f"models:/{route.ref.name}/{route.pinned}")

    def _apply(self, route: Route, answer: Resolution | LoaderError, *, force: bool) -> None:
        served = route.handle
        if isinstance(answer, LoaderError):
            self._problem(route, answer)
            if route.problem_kind != "unreachable":
                # The registry answered (with nothing): what serves is not stale, and no
                # rejected version is named by the ref any more.
                if served is not None and served.stale:
                    route.handle = replace(served, stale=False)
                route.stale = False
                self._retire_rejections(route, keep=None)
            return
        version = answer.version
        route.resolved, route.stale = version, answer.stale
        if not answer.stale:  # an outage says nothing of an earlier problem: it stands
            self._problem(route, None)
            self._retire_rejections(route, keep=version.cache_key)
        rejection = route.rejections.get(version.cache_key)
        action = swap_action(
            served=served.version if served else None,
            served_stale=bool(served and served.stale),
            aspired=version,
            aspired_stale=answer.stale,
            rejected=rejection.version if rejection else None,
            retry_at=rejection.retry_at if rejection else None,
            now=self.clock(),
            force=force,
        )
        if route.reload and action in (SwapAction.KEEP, SwapAction.RELABEL):
            action = SwapAction.LOAD
        if action is SwapAction.RELABEL:
            assert served is not None
            route.handle = replace(served, version=version, stale=answer.stale)
        elif action is SwapAction.LOAD:
            route.reload = False
            self._swap_in(route, answer)

    def _problem(self, route: Route, error: LoaderError | None) -> None:
        """Record (or clear) what is wrong with the route's ref. Logged when it starts or
        changes, then as a reminder at most every PROBLEM_REMINDER_S, not at every poll."""
        if error is None:
            if route.problem is not None:
                log.info("%s: %s resolves again", route.name, route.ref.uri)
            route.problem = route.problem_kind = route.problem_logged = None
            return
        kind = (
            "unreachable"
            if isinstance(error, RegistryUnavailable)
            else "not found"
            if isinstance(error, ModelNotFound)
            else "error"
        )
        route.problem, route.problem_kind, route.last_error = str(error), kind, error
        signature = kind if kind == "unreachable" else route.problem  # outage texts vary
        now = self.clock()
        logged = route.problem_logged
        if logged is not None and logged[0] == signature and now - logged[1] < PROBLEM_REMINDER_S:
            return
        again = " (still)" if logged is not None and logged[0] == signature else ""
        route.problem_logged = (signature, now)
        if route.handle is not None:
            log.warning("%s%s: %s; still serving %s", route.name, again, error, route.handle.label)
        else:
            log.error("%s%s: %s; nothing to serve", route.name, again, error)

    @staticmethod
    def _retire_rejections(route: Route, *, keep: str | None) -> None:
        """Rejections of versions the ref no longer names move to the route's history."""
        for key in [k for k in route.rejections if k != keep]:
            route.history.append(route.rejections.pop(key))

    def _swap_in(self, route: Route, answer: Resolution) -> None:
        version = answer.version
        old = route.handle
        if unload_first(route.spec.swap, old is not None):
            assert old is not None
            log.info(
                "%s: unloading %s before loading %s (swap = memory)",
                route.name,
                old.label,
                version.label,
            )
            self._unload(route)
        lease = contextlib.ExitStack()
        try:
            policy = self.source.policy_for(route.spec.dependency_policy)
            prepared = self._step("fetch", lambda: self.source.prepare(version, policy=policy))
            if prepared.cache_key is not None:
                lease.enter_context(self.source.cache.lease(prepared.cache_key))
            # Its own bound (environments.build_timeout_s): a build is not a hung load.
            env = self._step("env", lambda: self.source.environment(prepared, policy=policy))
            model, load_s, warmup_s, call = self._bounded(
                lambda: self._load_and_warm(route, prepared, answer, env), version.label
            )
        except _StepFailed as failed:
            lease.close()
            if not isinstance(failed.error, LoaderError):  # a model's own code raised
                log.error(
                    "%s: unexpected error at %s",
                    version.label,
                    failed.step,
                    exc_info=failed.error,
                )
            self._reject(route, version, failed.step, failed.error, old)
            return
        handle = ModelHandle(
            route=route.name,
            model=model,
            version=version,
            prepared=prepared,
            stale=answer.stale,
            loaded_at=self.clock(),
            call=call,
        )
        old_lease = route.lease
        route.handle, route.lease = handle, lease
        route.rejections.pop(version.cache_key, None)
        route.last_error = None
        route.swaps += 1
        route.last_swap_at = handle.loaded_at
        if old_lease is not None:
            old_lease.close()
        if not answer.stale:  # what a start with the registry down serves for this ref
            self.source.remember(route.ref, version)
            if answer.ref != route.ref:  # pinned: the pin's own ref too
                self.source.remember(answer.ref, version)
        if old is not None and route.spec.swap != "memory":
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

    @staticmethod
    def _step(step: str, work: Callable[[], Any]) -> Any:
        """Run one pipeline step; any failure leaves as :class:`_StepFailed` naming it (a
        dependency refusal names the dependency check, wherever it happened)."""
        try:
            return work()
        except _StepFailed:
            raise
        except DependencyMismatch as exc:
            raise _StepFailed("dependency check", exc) from exc
        except Exception as exc:
            raise _StepFailed(step, exc) from exc

    def _load_and_warm(
        self, route: Route, prepared: Prepared, answer: Resolution, env: EnvInfo | None
    ) -> tuple[Any, float, float, CallPath | None]:
        started = time.perf_counter()
        spec = route.spec
        model = self._step(
            "load",
            lambda: self.source.load(
                prepared,
                uri=route.ref.uri,
                stale=answer.stale,
                model_config=spec.model_config,
                env=env,
            ),
        )
        load_s = time.perf_counter() - started
        call = None
        if spec.warmup:
            example = spec.warmup_example or PyFuncLoader(prepared.path).input_example()
            self._step("warm-up", lambda: warm_up(model, example, answer.version.label))
            call = self._step("warm-up", lambda: decide(model, example))
            log.debug("%s: %s call (%s)", answer.version.label, call.name, call.reason)
        return model, load_s, time.perf_counter() - started - load_s, call

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
            thread.name = f"modeld-abandoned-{thread.name.removeprefix('modeld-')}"
            raise _StepFailed(
                "load",
                ModelLoadError(
                    f"{label} did not load and warm up within {self.load_timeout_s:.0f}s "
                    "(load_timeout_s); its thread is abandoned"
                ),
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
        delay = backoff_s(attempts, self.retry_base_s, self.retry_max_s)
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
        """Unload every route; isolated models' workers stop now (a swapped-out version's
        stops with its last request)."""
        with self._refresh_lock:
            for route in self._routes.values():
                model = route.handle.model if route.handle else None
                self._unload(route)
                if isinstance(model, IsolatedModel):
                    model.close()

    # -- status -------------------------------------------------------------------------------

    @typing.overload
    def status(self, name: str) -> RouteStatus: ...

    @typing.overload
    def status(self, name: None = None) -> ManagerStatus: ...

    def status(self, name: str | None = None) -> RouteStatus | ManagerStatus:
        """A typed snapshot of one route (``name``), or of every route and the registry.

        Raises:
            ModelNotReady: unknown route ``name``.
        """
        if name is not None:
            return _route_status(self.route(name))
        return ManagerStatus(
            models=tuple(_route_status(r) for r in list(self._routes.values())),
            registry=RegistryStatus(
                identity=self.source.registry.identity,
                reachable=self.registry_down_since is None,
                unreachable_since=self.registry_down_since,
                last_poll_at=self.last_poll_at,
            ),
        )


def _checked_spec(
    name: str, uri: str | ModelRef, options: dict[str, Any]
) -> tuple[RouteSpec, ModelRef]:
    """The route's spec and parsed ref, every option checked.

    Raises:
        InvalidModelURI, ConfigError
    """
    ref = uri if isinstance(uri, ModelRef) else parse_uri(uri)
    known = [f.name for f in fields(RouteSpec) if f.name not in ("name", "uri")]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ConfigError(f"models.{name}.{unknown[0]}", options[unknown[0]], f"one of {known}")
    spec = RouteSpec(name, ref.uri, **options)
    if spec.swap not in SWAP_POLICIES:
        raise ConfigError(f"models.{name}.swap", spec.swap, " | ".join(SWAP_POLICIES))
    if spec.dependency_policy is not None and spec.dependency_policy not in POLICIES:
        raise ConfigError(
            f"models.{name}.dependency_policy", spec.dependency_policy, " | ".join(POLICIES)
        )
    if spec.model_config is not None and not isinstance(spec.model_config, dict):
        raise ConfigError(f"models.{name}.model_config", spec.model_config, "a table (dict)")
    return spec, ref


def _route_status(route: Route) -> RouteStatus:
    handle = route.handle
    model = handle.model if handle else None
    state = "loaded" if handle else ("failed" if route.rejections or route.problem else "loading")
    return RouteStatus(
        name=route.name,
        ref=route.ref.uri,
        state=state,
        stale=bool(handle and handle.stale),
        version=handle.version if handle else None,
        loaded_at=handle.loaded_at if handle else None,
        cache_path=str(handle.prepared.path) if handle else None,
        dependency_report=handle.prepared.report if handle else None,
        resolved_version=route.resolved.version if route.resolved else None,
        pinned=route.pinned,
        problem=route.problem,
        problem_kind=route.problem_kind,
        swaps=route.swaps,
        last_swap_at=route.last_swap_at,
        rejected=tuple(route.rejections.values()),
        history=tuple(route.history),
        environment=getattr(getattr(model, "modeld", None), "environment", None),
        worker=model.worker if isinstance(model, IsolatedModel) else None,
        call=handle.call if handle is not None else None,
        loaded_by=getattr(getattr(model, "modeld", None), "loaded_by", None),
    )
