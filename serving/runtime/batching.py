"""Adaptive batching: one worker thread per route decodes, batches, predicts and encodes.

While a model is busy, requests that arrive for it queue up; the next ``predict`` runs on all of
them concatenated (same columns and dtypes, identical ``params``) and each request gets exactly
its own rows back. An idle server adds no delay: a lone request is predicted at once, unless
``max_batch_delay_ms`` asks to wait for company. Each request is decoded (validated) on its own
before it joins a batch, and a batch that fails is re-run one request at a time, so bad input in
one request never fails the others. One predict per model at a time by default: concurrent
``predict`` calls on a CPU-bound model only fight (DESIGN.md). A model that waits on I/O (a
pyfunc calling a remote service) is given more threads (``predict_threads``), each taking
batches from the same queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from loader.lean import LeanCall, ModelMemo
from loader.manager import ModelHandle
from serving.codecs.base import Codec, Decoded, conformant_frame
from serving.runtime.predict import predict

log = logging.getLogger(__name__)

_STOP = object()
#: The longest adaptive wait for company under load (see RouteWorker._wait_s).
ADAPTIVE_WAIT_CAP_S = 0.010
#: ... and at most this share of a batch's processing time.
WAIT_FRACTION = 0.5


@dataclass(slots=True)
class _Job:
    handle: ModelHandle
    body: bytes
    codec: Codec
    future: asyncio.Future[bytes]
    loop: asyncio.AbstractEventLoop
    request: Decoded | None = None
    key: Any = field(default=None)


@dataclass
class BatchStats:
    """Counters for status and metrics: predict calls and requests they answered."""

    calls: int = 0
    requests: int = 0
    largest: int = 0


class RouteWorker:
    """The predict path of one route: a thread fed by a queue."""

    def __init__(
        self,
        route: str,
        *,
        max_batch_size: int = 32,
        max_batch_delay_s: float = 0.0,
        threads: int = 1,
        on_batch: Callable[[str, int], None] | None = None,
    ):
        self.route = route
        self.max_batch_size = max(1, max_batch_size)
        self.max_batch_delay_s = max(0.0, max_batch_delay_s)
        self.stats = BatchStats()
        self._on_batch = on_batch
        self._predict_s: float | None = None  # moving average of one batch's processing time
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._unbatchable = ModelMemo()
        self._stats_lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, name=f"modeld-predict-{route}-{i}", daemon=True)
            for i in range(max(1, threads))
        ]
        for thread in self._threads:
            thread.start()

    @property
    def threads(self) -> int:
        return len(self._threads)

    def submit(
        self,
        handle: ModelHandle,
        body: bytes,
        codec: Codec,
        decoded: Decoded | None = None,
    ) -> asyncio.Future[bytes]:
        """Queue one request (``decoded`` when it was decoded elsewhere); the future resolves
        to the encoded response body."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bytes] = loop.create_future()
        self._queue.put(_Job(handle, body, codec, future, loop, decoded))
        return future

    def close(self, timeout_s: float = 30.0) -> None:
        """Finish what is queued, then stop the threads (each takes one stop mark)."""
        for _ in self._threads:
            self._queue.put(_STOP)
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    # -- the worker thread --------------------------------------------------------------------

    def _run(self) -> None:
        expected = 1  # how many requests the next batch may count on (see _gather)
        while True:
            job = self._queue.get()
            if job is _STOP:
                return
            jobs, stopping = self._gather(job, expected)
            started = time.perf_counter()
            with _batched_answers():
                try:
                    self._process(jobs)
                except BaseException as exc:  # never lose a request to a bug here
                    log.exception("%s: batch processing failed", self.route)
                    for j in jobs:
                        _fail(j, exc)
            elapsed = time.perf_counter() - started
            self._predict_s = (
                elapsed if self._predict_s is None else (0.8 * self._predict_s + 0.2 * elapsed)
            )
            if stopping:
                return
            # The clients in play: those just answered (in a closed loop they come back) and
            # those already waiting. One at a time, that is 1: no waiting for anyone.
            expected = min(self.max_batch_size, len(jobs) + self._queue.qsize())

    def _gather(self, first: _Job, expected: int) -> tuple[list[_Job], bool]:
        """A batch: ``first``, everything already queued, and, while fewer than ``expected``
        (the clients in play when the last batch ended) have arrived, whatever comes within the
        wait (:meth:`_wait_s`)."""
        jobs = [first]
        deadline = None
        while len(jobs) < self.max_batch_size:
            try:
                nxt = self._queue.get_nowait()
            except queue.Empty:
                if deadline is None:
                    wait = self._wait_s(expected)
                    deadline = time.monotonic() + wait
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (len(jobs) >= expected and not self.max_batch_delay_s):
                    break
                try:
                    nxt = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
            if nxt is _STOP:
                return jobs, True
            jobs.append(nxt)
        return jobs, False

    def _wait_s(self, expected: int) -> float:
        """How long to wait for company. ``max_batch_delay_ms`` when set; otherwise nothing
        while requests come one at a time (an idle server adds no delay), and under concurrent
        load until as many have come as were in play when the last batch ended, half a predict
        at most (10 ms cap): waiting for the clients one batch answered lets them land in the
        next batch together instead of in a string of small ones."""
        if self.max_batch_delay_s:
            return self.max_batch_delay_s
        if expected <= 1 or self._predict_s is None:
            return 0.0
        return min(ADAPTIVE_WAIT_CAP_S, WAIT_FRACTION * self._predict_s)

    def _process(self, jobs: list[_Job]) -> None:
        ready = []
        for job in jobs:
            if job.future.done():  # timed out or client gone while queued
                continue
            if job.request is None:  # a small body: decoded here, no hop
                try:
                    job.request = job.codec.decode(job.body, job.handle.model)
                except Exception as exc:
                    _fail(job, exc)
                    continue
            job.body = b""
            job.key = self._batch_key(job)
            ready.append(job)
        groups: dict[Any, list[_Job]] = {}
        for job in ready:
            groups.setdefault(job.key if job.key is not None else id(job), []).append(job)
        for group in groups.values():
            if len(group) == 1:
                self._predict_one(group[0])
            else:
                self._predict_batch(group)

    def _batch_key(self, job: _Job) -> Any:
        """Requests with equal keys can share a predict: same model, same columns and dtypes,
        same params, same protocol. None: this one goes alone."""
        request = job.request
        assert request is not None
        if request.unwrapped or self._unbatchable.get(job.handle.model):
            return None
        try:
            params = (
                orjson.dumps(request.params, option=orjson.OPT_SORT_KEYS) if request.params else b""
            )
        except TypeError:
            return None
        if request.matrix is not None:  # conformant: the model (in the key) fixes columns, dtype
            shape: tuple[Any, ...] = ("matrix",)
        else:
            import pandas as pd

            data = request.data
            if not isinstance(data, pd.DataFrame):
                return None
            shape = ("frame", tuple(data.columns), tuple(map(str, data.dtypes)))
        return (id(job.handle.model), shape, params, request.conformant, type(job.codec))

    def _predict_one(self, job: _Job) -> None:
        request = job.request
        assert request is not None
        try:
            model = job.handle.model
            lean = _lean(job.handle, request)
            result = predict(
                model,
                request.matrix
                if lean is not None
                else request.model_input(blocks=getattr(model, "takes_blocks", False)),
                request.params,
                conformant=request.conformant,
                lean=lean,
            )
            body = job.codec.encode(result, request, job.handle)
        except Exception as exc:
            _fail(job, exc)
            return
        self._count(1)
        _succeed(job, body)

    def _predict_batch(self, group: list[_Job]) -> None:
        first = group[0].request
        assert first is not None
        model = group[0].handle.model
        lean = _lean(group[0].handle, first)  # the key holds model, params, conformance
        frame = _stack(
            [j.request for j in group],  # type: ignore[misc]
            blocks=getattr(model, "takes_blocks", False),
            matrix=lean is not None,
        )
        total = len(frame)
        try:
            result = predict(model, frame, first.params, conformant=first.conformant, lean=lean)
        except Exception:
            for job in group:  # attribute the failure to the request(s) that cause it
                self._predict_one(job)
            return
        parts = _split(result, [j.request.rows for j in group], total)  # type: ignore[union-attr]
        if parts is None:
            self._unbatchable.set(model, True)
            log.warning(
                "%s: %s's output is not row-aligned with its input (%s for %d rows): "
                "predicting one request at a time from now on",
                self.route,
                group[0].handle.label,
                type(result).__name__,
                total,
            )
            for job in group:
                self._predict_one(job)
            return
        self._count(len(group))
        for job, part in zip(group, parts, strict=True):
            assert job.request is not None
            try:
                body = job.codec.encode(part, job.request, job.handle)
            except Exception as exc:
                _fail(job, exc)
                continue
            _succeed(job, body)

    def _count(self, n: int) -> None:
        if self._on_batch is not None:
            self._on_batch(self.route, n)
        with self._stats_lock:
            self.stats.calls += 1
            self.stats.requests += n
            self.stats.largest = max(self.stats.largest, n)


