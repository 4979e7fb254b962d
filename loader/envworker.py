"""The model worker of an isolated environment, and the wire format both sides speak.

Run as a script by the environment's own Python (``python -I envworker.py ...``): it loads the
model with that environment's MLflow and answers predict calls on the socket pairs it inherits.
Imported by the daemon (``loader.isolated``) for the same :func:`send` and :func:`recv`. So it
imports nothing but the standard library at module level, and NumPy and pandas (which every
MLflow has) only when a value needs them: its other side may run other versions of both.

A message is a JSON header plus raw buffers::

    <u32 header bytes> <u32 buffer count> header (JSON) [<u64 size> buffer]...

Values are JSON where they are JSON anyway; a NumPy array (and each NumPy-typed column of a
DataFrame) travels as its raw bytes with dtype and shape, never through text or pickle (the
two sides may not share a NumPy or pandas version, and a pickle would let a worker run code in
the daemon).
"""

from __future__ import annotations

import datetime
import json
import math
import socket
import struct
import sys
import threading
import traceback
from typing import Any

#: Raised when the protocol changes: the daemon refuses a worker speaking another.
PROTOCOL = 1
_HEAD = struct.Struct("<II")
_SIZE = struct.Struct("<Q")
#: A header larger than this is a broken peer, not a message.
MAX_HEADER_BYTES = 1 << 30
_MAX_PARTS = 512


class WireError(Exception):
    """A value that cannot cross, or a peer that broke the framing."""


class Block:
    """A frame not built yet: a 2-D array of one dtype and its column labels, with a default
    index. The daemon's fast path has exactly this; it crosses as one buffer and becomes the
    same DataFrame on the worker's side, so the daemon never builds a frame to send it."""

    __slots__ = ("columns", "matrix")

    def __init__(self, matrix: Any, columns: list[str]) -> None:
        self.matrix, self.columns = matrix, columns

    def __len__(self) -> int:
        return len(self.matrix)


# -- framing ----------------------------------------------------------------------------------


def send(sock: socket.socket, message: dict[str, Any]) -> None:
    """Send ``message`` (values encoded with :func:`encode`'s buffers out of band)."""
    buffers: list[memoryview] = []
    header = json.dumps(_encode_tree(message, buffers), separators=(",", ":")).encode()
    parts: list[bytes | memoryview] = [_HEAD.pack(len(header), len(buffers)), header]
    for buf in buffers:
        parts.append(_SIZE.pack(buf.nbytes))
        parts.append(buf)
    if len(parts) > _MAX_PARTS:  # more than one sendmsg may gather (IOV_MAX)
        sock.sendall(b"".join(parts))
        return
    # sendmsg gathers without joining; a partial write sends the rest joined.
    total = sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts)
    sent = sock.sendmsg(parts)
    if sent < total:
        sock.sendall(b"".join(parts)[sent:])


def recv(sock: socket.socket) -> dict[str, Any]:
    """Receive one message.

    Raises:
        EOFError: the peer closed the connection, or sent bytes that are not a message (a
            broken peer: the connection is of no further use either way).
    """
    head = _recv_exact(sock, _HEAD.size)
    header_size, count = _HEAD.unpack(head)
    if header_size > MAX_HEADER_BYTES:
        raise EOFError(f"a {header_size}-byte header: not a modeld worker message")
    try:
        header = json.loads(_recv_exact(sock, header_size))
    except ValueError as exc:
        raise EOFError(f"a header that is not JSON: {exc}") from exc
    buffers = []
    for _ in range(count):
        (size,) = _SIZE.unpack(_recv_exact(sock, _SIZE.size))
        buffers.append(_recv_exact(sock, size))
    try:
        decoded: dict[str, Any] = _decode_tree(header, buffers)
    except (KeyError, IndexError, TypeError, ValueError, WireError) as exc:
        raise EOFError(f"a message that does not decode: {exc!r}") from exc
    return decoded


def _recv_exact(sock: socket.socket, size: int) -> bytearray:
    data = bytearray(size)
    view = memoryview(data)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:], size - got)
        if n == 0:
            raise EOFError("the other side closed the connection")
        got += n
    return data


# -- values -----------------------------------------------------------------------------------
# A message's top level is a dict of plain fields; "data", "params", "value" and "chunk" hold
# values encoded as tagged nodes: {"j": <JSON>} or {"t": <kind>, ...}.

_VALUE_FIELDS = ("data", "params", "value", "chunk")


