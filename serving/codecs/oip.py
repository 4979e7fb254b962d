"""Open Inference Protocol v2 tensors <-> the model's pyfunc input and output (no aiohttp).

Named tensors become the model's input per its MLflow signature (a column per named input, or
one ``[N, K]`` tensor spread over K signature columns, or tensors for tensor-spec models);
results come back as tensors, named as model metadata names them. Triton's binary tensor data
extension both ways (``Inference-Header-Content-Length``; ``binary_data`` per output or
``binary_data_output`` for all), a raw binary body for a one-input model, and Triton's
classification extension (top-k ``score:index`` as BYTES).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import orjson

from serving.codecs.base import Codec, Decoded, ProtocolError
from serving.codecs.mlflow import numeric_layout, predict_input_schema

NUMPY_BY_DATATYPE = {
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
    "BF16": "float32",  # no NumPy bfloat16: widened exactly (its 16 bits are float32's top half)
    "BYTES": "object",
}
_DATATYPE_BY_KIND = {"b": "BOOL", "O": "BYTES", "U": "BYTES", "S": "BYTES"}
_DATATYPE_BY_NAME = {
    numpy: oip for oip, numpy in NUMPY_BY_DATATYPE.items() if oip not in ("BYTES", "BF16")
}
#: Request parameters that belong to the protocol, never to ``predict(params=)``.
PROTOCOL_PARAMETERS = frozenset(
    {
        "content_type",
        "headers",
        "binary_data_output",
        "binary_data",
        "binary_data_size",
        "classification",
        "priority",
        "timeout",
        "sequence_id",
        "sequence_start",
        "sequence_end",
    }
)
#: The name of a model's one unnamed output, in metadata and in answers alike.
UNNAMED_OUTPUT = "predict"
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


def tensor_specs(schema: Any, *, outputs: bool = False) -> list[dict[str, Any]]:
    """A signature's tensors as metadata lists them. An unnamed output is named as answers
    name it: ``predict`` when it is the only one (an array result), else its position (a
    DataFrame result's column label); an unnamed input is ``input-<i>``."""
    if schema is None:
        return []

    def unnamed(i: int) -> str:
        if not outputs:
            return f"input-{i}"
        return UNNAMED_OUTPUT if len(schema.inputs) == 1 else str(i)

    specs = []
    if schema.is_tensor_spec():
        for i, spec in enumerate(schema.inputs):
            specs.append(
                {
                    "name": spec.name or unnamed(i),
                    "datatype": datatype_of(spec.type),
                    "shape": [int(d) for d in spec.shape],
                }
            )
        return specs
    for i, spec in enumerate(schema.inputs):
        mlflow_type = getattr(spec.type, "name", str(spec.type))
        specs.append(
            {
                "name": spec.name or unnamed(i),
                "datatype": _MLFLOW_TYPE_TO_DATATYPE.get(mlflow_type, "BYTES"),
                "shape": [-1],
            }
        )
    return specs


def datatype_of(dtype: Any) -> str:
    import numpy as np

    dtype = np.dtype(dtype)
    if dtype.kind in _DATATYPE_BY_KIND:
        return _DATATYPE_BY_KIND[dtype.kind]
    return _DATATYPE_BY_NAME.get(dtype.name, "BYTES")


@dataclass(frozen=True, slots=True)
class Requested:
    """One entry of a request's ``outputs``."""

    name: str
    binary: bool | None  #: None: as ``binary_data_output`` says
    classification: int  #: top-k (0: the tensor itself)


class OipCodec(Codec):
    """Open Inference Protocol v2 tensors <-> the model's pyfunc input and output.

    After :meth:`encode`, ``header_length`` is the JSON part's length when the answer carries
    binary tensors (the ``Inference-Header-Content-Length`` to send), else None.
    """

    __slots__ = ("binary_output", "header_length", "request_header_length", "request_id",
                 "requested")  # fmt: skip

    def __init__(self, header_length: str | None) -> None:
        self.request_header_length = header_length
        self.request_id: str | None = None
        self.requested: list[Requested] | None = None
        self.binary_output = False
        self.header_length: int | None = None

    def decode(self, body: bytes, model: Any) -> Decoded:
        if self.request_header_length is not None and self.request_header_length.strip() == "0":
            return self._raw(body, model)
        document, binary = self._split(body)
        if not isinstance(document, dict) or not isinstance(document.get("inputs"), list):
            raise ProtocolError(
                'expected {"inputs": [{"name", "shape", "datatype", "data"}, ...]}',
            )
        if not document["inputs"]:
            raise ProtocolError("'inputs' is empty")
        rid = document.get("id")
        if rid is not None and not isinstance(rid, str):
            raise ProtocolError(f"'id' must be a string (the protocol's type), not {_kind(rid)}")
        self.request_id = rid
        if "outputs" in document:
            self.requested = _requested(document["outputs"])
        params = document.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise ProtocolError("'parameters' must be an object")
        params = params or {}
        self.binary_output = params.get("binary_data_output") is True
        params = {k: v for k, v in params.items() if k not in PROTOCOL_PARAMETERS}
        tensors: dict[str, Any] = {}
        offset = 0
        for item in document["inputs"]:
            name, array, offset = _tensor(item, binary, offset)
            if name in tensors:
                raise ProtocolError(f"input {name!r} given twice")
            tensors[name] = array
        return self._decoded(tensors, model, params or None)

    def _decoded(self, tensors: dict[str, Any], model: Any, params: Any) -> Decoded:
        return decoded_from(tensors, model, params)

    def _raw(self, body: bytes, model: Any) -> Decoded:
        """Triton's raw binary request: no JSON, the body is the model's one input."""
        specs = tensor_specs(predict_input_schema(model))
        if len(specs) != 1:
            raise ProtocolError(
                "a raw binary body (Inference-Header-Content-Length: 0) is for a model with "
                f"exactly one input; this one has {len(specs)}"
            )
        spec = specs[0]
        array = from_binary(body, spec["datatype"], spec["name"])
        shape = list(spec["shape"])
        known = math.prod(d for d in shape if d >= 0)
        if shape.count(-1) > 1 or (known and array.size % known):
            raise ProtocolError(
                f"a raw body of {array.size} elements does not fit input {spec['name']!r} "
                f"of shape {shape}"
            )
        shape = [array.size // (known or 1) if d < 0 else d for d in shape]
        if math.prod(shape) != array.size:
            raise ProtocolError(
                f"a raw body of {array.size} elements does not fit input {spec['name']!r} "
                f"of shape {spec['shape']}"
            )
        self.binary_output = True  # a client that sends raw bytes reads them back
        return self._decoded({spec["name"]: array.reshape(shape)}, model, None)

    def _split(self, body: bytes) -> tuple[Any, bytes]:
        if self.request_header_length is None:
            header, binary = body, b""
        else:
            try:
                length = int(self.request_header_length)
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
        arrays = from_model_output(result)
        wanted: list[Requested]
        if self.requested:
            missing = [r.name for r in self.requested if r.name not in arrays]
            if missing:
                raise ProtocolError(
                    f"unknown outputs {missing}; the model returns {sorted(arrays)}",
                )
            wanted = self.requested
        else:
            wanted = [Requested(name, None, 0) for name in arrays]
        outputs, chunks = [], []
        for want in wanted:
            array = arrays[want.name]
            if want.classification:
                array = classify(array, want.classification)
            binary = self.binary_output if want.binary is None else want.binary
            if binary:
                chunk = to_binary(array)
                chunks.append(chunk)
                outputs.append(_output(want.name, array, binary_size=len(chunk)))
            else:
                outputs.append(_output(want.name, array))
        answer = {
            "model_name": handle.route,
            "model_version": str(handle.version.version),
            "outputs": outputs,
        }
        if self.request_id is not None:
            answer["id"] = self.request_id
        document = orjson.dumps(answer, option=orjson.OPT_SERIALIZE_NUMPY)
        if not chunks:
            return document
        self.header_length = len(document)
        return b"".join([document, *chunks])


def decoded_from(tensors: dict[str, Any], model: Any, params: Any) -> Decoded:
    """Named tensors as the model's input (the fast path's block where it applies)."""
    block = conformant_block(tensors, model)
    if block is not None:
        matrix, columns = block
        return Decoded(params=params, conformant=True, matrix=matrix, columns=columns)
    return Decoded(to_model_input(tensors, predict_input_schema(model)), params)


def check_shape(name: str, shape: Any) -> int:
    """The element count of a valid ``shape`` (non-negative ints, bounded).

    Raises:
        ProtocolError: it is not one.
    """
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise ProtocolError(f"input {name!r}: 'shape' must be a list of non-negative integers")
    if len(shape) > MAX_DIMENSIONS:
        raise ProtocolError(
            f"input {name!r}: a shape of {len(shape)} dimensions (at most {MAX_DIMENSIONS})"
        )
    count = math.prod(shape)
    if count > MAX_ELEMENTS:
        raise ProtocolError(f"input {name!r} has {count} elements")
    return count


def _kind(value: Any) -> str:
    return {
        bool: "a boolean",
        int: "a number",
        float: "a number",
        list: "a list",
        dict: "an object",
    }.get(type(value), type(value).__name__)


def _requested(outputs: Any) -> list[Requested]:
    if not isinstance(outputs, list):
        raise ProtocolError("'outputs' must be a list of {\"name\": ...} objects")
    requested, seen = [], set()
    for item in outputs:
        name = item.get("name") if isinstance(item, dict) else None
        if not isinstance(name, str) or not name:
            raise ProtocolError("each of 'outputs' must be an object with a string 'name'")
        if name in seen:
            raise ProtocolError(f"output {name!r} requested twice")
        seen.add(name)
        parameters = item.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise ProtocolError(f"output {name!r}: 'parameters' must be an object")
        binary = parameters.get("binary_data")
        if binary is not None and not isinstance(binary, bool):
            raise ProtocolError(f"output {name!r}: 'binary_data' must be true or false")
        count = parameters.get("classification", 0)
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise ProtocolError(f"output {name!r}: 'classification' must be a count >= 0")
        requested.append(Requested(name, binary, count))
    return requested


def _tensor(item: Any, binary: bytes, offset: int) -> tuple[str, Any, int]:
    import numpy as np

    if not isinstance(item, dict):
        raise ProtocolError("each input must be an object")
    name, shape, datatype = item.get("name"), item.get("shape"), item.get("datatype")
    if not isinstance(name, str) or not name:
        raise ProtocolError("an input has no 'name'")
    count = check_shape(name, shape)
    parameters = item.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise ProtocolError(f"input {name!r}: 'parameters' must be an object")
    if datatype not in NUMPY_BY_DATATYPE:
        raise ProtocolError(
            f"input {name!r}: datatype {datatype!r} is not one of {', '.join(NUMPY_BY_DATATYPE)}",
        )
    dtype = NUMPY_BY_DATATYPE[datatype]
    size = (parameters or {}).get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or offset + size > len(binary):
            raise ProtocolError(f"input {name!r}: binary_data_size exceeds the binary part")
        chunk = binary[offset : offset + size]
        offset += size
        array = from_binary(chunk, datatype, name)
    else:
        data = item.get("data")
        if data is None:
            raise ProtocolError(f"input {name!r} has no 'data'")
        try:
            array = np.array(data, dtype=dtype)
        except (TypeError, ValueError, OverflowError) as exc:
            raise ProtocolError(f"input {name!r}: data is not {datatype} ({exc})") from None
        dims: list[int] = shape  # type: ignore[assignment]  # a list: check_shape says so
        if array.ndim not in (1, len(dims)) or (
            array.ndim == len(dims) and list(array.shape) != dims
        ):
            raise ProtocolError(
                f"input {name!r}: data nested as {list(array.shape)} for shape {shape} (send "
                "it flat, or nested exactly as the shape)"
            )
    if array.size != count:
        raise ProtocolError(
            f"input {name!r}: shape {shape} needs {count} elements, got {array.size}",
        )
    return name, array.reshape(shape), offset


def from_binary(chunk: bytes, datatype: str, name: str) -> Any:
    """A tensor's raw bytes (little-endian; BYTES as 4-byte-length-prefixed items)."""
    import numpy as np

    if datatype == "BYTES":
        return _bytes_tensor(chunk)
    raw = np.dtype("<u2") if datatype == "BF16" else np.dtype(NUMPY_BY_DATATYPE[datatype])
    if len(chunk) % raw.itemsize:
        raise ProtocolError(
            f"input {name!r}: {len(chunk)} bytes is not a whole number of {datatype} elements"
        )
    array = np.frombuffer(chunk, raw.newbyteorder("<") if raw.itemsize > 1 else raw)
    if datatype == "BF16":  # bfloat16 is float32's top half
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array


def to_binary(array: Any) -> bytes:
    import numpy as np

    if array.dtype.kind in "OUS":
        parts = []
        for item in array.reshape(-1).tolist():
            data = item if isinstance(item, bytes) else str(item).encode()
            parts.append(len(data).to_bytes(4, "little") + data)
        return b"".join(parts)
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def classify(array: Any, k: int) -> Any:
    """Triton's classification: per batch row the top-k ``score:index`` strings, best first."""
    import numpy as np

    if array.dtype.kind not in "biuf":
        raise ProtocolError("classification needs a numeric output")
    rows = array.reshape(len(array), -1) if array.ndim > 1 else array.reshape(-1, 1)
    k = min(k, rows.shape[1])
    order = np.argsort(-rows, axis=1, kind="stable")[:, :k]
    fmt = (lambda v: f"{v:f}") if rows.dtype.kind == "f" else str
    out = [[f"{fmt(row[i].item())}:{i}" for i in idx] for row, idx in zip(rows, order, strict=True)]
    return np.array(out, dtype=object).reshape(len(rows), k)


def _bytes_tensor(chunk: bytes) -> Any:
    import numpy as np

    items, i = [], 0
    while i + 4 <= len(chunk):
        n = int.from_bytes(chunk[i : i + 4], "little")
        items.append(chunk[i + 4 : i + 4 + n].decode("utf-8", "replace"))
        i += 4 + n
    return np.array(items, dtype=object)


def conformant_block(tensors: dict[str, Any], model: Any) -> tuple[Any, list[str]] | None:
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


def to_model_input(tensors: dict[str, Any], schema: Any) -> Any:
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


def from_model_output(result: Any) -> dict[str, Any]:
    """The model's answer as named arrays (the names :func:`tensor_specs` lists)."""
    import numpy as np
    import pandas as pd

    if isinstance(result, pd.DataFrame):
        return {str(c): result[c].to_numpy() for c in result.columns}
    if isinstance(result, pd.Series):
        return {str(result.name or UNNAMED_OUTPUT): result.to_numpy()}
    if isinstance(result, dict):
        return {str(k): np.asarray(v) for k, v in result.items()}
    return {UNNAMED_OUTPUT: np.asarray(result)}


def _output(name: str, array: Any, *, binary_size: int | None = None) -> dict[str, Any]:
    import numpy as np

    datatype = datatype_of(array.dtype)
    out: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
    if binary_size is not None:
        out["parameters"] = {"binary_data_size": binary_size}
        return out
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
    out["data"] = data
    return out


def model_metadata(route: str, version: int, metadata: Any) -> dict[str, Any]:
    """``GET /v2/models/{name}``'s answer for a model's MLflow ``metadata``."""
    return {
        "name": route,
        "versions": [str(version)],
        "platform": "mlflow",
        "inputs": tensor_specs(metadata.get_input_schema()),
        "outputs": tensor_specs(metadata.get_output_schema(), outputs=True),
    }
