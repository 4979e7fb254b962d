"""What every codec shares: the decoded request, the codec interface, protocol errors.

A codec turns a wire protocol's bytes into a model input and a model's result into bytes. It
knows no HTTP: an error is a :class:`ProtocolError` carrying MLflow's error code, and the one
error map of ``serving.http`` decides the status and the envelope.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

MAX_MESSAGE_CHARS = 1000


class ProtocolError(Exception):
    """A request the protocol refuses (bad input): carries MLflow's error code, and the
    model's traceback when the model raised (sent only when ``server.stack_traces`` is on)."""

    def __init__(
        self, message: str, error_code: str = "BAD_REQUEST", *, stack_trace: str | None = None
    ) -> None:
        self.error_code = error_code
        self.message = bound(message)
        self.stack_trace = stack_trace
        super().__init__(self.message)


class UnsupportedMediaType(ProtocolError):
    """A Content-Type (or charset) the protocol does not take."""


class TooLarge(ProtocolError):
    """A request whose decoded size exceeds the server's bounds (413), told before decoding."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "REQUEST_LIMIT_EXCEEDED")


@dataclass(frozen=True, slots=True)
class Limits:
    """What one request may decode to. The body's bytes bound a text body's cells (JSON, CSV:
    a number takes at least two bytes); its columns each cost a pandas column, so they are
    bounded for every format; a Parquet body is compressed, so its cells are bounded too (a
    541 KB file can declare 30 million rows)."""

    max_cells: int = 20_000_000  #: rows x columns (~160 MB as float64)
    max_columns: int = 10_000

    def check(self, rows: int | None, columns: int, what: str) -> None:
        """Raises :class:`TooLarge` when ``columns``, or ``rows`` x ``columns`` (None: a text
        body, whose cells its bytes already bound), is beyond the bounds."""
        if columns > self.max_columns:
            raise TooLarge(
                f"{what} has {columns} columns; this server takes at most {self.max_columns} "
                "(server.max_columns)"
            )
        if rows is not None and rows * max(columns, 1) > self.max_cells:
            raise TooLarge(
                f"{what} has {rows} rows x {columns} columns = {rows * max(columns, 1)} cells; "
                f"this server takes at most {self.max_cells} (server.max_cells)"
            )


def bound(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """Cut a message so an error body never carries a large part of a request."""
    return message if len(message) <= limit else message[:limit] + f"... ({len(message)} chars)"


def mlflow_error_body(error_code: str, message: str, stack_trace: str | None = None) -> bytes:
    """MLflow's error envelope, ``{"error_code": ..., "message": ...}`` (and ``stack_trace``
    when given, as MLflow's scoring server sends it)."""
    body = {"error_code": error_code, "message": bound(message)}
    if stack_trace is not None:
        body["stack_trace"] = bound(stack_trace, 20_000)
    return orjson.dumps(body)


def oip_error_body(message: str) -> bytes:
    """The Open Inference Protocol's error envelope, ``{"error": ...}``."""
    return orjson.dumps({"error": bound(message)})


@dataclass(slots=True)
class Decoded:
    """A request ready for ``model.predict``.

    ``unwrapped``: MLflow's unified LLM input, whose answer is not wrapped in
    ``{"predictions": ...}``. ``conformant``: built by the fast path, so it already has exactly
    the signature's columns, order and dtype (MLflow's schema enforcement would change nothing);
    its rows are kept as one 2-D ``matrix`` (``columns`` name them) and the DataFrame is built
    only when this request is predicted on its own: a batch stacks the matrices and builds one.
    """

    data: Any = None
    params: dict[str, Any] | None = None
    unwrapped: bool = False
    conformant: bool = False
    matrix: Any = None
    columns: list[str] | None = None

    def model_input(self, *, blocks: bool = False) -> Any:
        """What ``predict`` takes: the decoded input (a conformant request's DataFrame, or
        with ``blocks`` its unbuilt :class:`~loader.envworker.Block`: an isolated model's
        worker builds the frame)."""
        if blocks and self.data is None and self.matrix is not None:
            from loader.envworker import Block

            return Block(self.matrix, self.columns or [])
        if self.data is None and self.matrix is not None:
            self.data = conformant_frame(self.matrix, self.columns)
        return self.data

    @property
    def rows(self) -> int:
        """Rows of a tabular request (0 when it is not a table)."""
        if self.matrix is not None:
            return len(self.matrix)
        return len(self.data) if hasattr(self.data, "columns") else 0


def conformant_frame(matrix: Any, columns: list[str] | None) -> Any:
    """The DataFrame MLflow's parser builds for these rows: RangeIndex, one dtype."""
    import pandas as pd

    return pd.DataFrame(matrix, columns=columns, copy=False)


class Codec:
    """How one wire protocol turns bytes into a model input and a result into bytes.

    The predict worker calls both on its thread; a codec holds per-request settings only.
    ``handle`` is the :class:`~loader.manager.ModelHandle` answering.
    """

    def decode(self, body: bytes, model: Any) -> Decoded:
        raise NotImplementedError

    def encode(self, result: Any, request: Decoded, handle: Any) -> bytes:
        raise NotImplementedError
