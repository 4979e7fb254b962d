"""Payload logging: sampled requests and responses for monitoring, never on the request path.

The request path only draws the sample and puts two small records on a bounded queue (the
bodies are the bytes it already holds). One thread drains the queue in batches: it renders
each record (parses a JSON body, redacts configured fields, drops a body over the size cap),
writes a JSON Lines file that rotates by size, and POSTs CloudEvents to an HTTP sink in the
batched structured mode (``application/cloudevents-batch+json``) with KServe's logger's event
types, ``org.kubeflow.serving.inference.request`` and ``.response``, the same ``id`` on both.
A full queue or a failing sink drops events and counts them; neither ever delays or fails a
prediction. Nothing here knows aiohttp.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import queue
import random
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from serving.config import PayloadLogConfig

log = logging.getLogger(__name__)

EVENT_TYPES = {
    "request": "org.kubeflow.serving.inference.request",
    "response": "org.kubeflow.serving.inference.response",
}
#: Logged as "<redacted>" whatever the configuration says.
SECRET_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key"}
)
REDACTED = "<redacted>"
_STOP = object()


@dataclass(frozen=True, slots=True)
class Record:
    """One request or response, as the request path hands it over (nothing rendered yet)."""

    id: str
    kind: str  #: ``request`` | ``response``
    time: float
    route: str
    model: str
    version: int
    endpoint: str
    body: bytes
    content_type: str
    headers: tuple[tuple[str, str], ...] = ()
    status: int | None = None
    error: str | None = None
    arm: str | None = None


#: ``observe(outcome, sink_or_reason, count)``: ``logged`` per sink, ``dropped`` per reason.
Observer = Callable[[str, str, int], None]


class PayloadLog:
    """The payload logger of one server: :meth:`sample` then :meth:`put` on the request path."""

    def __init__(self, config: PayloadLogConfig, *, observe: Observer | None = None) -> None:
        self.config = config
        self._observe = observe or (lambda outcome, what, n: None)
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=config.queue_size)
        self._redact_fields = frozenset(config.redact_fields)
        self._redact_headers = SECRET_HEADERS | {h.lower() for h in config.redact_headers}
        self._sinks: list[Sink] = []
        if config.file:
            self._sinks.append(FileSink(Path(config.file), config.file_max_bytes,
                                        config.file_backups))  # fmt: skip
        if config.url:
            self._sinks.append(CloudEventsSink(config.url, config.source, config.timeout_s))
        self._thread: threading.Thread | None = None

    @property
    def logs_requests(self) -> bool:
        return self.config.mode in ("all", "request")

    @property
    def logs_responses(self) -> bool:
        return self.config.mode in ("all", "response")

    def start(self) -> None:
        self._thread = threading.Thread(target=self._drain, name="modeld-payloads", daemon=True)
        self._thread.start()

    def sample(self) -> str | None:
        """An event id when this prediction is logged, else None."""
        if self.config.sample < 1 and random.random() >= self.config.sample:
            return None
        return uuid.uuid4().hex

    def put(self, record: Record) -> None:
        """Queue ``record`` for the sinks; when the queue is full it is dropped and counted."""
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self._observe("dropped", "queue_full", 1)

    def headers(self, headers: Mapping[str, str] | None) -> tuple[tuple[str, str], ...]:
        """Request headers as logged: secrets and configured names as "<redacted>"."""
        if not headers:
            return ()
        return tuple(  # str(): aiohttp's header names are a str subclass orjson refuses
            (str(k), REDACTED if k.lower() in self._redact_headers else str(v))
            for k, v in headers.items()
        )

    def close(self, timeout_s: float = 10.0) -> None:
        """Write what is queued (bounded by ``timeout_s``), then stop the thread."""
        if self._thread is None:
            return
        deadline = time.monotonic() + timeout_s
        with contextlib.suppress(queue.Full):  # a stuck sink: the daemon thread is left behind
            self._queue.put(_STOP, timeout=timeout_s)
        self._thread.join(max(0.0, deadline - time.monotonic()))
        self._thread = None
        for sink in self._sinks:
            sink.close()

    # -- the drain thread -----------------------------------------------------------------

    def _drain(self) -> None:
        stopping = False
        while not stopping:
            batch: list[Record] = []
            first = self._queue.get()
            if first is _STOP:
                break
            batch.append(first)
            deadline = time.monotonic() + self.config.flush_interval_s
            while len(batch) < self.config.batch_size:
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                    break
                batch.append(item)
            self._write(batch)

    def _write(self, batch: list[Record]) -> None:
        events = [self._render(record) for record in batch]
        for sink in self._sinks:
            try:
                sink.write(events)
            except Exception as exc:  # a sink down or full: drop and count, keep serving
                self._observe("dropped", "sink_error", len(events))
                log.warning(
                    "payload log sink %s failed, %d events dropped: %s",
                    sink.name,
                    len(events),
                    exc,
                )
            else:
                self._observe("logged", sink.name, len(events))

    def _render(self, record: Record) -> dict[str, Any]:
        event: dict[str, Any] = {
            "id": record.id,
            "type": record.kind,
            "time": record.time,
            "route": record.route,
            "model": record.model,
            "version": record.version,
            "arm": record.arm,
            "endpoint": record.endpoint,
            "content_type": record.content_type,
        }
        if record.headers:
            event["headers"] = dict(record.headers)
        if record.status is not None:
            event["status"] = record.status
        if record.error is not None:
            event["error"] = record.error
        body = record.body
        event["body_bytes"] = len(body)
        if len(body) > self.config.max_body_bytes:
            event["body_omitted"] = "larger than logging.payloads.max_body_bytes"
            return event
        try:
            event["body"] = _redacted(orjson.loads(body), self._redact_fields)
        except orjson.JSONDecodeError:
            event["body_base64"] = base64.b64encode(body).decode()
        return event


def _redacted(value: Any, fields: frozenset[str]) -> Any:
    if not fields:
        return value
    if isinstance(value, dict):
        return {k: REDACTED if k in fields else _redacted(v, fields) for k, v in value.items()}
    if isinstance(value, list):
        return [_redacted(v, fields) for v in value]
    return value


class Sink:
    name = "sink"

    def write(self, events: list[dict[str, Any]]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the sink holds (nothing by default)."""