def _encode_tree(message: dict[str, Any], buffers: list[memoryview]) -> dict[str, Any]:
    return {k: encode(v, buffers) if k in _VALUE_FIELDS else v for k, v in message.items()}


def _decode_tree(header: dict[str, Any], buffers: list[bytearray]) -> dict[str, Any]:
    return {k: decode(v, buffers) if k in _VALUE_FIELDS else v for k, v in header.items()}


def encode(value: Any, buffers: list[memoryview]) -> Any:
    """A JSON-able node for ``value``; array bytes are appended to ``buffers``.

    Raises:
        WireError: a type that has no faithful form here (the message names it).
    """
    if value is None or isinstance(value, bool | int | str):
        return {"j": value}
    if isinstance(value, float):
        return {"j": value} if math.isfinite(value) else {"t": "f", "v": repr(value)}
    if isinstance(value, bytes | bytearray):
        buffers.append(memoryview(bytes(value)))
        return {"t": "bytes", "b": len(buffers) - 1}
    if isinstance(value, list | tuple):
        return {"t": "list" if isinstance(value, list) else "tuple",
                "v": [encode(v, buffers) for v in value]}  # fmt: skip
    if isinstance(value, Block):
        return {
            "t": "block",
            "columns": {"j": list(value.columns)},
            "nd": _encode_numpy(value.matrix, buffers),
            "index": None,
        }
    if isinstance(value, dict):
        return {
            "t": "dict",
            "k": [encode(k, buffers) for k in value],
            "v": [encode(v, buffers) for v in value.values()],
        }
    module = type(value).__module__.split(".")[0]
    if module == "numpy":
        return _encode_numpy(value, buffers)
    if module == "pandas":
        return _encode_pandas(value, buffers)
    if isinstance(value, datetime.datetime | datetime.date):
        return {"t": type(value).__name__, "v": value.isoformat()}
    if hasattr(value, "model_dump"):  # a pydantic model (MLflow's chat types): its JSON form
        return encode(value.model_dump(mode="json"), buffers)
    raise WireError(
        f"a {type(value).__module__}.{type(value).__name__} cannot be passed to or from an "
        "isolated model (accepted: DataFrame, Series, NumPy arrays and scalars, lists, dicts, "
        "str, bytes, numbers, None, dates)"
    )


def _encode_numpy(value: Any, buffers: list[memoryview]) -> Any:
    import numpy as np

    if isinstance(value, np.generic):
        return {"t": "np", "dtype": value.dtype.str, "v": encode(value.item(), buffers)}
    if not isinstance(value, np.ndarray):
        raise WireError(f"a numpy {type(value).__name__} cannot be passed to an isolated model")
    if value.dtype.hasobject or value.dtype.fields is not None:
        return {"t": "ndo", "shape": list(value.shape),
                "v": [encode(v, buffers) for v in value.ravel().tolist()]}  # fmt: skip
    if value.dtype.kind == "U":  # fixed-width text: as a list of str (its bytes are UCS-4)
        return {"t": "ndu", "shape": list(value.shape), "v": value.ravel().tolist()}
    array = np.ascontiguousarray(value)
    # as bytes: datetime64 and timedelta64 have no buffer format of their own
    buffers.append(array.reshape(-1).view(np.uint8).data if array.size else memoryview(b""))
    return {"t": "nd", "dtype": array.dtype.str, "shape": list(array.shape), "b": len(buffers) - 1}


def _encode_pandas(value: Any, buffers: list[memoryview]) -> Any:
    import pandas as pd

    if isinstance(value, pd.DataFrame):
        if not value.columns.is_unique:
            raise WireError("a DataFrame with duplicate column names cannot be passed")
        block = _one_block(value)
        if block is not None:  # one dtype throughout: one buffer, one frame to rebuild
            return {
                "t": "block",
                "columns": _encode_labels(value.columns, buffers),
                "nd": _encode_numpy(block, buffers),
                "index": _encode_index(value.index, buffers),
            }
        return {
            "t": "df",
            "columns": _encode_labels(value.columns, buffers),
            "cols": [_encode_column(value[c], buffers) for c in value.columns],
            "index": _encode_index(value.index, buffers),
        }
    if isinstance(value, pd.Series):
        return {
            "t": "series",
            "name": encode(value.name, buffers),
            "col": _encode_column(value, buffers),
            "index": _encode_index(value.index, buffers),
        }
    if isinstance(value, pd.Timestamp):
        return {"t": "ts", "v": value.isoformat()}
    if value is pd.NaT:
        return {"t": "nat"}
    raise WireError(f"a pandas {type(value).__name__} cannot be passed to an isolated model")


