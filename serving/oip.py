"""Open Inference Protocol v2 (REST), as spoken by KServe, Triton and MLServer clients.

``/v2/health/live``, ``/v2/health/ready``, ``/v2/models/{name}[/versions/{v}]`` (metadata),
``.../ready`` and ``.../infer``. Named tensors become the model's input per its MLflow signature
(a column per named input, or one ``[N, K]`` tensor spread over K signature columns, or tensors
for tensor-spec models); results come back as tensors. Binary tensor data (Triton's extension,
``Inference-Header-Content-Length``) is accepted on input; answers are JSON. Errors are
``{"error": "..."}``. Inference goes through the same per-model worker (and batching) as
``/invocations``.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import orjson
from aiohttp import web

from loader.errors import ModelNotReady
from serving.app import DAEMON, Daemon
from serving.handlers import serving_handle
from serving.protocol import Codec, Decoded, ProtocolError, numeric_layout, predict_input_schema

_NUMPY_BY_DATATYPE = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
    "BYTES": "object",
}
_DATATYPE_BY_KIND = {"b": "BOOL", "O": "BYTES", "U": "BYTES", "S": "BYTES"}
_DATATYPE_BY_NAME = {numpy: oip for oip, numpy in _NUMPY_BY_DATATYPE.items() if numpy != "object"}
_MLFLOW_TYPE_TO_DATATYPE = {
    "boolean": "BOOL",
    "integer": "INT32",
    "long": "INT64",
    "float": "FP32",
    "double": "FP64",
    "string": "BYTES",
    "binary": "BYTES",
    "datetime": "BYTES",
}
MAX_ELEMENTS = 50_000_000


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/v2", server_metadata)
    r.add_get("/v2/health/live", live)
    r.add_get("/v2/health/ready", ready)
    for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        r.add_get(prefix, model_metadata)
        r.add_get(prefix + "/ready", model_ready)
        r.add_post(prefix + "/infer", infer)


def _error(status: int, message: str) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps({"error": message[:1000]}), content_type="application/json"
    )


@web.middleware
async def oip_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Inside /v2 errors take the protocol's shape, ``{"error": "..."}``."""
    if not request.path.startswith("/v2"):
        return await handler(request)
    try:
        return await handler(request)
    except ProtocolError as exc:
        return _error(exc.status, exc.message)
    except ModelNotReady as exc:
        return _error(503, str(exc))
    except web.HTTPRequestEntityTooLarge:
        return _error(413, "request body too large (server.max_body_bytes)")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _error(exc.status, exc.text or exc.reason)
    except TimeoutError:
        return _error(504, "inference exceeded server.request_timeout_s")


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json")


async def server_metadata(request: web.Request) -> web.Response:
    from importlib.metadata import version

    return _json({"name": "modeld", "version": version("modeld"), "extensions": ["binary_data"]})


async def live(request: web.Request) -> web.Response:
    return _json({"live": True})