class FileSink(Sink):
    """JSON Lines, rotated before a line would take the file over ``max_bytes``: every line
    is whole, in one file; ``PATH.1`` is the newest rotated file, ``PATH.N`` the oldest."""

    name = "file"

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        self.path, self.max_bytes, self.backups = path, max_bytes, backups
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(path, "ab")  # noqa: SIM115 (held open; closed in close())

    def write(self, events: list[dict[str, Any]]) -> None:
        for event in events:
            line = orjson.dumps(event) + b"\n"
            if self._fh.tell() and self._fh.tell() + len(line) > self.max_bytes:
                self._rotate()
            self._fh.write(line)
        self._fh.flush()

    def _rotate(self) -> None:
        self._fh.close()
        if self.backups == 0:
            self.path.unlink(missing_ok=True)
        else:
            for i in range(self.backups - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{i}")
                if older.exists():
                    os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        self._fh = open(self.path, "ab")  # noqa: SIM115

    def close(self) -> None:
        self._fh.close()


class CloudEventsSink(Sink):
    """CloudEvents 1.0, structured and batched, POSTed to ``url``."""

    name = "http"

    def __init__(self, url: str, source: str, timeout_s: float) -> None:
        self.url, self.source, self.timeout_s = url, source, timeout_s

    def write(self, events: list[dict[str, Any]]) -> None:
        body = orjson.dumps(list(self._cloud_events(events)))
        request = urllib.request.Request(
            self.url,
            data=body,
            headers={"Content-Type": "application/cloudevents-batch+json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=self.timeout_s) as resp:  # noqa: S310
            resp.read()

    def _cloud_events(self, events: Iterable[dict[str, Any]]) -> Iterable[dict[str, Any]]:
        for event in events:
            ce: dict[str, Any] = {
                "specversion": "1.0",
                "id": event["id"],
                "source": self.source,
                "type": EVENT_TYPES[event["type"]],
                "time": _rfc3339(event["time"]),
                "datacontenttype": "application/json",
                # extensions (lower-case alphanumerics, as CloudEvents requires)
                "inferenceservicename": event["route"],
                "modelname": event["model"],
                "modelversion": str(event["version"]),
                "route": event["route"],
                "endpoint": event["endpoint"],
            }
            if event.get("arm"):
                ce["arm"] = event["arm"]
            if "status" in event:
                ce["status"] = str(event["status"])
            if "body" in event:
                ce["data"] = event["body"]
            elif "body_base64" in event:
                ce["datacontenttype"] = event["content_type"] or "application/octet-stream"
                ce["data_base64"] = event["body_base64"]
            else:
                ce["data"] = {k: event[k] for k in ("body_bytes", "body_omitted")}
            if "error" in event:
                ce["data"] = {"error": event["error"]}
            yield ce


def _rfc3339(ts: float) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts))
    return f"{seconds}.{int(ts % 1 * 1e6):06d}Z"
