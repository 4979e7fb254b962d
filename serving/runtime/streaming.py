"""Streaming predictions: ``"stream": true`` calls the model's ``predict_stream``.

Beyond MLflow's scoring server (which cannot stream): the answer is ``text/event-stream`` in
MLflow's AgentServer wire format, ``data: {json}`` per chunk, then ``data: [DONE]``; an error
mid-stream is ``data: {"error": ...}`` then ``data: [DONE]``. A stream is never batched: each
runs its model's generator on a thread of its own, handing chunks to the loop as they come.
When the caller goes away, or no chunk comes within the timeout, the generator is closed (once
its current step returns: a thread cannot be interrupted). No aiohttp here.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from typing import Any

import orjson

from serving.codecs.base import ProtocolError, bound
from serving.codecs.mlflow import first_part, to_json
from serving.runtime.dataplane import Served

log = logging.getLogger(__name__)

STREAM_KEY = "stream"
DONE = b"data: [DONE]\n\n"
_END = object()


def streaming_request(body: bytes) -> dict[str, Any] | None:
    """The request document without its ``"stream": true``, when it asks for a stream; else
    None (a body that is not such a JSON object takes the ordinary path, which says why)."""
    if b'"stream"' not in body:
        return None
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(document, dict) or document.get(STREAM_KEY) is not True:
        return None
    return {k: v for k, v in document.items() if k != STREAM_KEY}


def event(data: Any) -> bytes:
    """One server-sent event carrying ``data`` as JSON."""
    if hasattr(data, "to_dict"):  # MLflow's chat chunks
        data = data.to_dict()
    return b"data: " + to_json(data) + b"\n\n"


def error_event(message: str) -> bytes:
    return event({"error": bound(message)})


class Stream:
    """One streaming prediction: its chunks as an async iterator of encoded events.

    Raises from :meth:`first`: :class:`ProtocolError` for a model that cannot stream or input
    it refuses (before anything is sent, so it is an ordinary 400), ``TimeoutError`` when the
    first chunk does not come in time.
    """

    def __init__(self, served: Served, document: dict[str, Any], *, timeout_s: float) -> None:
        model = served.handle.model
        if getattr(model, "_predict_stream_fn", None) is None:
            raise ProtocolError(
                f"{served.handle.label} cannot stream: its model has no predict_stream "
                f'(send the request without "stream": true)'
            )
        self._model = model
        self._document = document
        self._timeout_s = timeout_s
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._produce, name=f"modeld-stream-{served.route}", daemon=True
        )
        self._thread.start()

    async def first(self) -> bytes | None:
        """The first event (None: the model yielded nothing)."""
        item = await asyncio.wait_for(self._queue.get(), self._timeout_s)
        if isinstance(item, BaseException):
            raise item
        return None if item is _END else item

    async def rest(self) -> AsyncIterator[bytes]:
        """Every later event, ending with ``[DONE]``; an error becomes an error event, and a
        stall (no chunk within the timeout) ends the stream with one."""
        while True:
            try:
                item = await asyncio.wait_for(self._queue.get(), self._timeout_s)
            except TimeoutError:
                self.close()
                yield error_event(
                    f"no chunk within {self._timeout_s:g}s (server.request_timeout_s): "
                    "the stream was stopped"
                )
                break
            if item is _END:
                break
            if isinstance(item, BaseException):
                yield error_event(str(getattr(item, "message", item)))
                break
            yield item
        yield DONE

    def close(self) -> None:
        """Stop: the generator is closed once its current step returns."""
        self._stop.set()

    # -- the producing thread -----------------------------------------------------------------

    def _put(self, item: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop is gone (the server stopped): nobody to tell
            self._stop.set()

    def _produce(self) -> None:
        generator = None
        try:
            from mlflow.pyfunc import scoring_server

            parse_json: Any = scoring_server._parse_json_data
            metadata = self._model.metadata
            parsed = parse_json(self._document, metadata, metadata.get_input_schema())
            data, params = parsed.data, parsed.params
            if params is None:
                generator = self._model.predict_stream(data)
            else:
                generator = self._model.predict_stream(data, params=params)
            for chunk in generator:
                if self._stop.is_set():
                    break
                self._put(event(chunk))
        except Exception as exc:  # the model's own code may raise anything
            message = first_part(getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}")
            log.warning("stream failed: %s", bound(message, 300))
            self._put(ProtocolError(message))
        finally:
            if generator is not None and hasattr(generator, "close"):
                try:
                    generator.close()
                except Exception:
                    log.exception("closing a model's stream raised")
            self._put(_END)