def _encode_labels(index: Any, buffers: list[memoryview]) -> Any:
    labels = index.tolist()
    if all(type(label) is str for label in labels):
        return {"j": labels}  # the common case: one JSON list
    return encode(labels, buffers)


def _one_block(frame: Any) -> Any:
    """The frame's values as one 2-D array when every column has the same NumPy dtype."""
    import numpy as np

    try:  # one pandas block is one dtype (14 us cheaper than building frame.dtypes)
        blocks = frame._mgr.blocks
        dtypes = [blocks[0].dtype] if len(blocks) == 1 else list(frame.dtypes)
    except AttributeError:
        dtypes = list(frame.dtypes)
    if not dtypes:
        return None
    first = dtypes[0]
    if not isinstance(first, np.dtype) or first.hasobject or first.kind == "U":
        return None
    if any(d != first for d in dtypes):
        return None
    return frame.to_numpy()


def _encode_column(series: Any, buffers: list[memoryview]) -> Any:
    import numpy as np

    dtype = series.dtype
    if isinstance(dtype, np.dtype) and not dtype.hasobject:
        return _encode_numpy(series.to_numpy(), buffers)
    # object, str, categorical, nullable and tz-aware columns: their values and dtype's name
    values = [None if _is_missing(v) else v for v in series.tolist()]
    return {"t": "col", "dtype": str(dtype), "v": [encode(v, buffers) for v in values]}


def _is_missing(value: Any) -> bool:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return True
    return type(value).__name__ in ("NAType", "NaTType")


def _encode_index(index: Any, buffers: list[memoryview]) -> Any:
    import pandas as pd

    if isinstance(index, pd.RangeIndex) and index.start == 0 and index.step == 1:
        return None
    return _encode_column(index.to_series(), buffers)


def decode(node: Any, buffers: list[bytearray]) -> Any:
    """The value :func:`encode` made ``node`` from."""
    if "j" in node:
        return node["j"]
    kind = node["t"]
    if kind == "f":
        return float(node["v"])
    if kind == "bytes":
        return bytes(buffers[node["b"]])
    if kind == "list":
        return [decode(v, buffers) for v in node["v"]]
    if kind == "tuple":
        return tuple(decode(v, buffers) for v in node["v"])
    if kind == "dict":
        keys = [decode(k, buffers) for k in node["k"]]
        return dict(zip(keys, (decode(v, buffers) for v in node["v"]), strict=True))
    if kind in ("datetime", "date"):
        cls = datetime.datetime if kind == "datetime" else datetime.date
        return cls.fromisoformat(node["v"])
    if kind in ("np", "nd", "ndo", "ndu"):
        return _decode_numpy(node, buffers)
    return _decode_pandas(node, buffers)


def _decode_numpy(node: Any, buffers: list[bytearray]) -> Any:
    import numpy as np

    kind = node["t"]
    if kind == "np":
        return np.dtype(node["dtype"]).type(decode(node["v"], buffers))
    if kind == "ndu":
        return np.array(node["v"], dtype=str).reshape(node["shape"])
    if kind == "ndo":
        out = np.empty(len(node["v"]), dtype=object)
        out[:] = [decode(v, buffers) for v in node["v"]]
        return out.reshape(node["shape"])
    return np.frombuffer(buffers[node["b"]], dtype=np.dtype(node["dtype"])).reshape(node["shape"])


def _decode_pandas(node: Any, buffers: list[bytearray]) -> Any:
    import pandas as pd

    kind = node["t"]
    if kind == "ts":
        return pd.Timestamp(node["v"])
    if kind == "nat":
        return pd.NaT
    if kind == "block":
        # Labels as Python objects: 6x cheaper to build than pandas 3's inferred str index,
        # and scikit-learn's feature-name check on it costs ~60 us less; the same labels.
        columns = pd.Index(decode(node["columns"], buffers), dtype=object)
        block = _decode_numpy(node["nd"], buffers)
        index = _decode_index(node["index"], buffers)
        return pd.DataFrame(block, columns=columns, index=index, copy=False)
    if kind == "df":
        columns = decode(node["columns"], buffers)
        data = {c: _decode_column(v, buffers) for c, v in zip(columns, node["cols"], strict=True)}
        index = _decode_index(node["index"], buffers)
        frame = pd.DataFrame(data, index=index, columns=columns or None)
        return frame if columns else pd.DataFrame(index=index)
    if kind == "series":
        return pd.Series(
            _decode_column(node["col"], buffers),
            index=_decode_index(node["index"], buffers),
            name=decode(node["name"], buffers),
        )
    raise WireError(f"unknown value kind {kind!r}")