def _lean(handle: ModelHandle, request: Decoded) -> LeanCall | None:
    """The handle's lean call, for a conformant request without params (else None)."""
    if request.matrix is None or request.params or not request.conformant:
        return None
    return handle.lean


def _stack(requests: list[Decoded], *, blocks: bool = False, matrix: bool = False) -> Any:
    """One model input holding every request's rows, in order (see ``Decoded.model_input``);
    with ``matrix``, the conformant rows as one matrix (for the lean call)."""
    first = requests[0]
    if first.matrix is not None:
        import numpy as np

        rows = np.concatenate([r.matrix for r in requests])
        if matrix:
            return rows
        if blocks:
            from loader.envworker import Block

            return Block(rows, first.columns or [])
        return conformant_frame(rows, first.columns)
    import pandas as pd

    return pd.concat([r.data for r in requests], ignore_index=True)


def _split(result: Any, sizes: list[int], total: int) -> list[Any] | None:
    """Cut a batched result back into per-request parts; None when not row-aligned."""
    try:
        if len(result) != total:
            return None
    except TypeError:
        return None
    take: Callable[[int, int], Any]
    if hasattr(result, "iloc"):
        take = lambda a, b: result.iloc[a:b]  # noqa: E731
    elif hasattr(result, "shape") or isinstance(result, list | tuple):
        take = lambda a, b: result[a:b]  # noqa: E731
    else:
        return None
    parts, start = [], 0
    for size in sizes:
        parts.append(take(start, start + size))
        start += size
    return parts


