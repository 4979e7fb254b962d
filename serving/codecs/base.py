"""What every codec shares: the decoded request, the codec interface, protocol errors.

A codec turns a wire protocol's bytes into a model input and a model's result into bytes. It
knows no HTTP: an error is a :class:`ProtocolError` carrying MLflow's error code, and the one
error map of ``serving.http`` decides the status and the envelope.
"""

from __future__ import annotations

import functools
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


MAX_GZIP_MEMBERS = 100
#: Content-Encodings a request body may have (``identity`` aside), by what decodes them.
_ZLIB_WBITS = {"gzip": 31, "x-gzip": 31, "deflate": 15}


@functools.cache
def content_encodings() -> tuple[str, ...]:
    """The request Content-Encodings this process can decode (br and zstd when installed;
    looked up once: a failed import searches the path again each time)."""
    found = list(_ZLIB_WBITS)
    if _brotli() is not None:
        found.append("br")
    if _zstd() is not None:
        found.append("zstd")
    return tuple(found)


def inflate(body: bytes, encoding: str, limit: int) -> bytes:
    """``body`` decoded from ``encoding`` (a Content-Encoding, possibly a list), at most
    ``limit`` bytes of it: decoding stops there rather than inflating a bomb to its end.

    Raises:
        UnsupportedMediaType: an encoding this process cannot decode.
        TooLarge: it inflates past ``limit`` (server.max_body_bytes).
        ProtocolError: the body is not validly encoded.
    """
    codings = [c.strip().lower() for c in encoding.split(",") if c.strip()]
    for coding in reversed(codings):  # applied in order, so undone from the last
        if coding == "identity":
            continue
        if coding not in content_encodings():
            raise UnsupportedMediaType(
                f"unsupported Content-Encoding {coding[:40]!r}: this server accepts "
                f"{', '.join(content_encodings())} (or none)"
            )
        body = _inflate_one(body, coding, limit)
    return body


def _inflate_one(body: bytes, coding: str, limit: int) -> bytes:
    too_large = TooLarge(
        f"request body too large: the limit is {limit} bytes (server.max_body_bytes)"
    )
    try:
        if coding in _ZLIB_WBITS:
            import zlib

            wbits = _ZLIB_WBITS[coding]
            if coding == "deflate" and body[:1] and body[0] & 0x0F != 8:
                wbits = -15  # raw deflate, as many clients send it (aiohttp accepts it too)
            parts, size, rest = [], 0, body
            for _ in range(MAX_GZIP_MEMBERS):  # gzip members may follow one another
                decoder = zlib.decompressobj(wbits)
                part = decoder.decompress(rest, limit + 1 - size)
                size += len(part)
                if size > limit or decoder.unconsumed_tail:
                    raise too_large
                if not decoder.eof:
                    raise ProtocolError(f"the request body could not be read: truncated {coding}")
                parts.append(part)
                rest = decoder.unused_data
                if not rest or wbits != 31:
                    return b"".join(parts)
            raise ProtocolError(
                f"the request body could not be read: more than {MAX_GZIP_MEMBERS} gzip members"
            )
        out = _brotli_inflate(body, limit) if coding == "br" else _zstd_inflate(body, limit)
    except (TooLarge, ProtocolError):
        raise
    except Exception as exc:  # zlib.error, brotli.error, ZstdError: the bytes are not valid
        raise ProtocolError(
            f"the request body could not be read: not valid {coding} ({type(exc).__name__})"
        ) from None
    if len(out) > limit:
        raise too_large
    return out


def _brotli() -> Any:
    try:
        import brotli  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return None
    return brotli


def _zstd() -> Any:
    try:
        from compression import zstd  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        try:
            from backports import zstd  # type: ignore[import-not-found,no-redef,unused-ignore]
        except ImportError:
            return None
    return zstd


def _brotli_inflate(body: bytes, limit: int) -> bytes:
    decoder = _brotli().Decompressor()
    out = bytearray()
    for start in range(0, len(body), 4096):  # output bounded as it grows
        out += decoder.process(body[start : start + 4096])
        if len(out) > limit:
            break
    return bytes(out)


def _zstd_inflate(body: bytes, limit: int) -> bytes:
    decoder = _zstd().ZstdDecompressor()
    out = decoder.decompress(body, max_length=limit + 1)
    if not decoder.eof and len(out) <= limit:
        raise ProtocolError("the request body could not be read: truncated zstd")
    return bytes(out)


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
