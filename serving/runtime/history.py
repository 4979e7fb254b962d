"""The last hour of each route, in memory, for the status page's charts.

Ten-second buckets (requests, errors, a latency histogram, batch sizes) and the route's swap
and rejection events, in bounded ring buffers: no dependency, no disk, a few KB per route. With
``--workers`` each worker keeps its own (the page says so).
"""

from __future__ import annotations

import bisect
import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

BUCKET_S = 10.0
WINDOW_S = 3600.0
BUCKETS = int(WINDOW_S / BUCKET_S)
#: Latency bin upper bounds (seconds): 0.1 ms to ~100 s, 12 bins a decade.
LATENCY_BINS_S = tuple(1e-4 * 10 ** (i / 12) for i in range(73))
MAX_EVENTS = 200


@dataclass(slots=True)
class _Bucket:
    start: float
    requests: int = 0
    errors: int = 0
    latency: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BINS_S) + 1))
    batch_sum: int = 0
    batch_calls: int = 0


@dataclass(frozen=True, slots=True)
class Event:
    at: float
    kind: str  #: ``swap`` | ``reject``
    version: int
    step: str | None = None


@dataclass(frozen=True, slots=True)
class Series:
    """One route's last hour, one value per bucket (oldest first), and its events."""

    start: float
    bucket_s: float
    rps: list[float]
    p50_ms: list[float | None]
    p99_ms: list[float | None]
    errors: list[int]
    batch: list[float | None]
    events: list[Event]


class History:
    """Per-route ring buffers; safe to feed from the loop and the predict threads."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, collections.deque[_Bucket]] = {}
        self._events: dict[str, collections.deque[Event]] = {}

    def request(self, route: str, seconds: float, status: int) -> None:
        with self._lock:
            bucket = self._bucket(route)
            bucket.requests += 1
            if status >= 400:
                bucket.errors += 1
            bucket.latency[bisect.bisect_left(LATENCY_BINS_S, seconds)] += 1

    def batch(self, route: str, size: int) -> None:
        with self._lock:
            bucket = self._bucket(route)
            bucket.batch_sum += size
            bucket.batch_calls += 1

    def event(self, route: str, kind: str, version: int, step: str | None = None) -> None:
        with self._lock:
            events = self._events.setdefault(route, collections.deque(maxlen=MAX_EVENTS))
            events.append(Event(self._clock(), kind, version, step))

    def series(self, route: str) -> Series:
        """The last hour of ``route`` (empty buckets as zeros / None)."""
        now = self._clock()
        start = _floor(now) - (BUCKETS - 1) * BUCKET_S
        with self._lock:
            by_start = {b.start: b for b in self._buckets.get(route, ())}
            events = [e for e in self._events.get(route, ()) if e.at >= now - WINDOW_S]
            before = [e for e in self._events.get(route, ()) if e.at < now - WINDOW_S]
            if before:  # what served when the window opens
                events.insert(0, before[-1])
            rows = [by_start.get(start + i * BUCKET_S) for i in range(BUCKETS)]
            rps = [b.requests / BUCKET_S if b else 0.0 for b in rows]
            p50 = [_quantile(b.latency, 0.50) if b and b.requests else None for b in rows]
            p99 = [_quantile(b.latency, 0.99) if b and b.requests else None for b in rows]
            errors = [b.errors if b else 0 for b in rows]
            batch = [b.batch_sum / b.batch_calls if b and b.batch_calls else None for b in rows]
        return Series(start, BUCKET_S, rps, p50, p99, errors, batch, events)

    def _bucket(self, route: str) -> _Bucket:
        ring = self._buckets.get(route)
        if ring is None:
            ring = self._buckets[route] = collections.deque(maxlen=BUCKETS)
        start = _floor(self._clock())
        if not ring or ring[-1].start < start:
            ring.append(_Bucket(start))
        return ring[-1]

    def forget(self, keep: Any) -> None:
        """Drop the routes not in ``keep`` (removed from the config)."""
        with self._lock:
            for name in [n for n in self._buckets if n not in keep]:
                del self._buckets[name]
            for name in [n for n in self._events if n not in keep]:
                del self._events[name]


def _floor(t: float) -> float:
    return t - t % BUCKET_S


def _quantile(counts: list[int], q: float) -> float:
    """The ``q`` quantile (milliseconds) of a latency histogram: its bin's upper bound."""
    target = q * sum(counts)
    seen = 0
    for index, count in enumerate(counts):
        seen += count
        if seen >= target and count:
            bound = LATENCY_BINS_S[min(index, len(LATENCY_BINS_S) - 1)]
            return round(bound * 1000, 3)
    return round(LATENCY_BINS_S[-1] * 1000, 3)
