"""The data plane: route -> handle -> batch -> predict, for any transport.

A transport (``serving.http`` today, gRPC beside it) asks :meth:`DataPlane.serving` for the
route a request names and gets a :class:`Served`: the one handle that answers the whole
request, whatever swaps meanwhile. It then hands the body and a codec to
:meth:`DataPlane.predict`, which queues it on the route's :class:`RouteWorker` and waits at
most ``server.request_timeout_s``. Nothing here knows aiohttp, or whether the model runs in
this process or another: that is behind the handle.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from loader.errors import ModelNotReady
from loader.manager import ManagerStatus, ModelHandle, ModelManager
from serving.codecs.base import Codec, inflate
from serving.config import Config
from serving.runtime.arms import ArmState, Lookup, Split, splits_of
from serving.runtime.batching import RouteWorker
from serving.runtime.payloads import PayloadLog, Record

#: Bodies larger than this are decoded on the decode threads, not the predict thread.
DECODE_INLINE_BYTES = 256 * 1024
DECODE_THREADS = 2
#: Compressed bodies up to this size inflate on the loop (at most ~1 MB out: about a ms).
INFLATE_INLINE_BYTES = 1024
#: A shadow copy starts only after its route has answered nothing for this long.
MIRROR_IDLE_S = 0.001

log = logging.getLogger(__name__)


class RouteNotFound(Exception):
    """A request names no served route (or a version the route does not serve)."""

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class Served:
    """Request-scoped: the route a request is for and the handle that answers all of it."""

    route: str
    handle: ModelHandle
    #: With arms: the arm answering and the route the request named (``route`` is the arm's
    #: own manager route, ``ROUTE@ARM``), and the shadow arms that get a copy after it.
    arm: str | None = None
    split: Split | None = None
    #: The predict worker answering (None: ``route``'s). Arms serving one version share the
    #: first such arm's worker and handle, so their requests batch together.
    worker: str | None = None

    @property
    def name(self) -> str:
        """The route the request named (with arms: not the arm's own route)."""
        return self.split.route if self.split is not None else self.route

    @property
    def version(self) -> int:
        return self.handle.version.version

    @property
    def stale(self) -> bool:
        return self.handle.stale


def _expire(future: asyncio.Future[bytes]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())


class DataPlane:
    """Routes requests to the version each route serves now, through its predict worker.

    ``config`` is replaced by the lifecycle on a config reload and ``manager`` set once the
    pipeline exists; ``on_batch(route, n)`` observes each predict call's batch size.
    """

    def __init__(self, config: Config, *, on_batch: Callable[[str, int], None] | None = None):
        self.config = config
        self.manager: ModelManager | None = None
        self.workers: dict[str, RouteWorker] = {}
        self.splits: dict[str, Split] = splits_of(config.models)
        self._mirrors: set[asyncio.Task[None]] = set()
        #: Set by the lifecycle when ``[logging.payloads]`` is on.
        self.payloads: PayloadLog | None = None
        #: ``on_shadow(route, arm, status)``: a shadow copy's outcome (the metrics').
        self.on_shadow: Callable[[str, str, int], None] | None = None
        self._on_batch = on_batch
        #: Large bodies are decoded here, never on a model's predict thread (a 100 k-column
        #: CSV held a model's only thread for 12 s); small ones on it (no extra hop).
        self._decoders = concurrent.futures.ThreadPoolExecutor(
            DECODE_THREADS, thread_name_prefix="modeld-decode"
        )

    # -- which route, which handle ------------------------------------------------------------

    def configure(self, config: Config) -> None:
        """A reloaded config: its arms and weights (run-time weights start again from it)."""
        self.config = config
        self.splits = splits_of(config.models)

    def names(self) -> list[str]:
        """The routes served (configured ones until the pipeline exists): a route with arms
        by its own name, each arm's route after it."""
        if self.manager is not None:
            return [*self.splits, *self.manager.names()]
        return [m.name for m in self.config.models]

    def serves(self, name: str) -> bool:
        """Whether ``name`` is a route (asked per request: no list is built)."""
        if name in self.splits:
            return True
        if self.manager is not None:
            return self.manager.serves(name)
        return any(m.name == name for m in self.config.models)

    def unready(self, status: ManagerStatus) -> dict[str, str]:
        """The routes keeping the server from being ready, with why: every route but the
        arms that are not their route's primary (a challenger or shadow still loading, or
        failing, leaves the route ready on its primary arm)."""
        optional = self.config.optional_routes()
        return {
            m.name: m.waiting_for for m in status.models if not m.ready and m.name not in optional
        }

    def ready(self, status: ManagerStatus) -> bool:
        return not self.unready(status)

    def require(self, name: str) -> None:
        """Raises :class:`RouteNotFound` naming the served routes unless ``name`` is one."""
        if not self.serves(name):
            served = ", ".join(self.names()) or "none"
            raise RouteNotFound(f"no model named {name[:100]!r}; served models: {served}")

    def default_route(self) -> str:
        """The route ``POST /invocations`` answers: the only one, or the one marked default.

        Raises:
            RouteNotFound: several routes and none marked default.
        """
        name = self.config.default_model
        if name is None:
            served = ", ".join(m.name for m in self.config.models) or "none"
            raise RouteNotFound(
                f"no default model: POST /models/{{name}}/invocations (served: {served}) or "
                "mark one [[models]] entry default = true"
            )
        return name

    def serving(
        self, name: str, *, version: str | None = None, lookup: Lookup | None = None
    ) -> Served:
        """The handle answering for ``name`` now, resolved once for the whole request. For a
        route with arms: the chosen arm's (``lookup`` reads the sticky key), else the next
        ready arm's.

        Raises:
            RouteNotFound: no such route, or it serves another ``version`` than asked.
            ModelNotReady: the route has no version loaded yet (no arm of it is ready).
        """
        self.require(name)
        if self.manager is None:
            raise ModelNotReady(name)
        split = self.splits.get(name)
        if split is not None:
            return self._arm(split, version, lookup)
        handle = self.manager.get(name)
        if version is not None and version != str(handle.version.version):
            raise RouteNotFound(
                f"{name} serves version {handle.version.version}, not {version[:20]!r}"
            )
        return Served(name, handle)

    def _arm(self, split: Split, version: str | None, lookup: Lookup | None) -> Served:
        assert self.manager is not None
        for n, arm in enumerate(split.order(lookup)):  # the others sorted only if needed
            try:
                handle = self.manager.get(arm.route)
            except ModelNotReady:
                continue
            if version is not None and version != str(handle.version.version):
                continue  # another arm may serve the version asked for
            arm.answered += 1
            if n:
                arm.fallbacks += 1
            if arm is split.answering[0]:  # the first arm's worker is its own
                return Served(arm.route, handle, arm.config.name, split)
            worker, handle = self._same_version(split, arm, handle)
            return Served(arm.route, handle, arm.config.name, split, worker)
        if version is not None:
            raise RouteNotFound(f"no arm of {split.route} serves version {version[:20]!r}")
        raise ModelNotReady(split.route)

    def _same_version(
        self, split: Split, arm: ArmState, handle: ModelHandle
    ) -> tuple[str, ModelHandle]:
        """The first arm serving the same version as ``arm``: its worker and handle."""
        assert self.manager is not None
        key = handle.version.cache_key
        for other in split.answering:
            if other is arm:
                break
            try:
                theirs = self.manager.get(other.route)
            except ModelNotReady:
                continue
            if theirs.version.cache_key == key and theirs.model.__class__ is handle.model.__class__:
                return other.route, theirs
        return arm.route, handle

    # -- predicting ---------------------------------------------------------------------------

    async def predict(
        self,
        served: Served,
        body: bytes,
        codec: Codec,
        *,
        headers: Mapping[str, str] | None = None,
        endpoint: str = "",
        logged_body: Callable[[], bytes] | None = None,
    ) -> bytes:
        """Decode, predict (batched with other requests) and encode on the route's worker.
        With payload logging on, a sampled request and its answer (or error) are queued for
        the sinks (``headers`` and ``endpoint`` describe the request there; ``logged_body``
        gives the request's bytes when ``body`` is not them, as in gRPC).

        Raises:
            ProtocolError: bad input; TimeoutError: ``server.request_timeout_s`` passed.
        """
        split = served.split
        shadowed = split if split is not None and split.shadows else None
        pristine = copy.copy(codec) if shadowed is not None else None
        payloads = self.payloads
        event = payloads.sample() if payloads is not None else None
        if shadowed is not None:  # its shadow copies wait for it to be idle
            shadowed.in_flight += 1
        try:
            if payloads is not None and event is not None:
                logged = logged_body() if logged_body is not None else body
                answer = await self._logged(
                    payloads, event, served, body, codec, headers, endpoint, logged
                )
            else:
                answer = await self._predict(served, body, codec)
        finally:
            if shadowed is not None:
                shadowed.in_flight -= 1
                if not shadowed.in_flight:
                    shadowed.idle.set()
        if pristine is not None:  # after the answer, never before it
            self.mirror(served, body, pristine, event)
        return answer

    async def _logged(
        self,
        payloads: PayloadLog,
        event: str,
        served: Served,
        body: bytes,
        codec: Codec,
        headers: Mapping[str, str] | None,
        endpoint: str,
        logged: bytes,
    ) -> bytes:
        def record(kind: str, data: bytes, **fields: Any) -> Record:
            return Record(
                event,
                kind,
                time.time(),
                served.name,
                served.handle.version.name,
                served.version,
                endpoint,
                data,
                arm=served.arm,
                **fields,
            )

        content_type = (headers or {}).get("Content-Type", "")
        if payloads.logs_requests:
            payloads.put(record("request", logged, content_type=content_type,
                                headers=payloads.headers(headers)))  # fmt: skip
        try:
            answer = await self._predict(served, body, codec)
        except Exception as exc:
            if payloads.logs_responses:
                error = f"{type(exc).__name__}: {getattr(exc, 'message', None) or exc}"
                payloads.put(record("response", b"", content_type="", error=error[:500]))
            raise
        if payloads.logs_responses:
            payloads.put(record("response", answer, content_type="", status=200))
        return answer

    def mirror(self, served: Served, body: bytes, codec: Codec, event: str | None = None) -> None:
        """Send a copy of an answered request to each shadow arm of its route, after the
        answer: never awaited by it, bounded by the route's ``mirror_queue`` (a copy over it
        is dropped and counted). The shadows' outcomes are counted (and, when the request was
        sampled, logged beside the answer with the same event id)."""
        split = served.split
        if split is None:
            return
        for arm in split.shadows:
            if len(split.pending) >= split.mirror_queue:
                arm.mirror_dropped += 1
                continue
            split.pending.append((arm, body, copy.copy(codec), event))
        if split.pending and split.mirroring is None:
            task = asyncio.get_running_loop().create_task(self._mirror_queue(split))
            split.mirroring = task
            self._mirrors.add(task)
            task.add_done_callback(self._mirrors.discard)

    async def _mirror_queue(self, split: Split) -> None:
        """Predict the route's shadow copies one at a time, each only once no request of the
        route has been in flight for :data:`MIRROR_IDLE_S`: a copy never takes the model's
        time from an answer (under sustained load copies wait, the queue fills, and the rest
        are dropped)."""
        try:
            while split.pending:
                while True:  # idle for a moment, not just between two answers of a busy route
                    if split.in_flight:
                        split.idle.clear()
                        await split.idle.wait()
                    await asyncio.sleep(MIRROR_IDLE_S)
                    if not split.in_flight:
                        break
                arm, body, codec, event = split.pending.popleft()
                await self._shadow(split, arm, body, codec, event)
        finally:
            split.mirroring = None

    async def _shadow(
        self, split: Split, arm: ArmState, body: bytes, codec: Codec, event: str | None
    ) -> None:
        status, error, answer = 200, None, b""
        split.mirror_in_flight += 1
        try:
            assert self.manager is not None
            handle = self.manager.get(arm.route)
            shadow = Served(arm.route, handle, arm.config.name, split)
            answer = await self._predict(shadow, body, codec)
        except Exception as exc:  # recorded, never raised: nobody waits for a shadow
            status = getattr(exc, "status", 500)
            error = f"{type(exc).__name__}: {getattr(exc, 'message', None) or exc}"[:500]
            log.debug("shadow %s of %s: %s", arm.config.name, split.route, error)
        finally:
            split.mirror_in_flight -= 1
        arm.mirrored += 1
        if self.on_shadow is not None:
            self.on_shadow(split.route, arm.config.name, 200 if error is None else status)
        payloads = self.payloads
        if event is not None and payloads is not None and payloads.logs_responses:
            version = handle.version.version if error is None else 0
            model = handle.version.name if error is None else arm.route
            payloads.put(
                Record(event, "response", time.time(), split.route, model, version,
                       "shadow", answer, "", status=200 if error is None else None,
                       error=error, arm=arm.config.name)
            )  # fmt: skip

    async def _predict(self, served: Served, body: bytes, codec: Codec) -> bytes:
        timeout = self.config.server.request_timeout_s
        decoded = None
        if len(body) > DECODE_INLINE_BYTES:
            loop = asyncio.get_running_loop()
            work = loop.run_in_executor(self._decoders, codec.decode, body, served.handle.model)
            decoded = await asyncio.wait_for(work, timeout)
            body = b""
        worker = self.worker(served.worker or served.route)
        submitted = worker.submit(served.handle, body, codec, decoded)
        # A timer on the future itself (wait_for would wrap it in a task per request); the
        # worker skips a job whose future is done, so an expired one is never predicted.
        timer = asyncio.get_running_loop().call_later(timeout, _expire, submitted)
        try:
            return await submitted
        finally:
            timer.cancel()

    async def inflate(self, body: bytes, encoding: str, limit: int) -> bytes:
        """``body`` decoded from its Content-Encoding, on the decode threads (inflating is
        CPU work: up to ``limit`` bytes of it), inline when it is tiny.

        Raises:
            ProtocolError: see :func:`serving.codecs.base.inflate`.
        """
        if len(body) <= INFLATE_INLINE_BYTES:
            return inflate(body, encoding, limit)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._decoders, inflate, body, encoding, limit)

    def worker(self, route: str) -> RouteWorker:
        """The predict worker of ``route`` (created on first use, on the loop thread)."""
        worker = self.workers.get(route)
        if worker is None:
            server = self.config.server
            worker = RouteWorker(
                route,
                max_batch_size=server.max_batch_size,
                max_batch_delay_s=server.max_batch_delay_ms / 1000,
                threads=self.config.predict_threads(route),
                on_batch=self._on_batch,
            )
            self.workers[route] = worker
        return worker

    async def retire_workers(self) -> None:
        """Drain and stop the workers whose route is gone or whose thread count changed; the
        next request to such a route starts a new one."""
        names = {spec.name for spec in self.config.route_specs()}
        for name, worker in list(self.workers.items()):
            if name not in names or worker.threads != self.config.predict_threads(name):
                del self.workers[name]
                await asyncio.to_thread(worker.close)

    def close(self) -> None:
        """Finish queued requests and stop every worker (blocking: run it off the loop)."""
        workers, self.workers = list(self.workers.values()), {}
        for worker in workers:
            worker.close()
        self._decoders.shutdown(wait=True)