def _decode_column(node: Any, buffers: list[bytearray]) -> Any:
    if node["t"] != "col":
        return _decode_numpy(node, buffers)
    import pandas as pd

    values = [decode(v, buffers) for v in node["v"]]
    try:
        return pd.array(values, dtype=node["dtype"])
    except (TypeError, ValueError):  # a dtype this pandas does not know: as objects
        return pd.array(values, dtype=object)


def _decode_index(node: Any, buffers: list[bytearray]) -> Any:
    if node is None:
        return None
    import pandas as pd

    return pd.Index(_decode_column(node, buffers))


# -- errors -----------------------------------------------------------------------------------


def describe_error(exc: BaseException) -> dict[str, Any]:
    """An exception as the daemon rebuilds it: type, message, MLflow's error code, traceback."""
    return {
        "type": type(exc).__name__,
        "module": type(exc).__module__,
        "message": str(getattr(exc, "message", None) or exc),
        "error_code": getattr(exc, "error_code", None),
        "traceback": "".join(traceback.format_exception(exc)),
    }


# -- the worker -------------------------------------------------------------------------------


def _serve_channel(sock: socket.socket, model: Any) -> None:
    while True:
        try:
            request = recv(sock)
        except (EOFError, OSError):
            return
        op = request.get("op")
        try:
            if op in ("predict", "direct"):
                send(sock, {"ok": True, "value": _predict(model, request, op == "direct")})
            elif op == "stream":
                _stream(sock, model, request)
            elif op == "ping":
                send(sock, {"ok": True})
            else:
                send(sock, {"ok": False, "error": {"type": "WireError", "message": f"op {op!r}"}})
        except (EOFError, OSError):
            return
        except BaseException as exc:  # the model's own error: the daemon rebuilds and maps it
            try:
                send(sock, {"ok": False, "error": describe_error(exc)})
            except WireError as wire:  # unreachable in practice: an error is plain JSON
                send(sock, {"ok": False, "error": describe_error(wire)})


def _predict(model: Any, request: dict[str, Any], direct: bool) -> Any:
    data, params = request.get("data"), request.get("params")
    if direct:  # the daemon's fast path: a conformant frame, no params (loader.isolated)
        fn = getattr(model, "_predict_fn", None)
        if fn is not None and getattr(model, "loader_module", None) == "mlflow.sklearn":
            return fn(data)
    return model.predict(data) if params is None else model.predict(data, params=params)


def _stream(sock: socket.socket, model: Any, request: dict[str, Any]) -> None:
    """Chunks one at a time: the daemon asks for each (``next``) or stops (``close``)."""
    data, params = request.get("data"), request.get("params")
    chunks = model.predict_stream(data, params=params)
    try:
        while True:
            ask = recv(sock)
            if ask.get("op") != "next":
                return
            try:
                chunk = next(chunks)
            except StopIteration:
                send(sock, {"ok": True, "end": True})
                return
            send(sock, {"ok": True, "chunk": chunk})
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()


def _die_with_parent(parent: int) -> None:
    """Exit when the daemon that started this worker is gone (polled: ``PR_SET_PDEATHSIG``
    fires when the *thread* that started a process ends, and a load thread does)."""
    import os
    import time

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(argv: list[str]) -> int:
    """``envworker.py PARENT_PID MODEL_DIR FD[,FD...] [MODEL_CONFIG_JSON]``."""
    import os

    _die_with_parent(int(argv[0]))
    path, fds = argv[1], [int(fd) for fd in argv[2].split(",")]
    model_config = json.loads(argv[3]) if len(argv) > 3 and argv[3] else None
    os.dup2(2, 1)  # a model's print() goes to the log, never into a channel
    socks = [socket.socket(fileno=fd) for fd in fds]
    try:
        import mlflow
        import mlflow.pyfunc

        extra = {"model_config": model_config} if model_config else {}
        model = mlflow.pyfunc.load_model(path, suppress_warnings=True, **extra)
    except BaseException as exc:
        send(socks[0], {"ok": False, "error": describe_error(exc)})
        return 1
    send(
        socks[0],
        {
            "ok": True,
            "protocol": PROTOCOL,
            "pid": os.getpid(),
            "python": sys.version.split()[0],
            "mlflow": mlflow.__version__,
            "streams": getattr(model, "_predict_stream_fn", None) is not None,
        },
    )
    threads = [threading.Thread(target=_serve_channel, args=(s, model), daemon=True) for s in socks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
