"""The Open Inference Protocol over gRPC: ``ModelInferRequest`` -> model input -> the answer's
``ModelInferResponse`` bytes (no aiohttp, no grpc: messages only).

The same tensors as ``/v2`` over REST (:mod:`serving.codecs.oip`: the signature mapping, the
fast path's block, output names, classification), read from typed ``contents`` or
``raw_input_contents``; outputs are always raw (``raw_output_contents``), which every client
reads.
"""

from __future__ import annotations

from typing import Any

from serving.codecs import messages as pb
from serving.codecs.base import Codec, Decoded, ProtocolError
from serving.codecs.oip import (
    NUMPY_BY_DATATYPE,
    PROTOCOL_PARAMETERS,
    Requested,
    check_shape,
    classify,
    datatype_of,
    decoded_from,
    from_binary,
    from_model_output,
    to_binary,
)

#: Which typed ``contents`` field holds each datatype.
_CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def parameter(value: pb.InferParameter) -> Any:
    kind = value.WhichOneof("parameter_choice")
    return getattr(value, kind) if kind else None


class GrpcCodec(Codec):
    """One parsed ``ModelInferRequest`` (parsed on the loop: its ``model_name`` routes it)."""

    __slots__ = ("message", "requested")

    def __init__(self, message: pb.ModelInferRequest) -> None:
        self.message = message
        self.requested: list[Requested] | None = None

    def decode(self, body: bytes, model: Any) -> Decoded:
        m = self.message
        if not m.inputs:
            raise ProtocolError("the request has no inputs")
        raw = list(m.raw_input_contents)
        if raw and len(raw) != len(m.inputs):
            raise ProtocolError(
                f"raw_input_contents has {len(raw)} entries for {len(m.inputs)} inputs"
            )
        tensors: dict[str, Any] = {}
        for i, item in enumerate(m.inputs):
            name = item.name
            if not name:
                raise ProtocolError("an input has no name")
            if name in tensors:
                raise ProtocolError(f"input {name!r} given twice")
            tensors[name] = _tensor(item, raw[i] if raw else None)
        if m.outputs:
            seen: set[str] = set()
            self.requested = []
            for out in m.outputs:
                if out.name in seen:
                    raise ProtocolError(f"output {out.name!r} requested twice")
                seen.add(out.name)
                count = parameter(out.parameters["classification"]) if (
                    "classification" in out.parameters
                ) else 0  # fmt: skip
                if not isinstance(count, int) or isinstance(count, bool) or count < 0:
                    raise ProtocolError(f"output {out.name!r}: 'classification' must be >= 0")
                self.requested.append(Requested(out.name, True, count))
        params = {k: parameter(v) for k, v in m.parameters.items() if k not in PROTOCOL_PARAMETERS}
        return decoded_from(tensors, model, params or None)

    def encode(self, result: Any, request: Decoded, handle: Any) -> bytes:
        arrays = from_model_output(result)
        wanted = self.requested or [Requested(n, True, 0) for n in arrays]
        missing = [w.name for w in wanted if w.name not in arrays]
        if missing:
            raise ProtocolError(f"unknown outputs {missing}; the model returns {sorted(arrays)}")
        answer = pb.ModelInferResponse(
            model_name=handle.route,
            model_version=str(handle.version.version),
            id=self.message.id,
        )
        for want in wanted:
            array = arrays[want.name]
            if want.classification:
                array = classify(array, want.classification)
            answer.outputs.add(
                name=want.name, datatype=datatype_of(array.dtype), shape=list(array.shape)
            )
            answer.raw_output_contents.append(to_binary(array))
        return answer.SerializeToString()


def _tensor(item: Any, raw: bytes | None) -> Any:
    import numpy as np

    name, datatype = item.name, item.datatype
    shape = list(item.shape)
    count = check_shape(name, shape)
    if datatype not in NUMPY_BY_DATATYPE:
        raise ProtocolError(
            f"input {name!r}: datatype {datatype!r} is not one of {', '.join(NUMPY_BY_DATATYPE)}"
        )
    if raw is not None:
        array = from_binary(raw, datatype, name)
    else:
        field = _CONTENTS.get(datatype)
        if field is None:  # FP16, BF16: raw only, as the protocol says
            raise ProtocolError(f"input {name!r}: {datatype} travels in raw_input_contents only")
        values = list(getattr(item.contents, field))
        if datatype == "BYTES":
            array = np.array([v.decode("utf-8", "replace") for v in values], dtype=object)
        else:
            array = np.array(values, dtype=NUMPY_BY_DATATYPE[datatype])
    if array.size != count:
        raise ProtocolError(
            f"input {name!r}: shape {shape} needs {count} elements, got {array.size}"
        )
    return array.reshape(shape)