_outbox = threading.local()  # per predict thread: the answers of the batch it works on


def _succeed(job: _Job, body: bytes) -> None:
    _deliver(job, body, None)


def _fail(job: _Job, exc: BaseException) -> None:
    _deliver(job, None, exc)


def _deliver(job: _Job, body: bytes | None, exc: BaseException | None) -> None:
    """Hand an answer to its request's loop: at once outside a batch, else with the batch's
    other answers when it is done (:func:`_flush`: one wake-up of the loop per batch)."""
    pending = getattr(_outbox, "pending", None)
    if pending is None:
        job.loop.call_soon_threadsafe(_resolve, [(job.future, body, exc)])
    else:
        pending.setdefault(job.loop, []).append((job.future, body, exc))


@contextlib.contextmanager
def _batched_answers() -> Iterator[None]:
    """Collect the answers given inside, and deliver them together, one call per loop."""
    _outbox.pending = {}
    try:
        yield
    finally:
        pending, _outbox.pending = _outbox.pending, None
        for loop, answers in pending.items():
            loop.call_soon_threadsafe(_resolve, answers)


Answer = tuple[asyncio.Future[bytes], bytes | None, BaseException | None]


def _resolve(answers: list[Answer]) -> None:
    for future, body, exc in answers:
        if future.done():
            continue
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(body)  # type: ignore[arg-type]