async def ready(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    manager = daemon.manager
    ok = manager is not None and all(r.handle is not None for r in manager.routes())
    return _json({"ready": ok}, 200 if ok else 503)


def _served(request: web.Request) -> tuple[Daemon, Any]:
    """(daemon, handle) for the model (and version, when the path names one) in the URL."""
    daemon = request.app[DAEMON]
    name = request.match_info["name"]
    handle = serving_handle(daemon, name)
    wanted = request.match_info.get("version")
    if wanted is not None and wanted != str(handle.version.version):
        raise web.HTTPNotFound(
            text=f"{name} serves version {handle.version.version}, not {wanted[:20]!r}"
        )
    return daemon, handle


async def model_ready(request: web.Request) -> web.Response:
    try:
        _, handle = _served(request)
    except ModelNotReady as exc:
        return _error(503, str(exc))
    return _json({"name": handle.route, "ready": True})


async def model_metadata(request: web.Request) -> web.Response:
    _, handle = _served(request)
    metadata = handle.model.metadata
    return _json(
        {
            "name": handle.route,
            "versions": [str(handle.version.version)],
            "platform": "mlflow",
            "inputs": _tensor_specs(metadata.get_input_schema()),
            "outputs": _tensor_specs(metadata.get_output_schema()),
        }
    )


def _tensor_specs(schema: Any) -> list[dict[str, Any]]:
    if schema is None:
        return []
    specs = []
    if schema.is_tensor_spec():
        for i, spec in enumerate(schema.inputs):
            specs.append(
                {
                    "name": spec.name or f"input-{i}",
                    "datatype": _datatype(spec.type),
                    "shape": [int(d) for d in spec.shape],
                }
            )
        return specs
    for i, spec in enumerate(schema.inputs):
        mlflow_type = getattr(spec.type, "name", str(spec.type))
        specs.append(
            {
                "name": spec.name or f"output-{i}",
                "datatype": _MLFLOW_TYPE_TO_DATATYPE.get(mlflow_type, "BYTES"),
                "shape": [-1],
            }
        )
    return specs


def _datatype(dtype: Any) -> str:
    import numpy as np

    dtype = np.dtype(dtype)
    if dtype.kind in _DATATYPE_BY_KIND:
        return _DATATYPE_BY_KIND[dtype.kind]
    return _DATATYPE_BY_NAME.get(dtype.name, "BYTES")


async def infer(request: web.Request) -> web.Response:
    daemon, handle = _served(request)
    body = await request.read()
    header_length = request.headers.get("Inference-Header-Content-Length")
    codec = OipCodec(header_length)
    work = daemon.worker(handle.route).submit(handle, body, codec)
    payload = await asyncio.wait_for(work, daemon.config.server.request_timeout_s)
    response = web.Response(body=payload, content_type="application/json")
    response.headers["X-Model-Name"] = handle.version.name
    response.headers["X-Model-Version"] = str(handle.version.version)
    response.headers["X-Model-Route"] = handle.route
    return response


class OipCodec(Codec):
    """Open Inference Protocol v2 tensors <-> the model's pyfunc input and output."""

    __slots__ = ("header_length", "request_id", "requested")

    def __init__(self, header_length: str | None) -> None:
        self.header_length = header_length
        self.request_id: str | None = None
        self.requested: list[str] | None = None

    def decode(self, body: bytes, model: Any) -> Decoded:
        document, binary = self._split(body)
        if not isinstance(document, dict) or not isinstance(document.get("inputs"), list):
            raise ProtocolError(
                400,
                "BAD_REQUEST",
                'expected {"inputs": [{"name", "shape", "datatype", "data"}, ...]}',
            )
        if not document["inputs"]:
            raise ProtocolError(400, "BAD_REQUEST", "'inputs' is empty")
        rid = document.get("id")
        self.request_id = rid if isinstance(rid, str) else None
        outputs = document.get("outputs")
        if isinstance(outputs, list):
            self.requested = [o.get("name") for o in outputs if isinstance(o, dict)]
        params = document.get("parameters")
        params = (
            {k: v for k, v in params.items() if k != "content_type"}
            if isinstance(params, dict)
            else None
        )
        tensors: dict[str, Any] = {}
        offset = 0
        for item in document["inputs"]:
            name, array, offset = _tensor(item, binary, offset)
            if name in tensors:
                raise ProtocolError(400, "BAD_REQUEST", f"input {name!r} given twice")
            tensors[name] = array
        block = _conformant_block(tensors, model)
        if block is not None:
            matrix, columns = block
            return Decoded(params=params or None, conformant=True, matrix=matrix, columns=columns)
        return Decoded(_to_model_input(tensors, predict_input_schema(model)), params or None)

    def _split(self, body: bytes) -> tuple[Any, bytes]:
        if self.header_length is None:
            header, binary = body, b""
        else:
            try:
                length = int(self.header_length)
            except ValueError:
                message = "Inference-Header-Content-Length is not a number"
                raise ProtocolError(400, "BAD_REQUEST", message) from None
            if not 0 <= length <= len(body):
                raise ProtocolError(
                    400, "BAD_REQUEST", "Inference-Header-Content-Length exceeds the body"
                )
            header, binary = body[:length], body[length:]
        try:
            return orjson.loads(header), binary
        except orjson.JSONDecodeError as exc:
            raise ProtocolError(400, "BAD_REQUEST", f"invalid JSON: {exc}") from None

    def encode(self, result: Any, request: Decoded, handle: Any) -> bytes:
        outputs = _from_model_output(result)
        if self.requested:
            known = {o["name"] for o in outputs}
            missing = [n for n in self.requested if n not in known]
            if missing:
                raise ProtocolError(
                    400,
                    "BAD_REQUEST",
                    f"unknown outputs {missing}; the model returns {sorted(known)}",
                )
            outputs = [o for o in outputs if o["name"] in self.requested]
        answer = {
            "model_name": handle.route,
            "model_version": str(handle.version.version),
            "outputs": outputs,
        }
        if self.request_id is not None:
            answer["id"] = self.request_id
        return orjson.dumps(answer, option=orjson.OPT_SERIALIZE_NUMPY)


def _tensor(item: Any, binary: bytes, offset: int) -> tuple[str, Any, int]:
    import numpy as np

    if not isinstance(item, dict):
        raise ProtocolError(400, "BAD_REQUEST", "each input must be an object")
    name, shape, datatype = item.get("name"), item.get("shape"), item.get("datatype")
    if not isinstance(name, str) or not name:
        raise ProtocolError(400, "BAD_REQUEST", "an input has no 'name'")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise ProtocolError(
            400, "BAD_REQUEST", f"input {name!r}: 'shape' must be a list of non-negative integers"
        )
    if datatype not in _NUMPY_BY_DATATYPE:
        raise ProtocolError(
            400,
            "BAD_REQUEST",
            f"input {name!r}: datatype {datatype!r} is not one of {', '.join(_NUMPY_BY_DATATYPE)}",
        )
    count = math.prod(shape)
    if count > MAX_ELEMENTS:
        raise ProtocolError(400, "BAD_REQUEST", f"input {name!r} has {count} elements")
    dtype = _NUMPY_BY_DATATYPE[datatype]
    size = (item.get("parameters") or {}).get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or offset + size > len(binary):
            raise ProtocolError(
                400, "BAD_REQUEST", f"input {name!r}: binary_data_size exceeds the binary part"
            )
        chunk = binary[offset : offset + size]
        offset += size
        array = _bytes_tensor(chunk) if datatype == "BYTES" else np.frombuffer(chunk, dtype)
    else:
        data = item.get("data")
        if data is None:
            raise ProtocolError(400, "BAD_REQUEST", f"input {name!r} has no 'data'")
        try:
            array = np.array(data, dtype=dtype)
        except (TypeError, ValueError, OverflowError) as exc:
            raise ProtocolError(
                400, "BAD_REQUEST", f"input {name!r}: data is not {datatype} ({exc})"
            ) from None
    if array.size != count:
        raise ProtocolError(
            400,
            "BAD_REQUEST",
            f"input {name!r}: shape {shape} needs {count} elements, got {array.size}",
        )
    return name, array.reshape(shape), offset


def _bytes_tensor(chunk: bytes) -> Any:
    import numpy as np

    items, i = [], 0
    while i + 4 <= len(chunk):
        n = int.from_bytes(chunk[i : i + 4], "little")
        items.append(chunk[i + 4 : i + 4 + n].decode("utf-8", "replace"))
        i += 4 + n
    return np.array(items, dtype=object)


def _conformant_block(tensors: dict[str, Any], model: Any) -> tuple[Any, list[str]] | None:
    """The tensors as one 2-D block in the signature's column order, when the model's
    signature is all double (or all float) columns and the request sends exactly those, in
    that dtype: a column tensor ([N] or [N, 1]) per name, or one [N, K] tensor over the K
    columns. The frame built from it is the one MLflow's schema enforcement would make of
    :func:`_to_model_input`'s (tested); anything else returns None and takes that path."""
    import numpy as np

    layout = numeric_layout(model)
    if layout is None:
        return None
    dtype, names = layout
    if len(tensors) == 1:
        ((name, array),) = tensors.items()
        if name not in names:
            fits = array.ndim == 2 and array.shape[1] == len(names) and len(array) > 0
            return (array, names) if fits and array.dtype == dtype else None
    if tensors.keys() != set(names):
        return None
    columns = []
    for name in names:
        array = tensors[name]
        if array.ndim == 2 and array.shape[1] == 1:
            array = array[:, 0]
        if array.ndim != 1 or array.dtype != dtype:
            return None
        columns.append(array)
    if len({len(c) for c in columns}) != 1 or not len(columns[0]):
        return None
    return np.column_stack(columns), names


def _to_model_input(tensors: dict[str, Any], schema: Any) -> Any:
    import pandas as pd

    if schema is not None and schema.is_tensor_spec():
        if len(tensors) == 1:
            return next(iter(tensors.values()))
        return tensors
    columns = schema.input_names() if schema is not None and schema.has_input_names() else []
    if len(tensors) == 1:
        ((name, array),) = tensors.items()
        if name not in columns and array.ndim == 2 and columns and array.shape[1] == len(columns):
            return pd.DataFrame(array, columns=columns)  # one [N, K] tensor over K columns
    frame = {}
    for name, array in tensors.items():
        if array.ndim == 2 and array.shape[1] == 1:
            array = array[:, 0]
        if array.ndim != 1:
            raise ProtocolError(
                400,
                "BAD_REQUEST",
                f"input {name!r}: a column takes shape [N] or [N, 1], got {list(array.shape)}",
            )
        frame[name] = array
    lengths = {len(a) for a in frame.values()}
    if len(lengths) > 1:
        raise ProtocolError(400, "BAD_REQUEST", "inputs have different lengths")
    return pd.DataFrame(frame)


def _from_model_output(result: Any) -> list[dict[str, Any]]:
    import numpy as np
    import pandas as pd

    if isinstance(result, pd.DataFrame):
        return [_output(str(c), result[c].to_numpy()) for c in result.columns]
    if isinstance(result, pd.Series):
        return [_output(str(result.name or "predict"), result.to_numpy())]
    if isinstance(result, dict):
        return [_output(str(k), np.asarray(v)) for k, v in result.items()]
    return [_output("predict", np.asarray(result))]


def _output(name: str, array: Any) -> dict[str, Any]:
    import numpy as np

    datatype = _datatype(array.dtype)
    if datatype == "BYTES":
        data = [x if isinstance(x, str) else str(x) for x in array.reshape(-1).tolist()]
    else:
        flat = array.reshape(-1)
        if flat.dtype.kind == "f":
            flat = np.where(np.isfinite(flat), flat, np.nan)  # NaN/inf become null in JSON
        data = flat.tolist()
        if flat.dtype.kind == "f":
            data = [None if isinstance(x, float) and math.isnan(x) else x for x in data]
    return {"name": name, "datatype": datatype, "shape": list(array.shape), "data": data}
