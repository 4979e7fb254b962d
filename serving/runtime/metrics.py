"""Prometheus metrics (prometheus-client), one registry per app (no globals).

Request metrics come from the transports (:meth:`Metrics.track`, one per prediction request,
told the route and version that answered); lifecycle metrics from the manager's observer events;
cache, model info and dependency figures are read at scrape time (in a worker thread: the cache
index is on disk; not in the load executor, which a long load holds). With ``--workers`` the
counters go through prometheus-client's multiprocess files and each worker publishes its model
state beside them, so whichever worker answers a scrape reports them all.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily

from serving.runtime.history import History
from serving.runtime.peers import PEERS_DIR_ENV, peer_states, publish_state, worker_state

if TYPE_CHECKING:
    from loader.manager import ModelManager

log = logging.getLogger(__name__)
ManagerRef = Callable[[], "ModelManager | None"]

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
LOAD_BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
#: The metrics label of every request for a route that is not served (bounded cardinality).
UNKNOWN_ROUTE = "(unknown)"
ENV_BUILD_BUCKETS_S = (1, 5, 10, 30, 60, 120, 300, 600, 1800)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    """Every metric modeld exports."""

    def __init__(self, manager: ManagerRef) -> None:
        self.manager = manager
        self.seen = 0  # prediction requests this process read...
        self.answered = 0  # ...and answered (logged at shutdown: proof of a clean drain)
        self.history = History()  # the status page's charts: the last hour per route
        #: The first load of every route has been tried (the supervisor waits for it).
        self.started = False
        self.route_stats: dict[str, RouteStats] = {}
        #: Label children by label values: ``labels()`` takes a lock and builds a key per call,
        #: and no series is ever removed, so each request reuses the children it needs.
        self._children: dict[tuple[Any, ...], Any] = {}
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "modeld_requests",
            "Prediction requests by model, version and HTTP status",
            ["model", "version", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "modeld_request_duration_seconds",
            "Prediction request latency",
            ["model"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.in_flight = Gauge(
            "modeld_requests_in_flight",
            "Prediction requests being answered",
            ["model"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.batch_size = Histogram(
            "modeld_batch_size",
            "Requests answered by one predict call",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.swaps = Counter(
            "modeld_swaps",
            "Version swaps by outcome (swapped, rejected) and rejection step",
            ["model", "outcome", "reason"],
            registry=r,
        )
        self.load = Histogram(
            "modeld_load_duration_seconds",
            "Model load time",
            ["model"],
            buckets=LOAD_BUCKETS_S,
            registry=r,
        )
        self.warmup = Histogram(
            "modeld_warmup_duration_seconds",
            "Warm-up prediction time",
            ["model"],
            buckets=LOAD_BUCKETS_S,
            registry=r,
        )
        self.poll = Histogram(
            "modeld_registry_poll_duration_seconds",
            "Registry poll latency",
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.poll_failures = Counter(
            "modeld_registry_poll_failures", "Polls that found the registry unreachable", registry=r
        )
        self.cache_events = Counter(
            "modeld_cache", "Disk cache lookups and evictions", ["event"], registry=r
        )
        self.env_builds = Counter(
            "modeld_env_builds", "Isolated environment builds", ["outcome"], registry=r
        )
        self.env_build_seconds = Histogram(
            "modeld_env_build_duration_seconds",
            "Time to build an isolated environment (uv venv + install + check)",
            buckets=ENV_BUILD_BUCKETS_S,
            registry=r,
        )

        def counter(name: str, doc: str, *labels: str) -> Counter:
            return Counter(name, doc, list(labels), registry=r)

        self.arm_requests = counter(
            "modeld_arm_requests",
            "Prediction requests of a route with arms, by the arm that answered and status",
            *("route", "arm", "status"),
        )
        self.arm_latency = Histogram(
            "modeld_arm_request_duration_seconds",
            "Prediction request latency of a route with arms, by the arm that answered",
            ["route", "arm"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.shadow_requests = counter(
            "modeld_shadow_requests",
            "Shadow copies predicted, by route, shadow arm and status",
            *("route", "arm", "status"),
        )
        self.payloads_logged = counter(
            "modeld_payload_events_logged", "Payload log events written, by sink (file, http)",
            "sink",
        )  # fmt: skip
        self.payloads_dropped = counter(
            "modeld_payload_events_dropped",
            "Payload log events dropped: queue_full (the sinks fell behind) or sink_error",
            "reason",
        )
        r.register(_StateCollector(manager))

    def cache_event(self, event: str) -> None:
        """The ModelCache's observer: hits, misses, evictions."""
        self.cache_events.labels(event).inc()

    def exposition(self) -> bytes:
        """The text format; across all worker processes when they share a multiprocess dir."""
        from prometheus_client import generate_latest

        if not os.environ.get(PEERS_DIR_ENV):
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)
        merged.register(_StateCollector(self.manager, os.environ[PEERS_DIR_ENV]))
        return generate_latest(merged)

    def observe(self, event: str, fields: dict[str, Any]) -> None:
        """The ModelManager's observer (runs on the load thread). With ``--workers``, each
        event also republishes this worker's state for the others' scrapes."""
        self.publish()
        if event == "swap":
            self.history.event(fields["route"], "swap", fields["version"])
            self.swaps.labels(fields["route"], "swapped", "").inc()
            self.load.labels(fields["route"]).observe(fields["load_s"])
            self.warmup.labels(fields["route"]).observe(fields["warmup_s"])
        elif event == "reject":
            self.history.event(fields["route"], "reject", fields["version"], fields["step"])
            self.swaps.labels(fields["route"], "rejected", fields["step"]).inc()
        elif event == "poll":
            self.poll.observe(fields["seconds"])
            if not fields["ok"]:
                self.poll_failures.inc()
        elif event == "env_build":
            self.env_builds.labels("built" if fields["ok"] else "failed").inc()
            self.env_build_seconds.observe(fields["seconds"])

    def shadow(self, route: str, arm: str, status: int) -> None:
        """A shadow copy's outcome (the data plane's ``on_shadow``)."""
        self.child(self.shadow_requests, route, arm, str(status)).inc()

    def payload(self, outcome: str, what: str, count: int) -> None:
        """The payload logger's observer (its thread, or the request path for a full queue)."""
        counter = self.payloads_logged if outcome == "logged" else self.payloads_dropped
        self.child(counter, what).inc(count)

    def publish(self) -> None:
        """With ``--workers``: write this worker's state for the others and the supervisor."""
        directory = os.environ.get(PEERS_DIR_ENV)
        manager = self.manager()
        if not directory or manager is None:
            return
        try:
            publish_state(manager, directory, started=self.started)
        except OSError as exc:  # metrics must never break following
            log.warning("could not publish this worker's state for /metrics: %s", exc)

    def child(self, metric: Any, *values: str) -> Any:
        """``metric.labels(*values)``, looked up once per label values."""
        key = (id(metric), *values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found

    def track(self, model: str) -> RequestTrack:
        """Start counting one prediction request for route ``model`` (the label until the
        request says which route answered); call :meth:`RequestTrack.done` at its end."""
        return RequestTrack(self, model)

    def batch(self, route: str, size: int) -> None:
        """A predict call answered ``size`` requests of ``route``."""
        self.child(self.batch_size, route).observe(size)
        self.history.batch(route, size)
        self.stats_of(route).executions += 1

    def stats_of(self, route: str) -> RouteStats:
        """``route``'s counters since start (``/v2/models/{name}/stats``)."""
        stats = self.route_stats.get(route)
        if stats is None:
            stats = self.route_stats[route] = RouteStats()
        return stats


@dataclass(slots=True)
class RouteStats:
    """A route's inference counters, as Triton's statistics extension reports them."""

    success: int = 0
    success_ns: int = 0
    fail: int = 0
    fail_ns: int = 0
    executions: int = 0
    last_inference_ms: int = 0

    def to_triton(self, name: str, version: str) -> dict[str, Any]:
        zero = {"count": 0, "ns": 0}
        return {
            "name": name,
            "version": version,
            "last_inference": self.last_inference_ms,
            "inference_count": self.success,
            "execution_count": self.executions,
            "inference_stats": {
                "success": {"count": self.success, "ns": self.success_ns},
                "fail": {"count": self.fail, "ns": self.fail_ns},
                "queue": dict(zero),
                "compute_input": dict(zero),
                "compute_infer": {"count": self.success, "ns": self.success_ns},
                "compute_output": dict(zero),
                "cache_hit": dict(zero),
                "cache_miss": dict(zero),
            },
            "batch_stats": [],
        }


class RequestTrack:
    """One prediction request in flight: its gauge, latency and outcome."""

    __slots__ = ("_metrics", "_model", "_started")

    def __init__(self, metrics: Metrics, model: str) -> None:
        self._metrics, self._model = metrics, model
        self._started = time.perf_counter()
        metrics.child(metrics.in_flight, model).inc()
        metrics.seen += 1

    def done(
        self,
        status: int,
        *,
        route: str | None = None,
        version: int | None = None,
        answered: bool = True,
        arm: tuple[str, str] | None = None,
    ) -> None:
        """The request ended with HTTP-like ``status``, for ``route`` at ``version`` (None when
        no version took it); ``answered`` is False when it ended without an answer (cancelled:
        the client went away, or the server stopped); ``arm`` is (route, arm) when a route
        with arms answered."""
        m = self._metrics
        m.child(m.in_flight, self._model).dec()
        model = route or self._model
        seconds = time.perf_counter() - self._started
        if arm is not None:
            m.child(m.arm_requests, arm[0], arm[1], str(status)).inc()
            m.child(m.arm_latency, arm[0], arm[1]).observe(seconds)
        m.child(m.latency, model).observe(seconds)
        m.history.request(model, seconds, status)
        m.child(m.requests, model, "" if version is None else str(version), str(status)).inc()
        if answered:
            m.answered += 1
        if route is not None:  # a served route (the statistics extension's counters)
            stats = m.stats_of(route)
            ns = int(seconds * 1e9)
            if status < 400:
                stats.success += 1
                stats.success_ns += ns
                stats.last_inference_ms = int(time.time() * 1000)
            else:
                stats.fail += 1
                stats.fail_ns += ns


def state_families(states: list[dict[str, Any]]) -> Iterator[Any]:
    """Model info, dependency mismatches and registry reachability across ``states`` (one per
    worker): every distinct (route, ref, version, stale) served anywhere, so a swap half done
    across workers shows both versions; the most mismatches and the worst reachability."""
    info = InfoMetricFamily(
        "modeld_model",
        "The version each route serves (in any worker)",
        labels=["route", "ref", "version", "stale"],
    )
    mismatches = GaugeMetricFamily(
        "modeld_dependency_mismatches",
        "Unmet requirements of the served version",
        labels=["model"],
    )
    seen: set[tuple[str, ...]] = set()
    worst: dict[str, int] = {}
    for state in states:
        for route, ref, version, stale, unmet in state["models"]:
            if (route, ref, version, stale) not in seen:
                seen.add((route, ref, version, stale))
                info.add_metric([route, ref, version, stale], {})
            worst[route] = max(worst.get(route, 0), unmet)
    for route, unmet in worst.items():
        mismatches.add_metric([route], unmet)
    yield info
    yield mismatches
    up = GaugeMetricFamily("modeld_registry_reachable", "1 when the last poll reached the registry")
    up.add_metric([], 1 if all(state["reachable"] for state in states) else 0)
    yield up


class _StateCollector:
    """Figures read at scrape time: this worker's (and, with ``--workers``, the others'
    published) state, and the shared cache."""

    def __init__(self, manager: ManagerRef, peers_dir: str | None = None) -> None:
        self.manager = manager
        self.peers_dir = peers_dir

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        manager = self.manager()
        if manager is None:
            return
        peers = peer_states(self.peers_dir) if self.peers_dir else []
        yield from state_families([worker_state(manager), *peers])
        cache = manager.source.cache
        entries = cache.entries()
        yield GaugeMetricFamily(
            "modeld_cache_bytes", "Bytes in the disk cache", value=sum(e["bytes"] for e in entries)
        )
        yield GaugeMetricFamily(
            "modeld_cache_entries", "Model versions in the disk cache", value=len(entries)
        )
