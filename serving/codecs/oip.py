"""Open Inference Protocol v2 tensors <-> the model's pyfunc input and output (no aiohttp).

Named tensors become the model's input per its MLflow signature (a column per named input, or
one ``[N, K]`` tensor spread over K signature columns, or tensors for tensor-spec models);
results come back as tensors. Binary tensor data (Triton's extension,
``Inference-Header-Content-Length``) is accepted on input; answers are JSON.
"""

from __future__ import annotations

import math
from typing import Any

import orjson

from serving.codecs.base import Codec, Decoded, ProtocolError
from serving.codecs.mlflow import numeric_layout, predict_input_schema

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
#: NumPy's own limit is 64; no model input has more than a handful.
MAX_DIMENSIONS = 32


def tensor_specs(schema: Any) -> list[dict[str, Any]]:
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


class OipCodec(Codec):
    """Open Inference Protocol v2 tensors <-> the model's pyfunc input and output."""

    __slots__ = ("header_length", "request_id", "requested")

    def __init__(self, header_length: str | None) -> None:
        self.header_length = header_length
        self.request_id: str | None = None
        self.requested: list[Any] | None = None

    def decode(self, body: bytes, model: Any) -> Decoded:
        document, binary = self._split(body)
        if not isinstance(document, dict) or not isinstance(document.get("inputs"), list):
            raise ProtocolError(
                'expected {"inputs": [{"name", "shape", "datatype", "data"}, ...]}',
            )
        if not document["inputs"]:
            raise ProtocolError("'inputs' is empty")
        rid = document.get("id")
        self.request_id = rid if isinstance(rid, str) else None
        outputs = document.get("outputs")
        if isinstance(outputs, list):
            names = [o.get("name") if isinstance(o, dict) else None for o in outputs]
            if not all(isinstance(n, str) and n for n in names):
                raise ProtocolError("each of 'outputs' must be an object with a string 'name'")
            self.requested = names
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
                raise ProtocolError(f"input {name!r} given twice")
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
                raise ProtocolError(message) from None
            if not 0 <= length <= len(body):
                raise ProtocolError("Inference-Header-Content-Length exceeds the body")
            header, binary = body[:length], body[length:]
        try:
            return orjson.loads(header), binary
        except orjson.JSONDecodeError as exc:
            raise ProtocolError(f"invalid JSON: {exc}") from None

    def encode(self, result: Any, request: Decoded, handle: Any) -> bytes:
        outputs = _from_model_output(result)
        if self.requested:
            known = {o["name"] for o in outputs}
            missing = [n for n in self.requested if n not in known]
            if missing:
                raise ProtocolError(
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
        raise ProtocolError("each input must be an object")
    name, shape, datatype = item.get("name"), item.get("shape"), item.get("datatype")
    if not isinstance(name, str) or not name:
        raise ProtocolError("an input has no 'name'")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise ProtocolError(f"input {name!r}: 'shape' must be a list of non-negative integers")
    if len(shape) > MAX_DIMENSIONS:
        raise ProtocolError(
            f"input {name!r}: a shape of {len(shape)} dimensions (at most {MAX_DIMENSIONS})"
        )
    parameters = item.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise ProtocolError(f"input {name!r}: 'parameters' must be an object")
    if datatype not in _NUMPY_BY_DATATYPE:
        raise ProtocolError(
            f"input {name!r}: datatype {datatype!r} is not one of {', '.join(_NUMPY_BY_DATATYPE)}",
        )
    count = math.prod(shape)
    if count > MAX_ELEMENTS:
        raise ProtocolError(f"input {name!r} has {count} elements")
    dtype = _NUMPY_BY_DATATYPE[datatype]
    size = (parameters or {}).get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or offset + size > len(binary):
            raise ProtocolError(f"input {name!r}: binary_data_size exceeds the binary part")
        chunk = binary[offset : offset + size]
        offset += size
        array = _bytes_tensor(chunk) if datatype == "BYTES" else np.frombuffer(chunk, dtype)
    else:
        data = item.get("data")
        if data is None:
            raise ProtocolError(f"input {name!r} has no 'data'")
        try:
            array = np.array(data, dtype=dtype)
        except (TypeError, ValueError, OverflowError) as exc:
            raise ProtocolError(f"input {name!r}: data is not {datatype} ({exc})") from None
    if array.size != count:
        raise ProtocolError(
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
                f"input {name!r}: a column takes shape [N] or [N, 1], got {list(array.shape)}",
            )
        frame[name] = array
    lengths = {len(a) for a in frame.values()}
    if len(lengths) > 1:
        raise ProtocolError("inputs have different lengths")
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
    data: list[Any]
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


def model_metadata(route: str, version: int, metadata: Any) -> dict[str, Any]:
    """``GET /v2/models/{name}``'s answer for a model's MLflow ``metadata``."""
    return {
        "name": route,
        "versions": [str(version)],
        "platform": "mlflow",
        "inputs": tensor_specs(metadata.get_input_schema()),
        "outputs": tensor_specs(metadata.get_output_schema()),
    }
