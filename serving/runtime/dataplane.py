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
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from loader.errors import ModelNotReady
from loader.manager import ModelHandle, ModelManager
from serving.codecs.base import Codec, inflate
from serving.config import Config
from serving.runtime.batching import RouteWorker
from serving.runtime.payloads import PayloadLog, Record

#: Bodies larger than this are decoded on the decode threads, not the predict thread.
DECODE_INLINE_BYTES = 256 * 1024
DECODE_THREADS = 2
#: Compressed bodies up to this size inflate on the loop (at most ~1 MB out: about a ms).
INFLATE_INLINE_BYTES = 1024

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
        #: Set by the lifecycle when ``[logging.payloads]`` is on.
        self.payloads: PayloadLog | None = None
        self._on_batch = on_batch
        #: Large bodies are decoded here, never on a model's predict thread (a 100 k-column
        #: CSV held a model's only thread for 12 s); small ones on it (no extra hop).
        self._decoders = concurrent.futures.ThreadPoolExecutor(
            DECODE_THREADS, thread_name_prefix="modeld-decode"
        )

    # -- which route, which handle ------------------------------------------------------------

    def names(self) -> list[str]:
        """The routes served (configured ones until the pipeline exists)."""
        if self.manager is not None:
            return self.manager.names()
        return [m.name for m in self.config.models]

    def serves(self, name: str) -> bool:
        """Whether ``name`` is a route (asked per request: no list is built)."""
        if self.manager is not None:
            return self.manager.serves(name)
        return any(m.name == name for m in self.config.models)

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

    def serving(self, name: str, *, version: str | None = None) -> Served:
        """The handle answering for ``name`` now, resolved once for the whole request.

        Raises:
            RouteNotFound: no such route, or it serves another ``version`` than asked.
            ModelNotReady: the route has no version loaded yet.
        """
        self.require(name)
        if self.manager is None:
            raise ModelNotReady(name)
        handle = self.manager.get(name)
        if version is not None and version != str(handle.version.version):
            raise RouteNotFound(
                f"{name} serves version {handle.version.version}, not {version[:20]!r}"
            )
        return Served(name, handle)

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
        payloads = self.payloads
        if payloads is not None and (event := payloads.sample()) is not None:
            logged = logged_body() if logged_body is not None else body
            return await self._logged(
                payloads, event, served, body, codec, headers, endpoint, logged
            )
        return await self._predict(served, body, codec)

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
                served.route,
                served.handle.version.name,
                served.version,
                endpoint,
                data,
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

    async def _predict(self, served: Served, body: bytes, codec: Codec) -> bytes:
        timeout = self.config.server.request_timeout_s
        decoded = None
        if len(body) > DECODE_INLINE_BYTES:
            loop = asyncio.get_running_loop()
            work = loop.run_in_executor(self._decoders, codec.decode, body, served.handle.model)
            decoded = await asyncio.wait_for(work, timeout)
            body = b""
        submitted = self.worker(served.route).submit(served.handle, body, codec, decoded)
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
        names = {m.name for m in self.config.models}
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
