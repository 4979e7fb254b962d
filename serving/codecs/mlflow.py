"""MLflow's scoring protocol: request decoding and prediction encoding (``/invocations``).

No aiohttp here: these functions take bytes and return bytes, and run on the predict threads.
Parsing and schema handling reuse MLflow's own scoring-server functions so behaviour matches
``mlflow models serve``; JSON goes through orjson (fast, nesting bounded at 1024 levels).
"""

from __future__ import annotations

import functools
import io
import logging
from typing import Any

import orjson

from loader.lean import numeric_layout
from serving.codecs.base import (
    Codec,
    Decoded,
    Limits,
    ProtocolError,
    UnsupportedMediaType,
)

log = logging.getLogger(__name__)

JSON = "application/json"
CSV = "text/csv"
PARQUET = "application/vnd.apache.parquet"
CONTENT_TYPES = (JSON, CSV, PARQUET)
FORMAT_KEYS = ("dataframe_split", "dataframe_records", "instances", "inputs")


def parse_content_type(header: str | None) -> tuple[str, dict[str, str]]:
    """Split a Content-Type per RFC 9110: type/subtype lower-cased, parameter names
    lower-cased, quoted values unquoted.

    Raises:
        UnsupportedMediaType: the header is missing or malformed.
    """
    if header is None or not header.strip():
        raise UnsupportedMediaType(
            f"missing Content-Type header; send one of {', '.join(CONTENT_TYPES)}",
        )
    parts = _split_params(header)
    mime = parts[0].strip().lower()
    if mime.count("/") != 1 or not all(mime.split("/")):
        raise UnsupportedMediaType(f"malformed Content-Type {header[:100]!r}")
    params: dict[str, str] = {}
    for part in parts[1:]:
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        if not key:
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1].replace('\\"', '"').replace("\\\\", "\\")
        params[key] = value
    return mime, params


def _split_params(header: str) -> list[str]:
    parts, current, quoted, escaped = [], [], False, False
    for ch in header:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\" and quoted:
            current.append(ch)
            escaped = True
        elif ch == '"':
            quoted = not quoted
            current.append(ch)
        elif ch == ";" and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def check_content_type(header: str | None) -> str:
    """The mime type of a supported request, else a 415 like MLflow's (a header seen before
    is answered from memory: clients send the same one every time).

    Raises:
        UnsupportedMediaType: unsupported type, charset other than UTF-8, unknown parameters.
    """
    return _supported_type(header) if header is not None else _check_content_type(header)


@functools.lru_cache(maxsize=64)
def _supported_type(header: str) -> str:
    return _check_content_type(header)


def _check_content_type(header: str | None) -> str:
    mime, params = parse_content_type(header)
    if mime not in CONTENT_TYPES:
        raise UnsupportedMediaType(
            f"unsupported Content-Type {mime!r}: this server accepts {', '.join(CONTENT_TYPES)}",
        )
    charset = params.pop("charset", "utf-8").lower()
    if charset not in ("utf-8", "utf8"):
        raise UnsupportedMediaType(f"charset {charset!r}: only UTF-8 is supported")
    if params:
        raise UnsupportedMediaType(
            f"unrecognized Content-Type parameters: {', '.join(sorted(params))} "
            "(the MLflow 2.0 scoring protocol takes only charset)",
        )
    return mime


class MlflowCodec(Codec):
    """MLflow's scoring protocol (``/invocations``)."""

    __slots__ = ("limits", "mime")

    def __init__(self, mime: str, limits: Limits | None = None) -> None:
        self.mime = mime
        self.limits = limits or Limits()

    def decode(self, body: bytes, model: Any) -> Decoded:
        return decode(body, self.mime, model, self.limits)

    def encode(self, result: Any, request: Decoded, handle: Any) -> bytes:
        return encode(result, unwrapped=request.unwrapped)


def predict_input_schema(model: Any) -> Any:
    """The model's input schema (None without a signature)."""
    return model.metadata.get_input_schema()


def decode(body: bytes, mime: str, model: Any, limits: Limits | None = None) -> Decoded:
    """Turn a request body into a :class:`Decoded` request for ``model.predict``.

    Raises:
        ProtocolError: with MLflow's error code, when the body is not a valid request.
        TooLarge: its rows x columns exceed ``limits`` (checked before decoding).
    """
    from mlflow.exceptions import MlflowException

    limits = limits or Limits()
    schema = model.metadata.get_input_schema()
    try:
        if mime == CSV:
            from mlflow.pyfunc.scoring_server import parse_csv_input

            if not body.strip():
                raise ProtocolError("empty CSV body: send a header row")
            _check_csv(body, limits)
            return Decoded(parse_csv_input(io.StringIO(_utf8(body)), schema=schema))
        if mime == PARQUET:
            from mlflow.pyfunc.scoring_server import parse_parquet_input

            _check_parquet(body, limits)
            return Decoded(parse_parquet_input(io.BytesIO(body)))
        return _decode_json(body, model, schema, limits)
    except MlflowException as exc:
        raise ProtocolError(first_part(exc.message), error_code_of(exc)) from exc


def _check_csv(body: bytes, limits: Limits) -> None:
    """Columns from the header's commas (exactly counted only when they suggest too many),
    before pandas builds anything."""
    end = body.find(b"\n")
    header = body if end < 0 else body[:end]
    columns = header.count(b",") + 1
    if columns > limits.max_columns:  # quoted commas count too: confirm with a real parse
        import csv

        columns = len(next(csv.reader([header.decode("utf-8", "replace")]), []))
    limits.check(None, columns, "the CSV body")


def _check_parquet(body: bytes, limits: Limits) -> None:
    """The file's own metadata says its rows and columns: read it, not the data."""
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(io.BytesIO(body)).metadata
    except Exception:  # not Parquet: MLflow's parser says so in its words
        return
    limits.check(meta.num_rows, meta.num_columns, "the Parquet body")


def _check_json(document: dict[str, Any], limits: Limits) -> None:
    for key in FORMAT_KEYS:
        value = document.get(key)
        if key == "dataframe_split" and isinstance(value, dict):
            data, cols = value.get("data"), value.get("columns")
            rows = data if isinstance(data, list) else []
            width = len(cols) if isinstance(cols, list) else 0
            if not width and rows and isinstance(rows[0], list):
                width = len(rows[0])
            limits.check(None, width, "the request's dataframe_split")
            continue
        if isinstance(value, list) and value:
            first = value[0]
            width = len(first) if isinstance(first, dict | list) else 1
            limits.check(None, width, f"the request's {key}")


def _decode_json(body: bytes, model: Any, schema: Any, limits: Limits) -> Decoded:
    from mlflow.pyfunc.scoring_server import _parse_json_data

    if not body.strip():
        raise ProtocolError(_required_format("Received an empty body."))
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:  # MLflow's words; the position, not the input
        raise ProtocolError(
            f"Ensure that input is a valid JSON formatted string. Error: '{exc}'"
        ) from None
    if not isinstance(document, dict):
        kind = "a list" if isinstance(document, list) else f"a JSON {type(document).__name__}"
        raise ProtocolError(_required_format(f"Received {kind}."))
    params = document.get("params")
    if params is not None and not isinstance(params, dict):
        raise ProtocolError(
            f"'params' must be a JSON object of parameter names to values, got "
            f"{type(params).__name__}",
            "INVALID_PARAMETER_VALUE",
        )
    present = [k for k in FORMAT_KEYS if k in document]
    if len(present) > 1:
        raise ProtocolError(
            _required_format(f"Received dictionary with input fields: {sorted(present)}")
        )
    _check_json(document, limits)
    fast = _numeric_matrix(document, model)
    if fast is not None:
        matrix, columns = fast
        return Decoded(params=params, conformant=True, matrix=matrix, columns=columns)
    parsed = _parse_json_data(document, model.metadata, schema)
    return Decoded(parsed.data, parsed.params, parsed.is_unified_llm_input)


def _numeric_matrix(document: dict[str, Any], model: Any) -> Any:
    """The common case read directly: a model whose signature is all required double (or all
    float) columns, and a request carrying exactly those columns, every cell a JSON number, as

    - ``dataframe_split`` with exactly the signature's ``columns``, in order, and ``data``;
    - ``dataframe_records``, ``instances`` or ``inputs`` as a list of records, each with
      exactly the signature's names (any order);
    - ``inputs`` as columns: each name to a list, all of one length;

    and nothing else in the document but ``params``. Returns ``(matrix, columns)``: the rows in
    the signature's order and dtype, from which :func:`conformant_frame` builds the very
    DataFrame MLflow's parser and schema enforcement would hand the model (same columns,
    dtypes and RangeIndex), in a tenth of the time. Anything else returns None and takes
    MLflow's own path.
    """
    layout = numeric_layout(model)
    keys = [k for k in document if k != "params"]
    if layout is None or len(keys) != 1:
        return None
    dtype, names = layout
    fmt, payload = keys[0], document[keys[0]]
    if fmt == "dataframe_split":
        if type(payload) is not dict or payload.keys() != {"columns", "data"}:
            return None
        rows = payload["data"] if payload["columns"] == names else None
    elif fmt == "inputs" and type(payload) is dict:
        return _numeric_columns(payload, names, dtype)
    elif fmt in ("dataframe_records", "instances", "inputs"):
        rows = _record_rows(payload, names)
    else:
        return None
    if type(rows) is not list or not rows:
        return None
    width = len(names)
    for row in rows:
        if type(row) is not list or len(row) != width or not _all_numbers(row):
            return None
    import numpy as np

    return np.array(rows, dtype=dtype), names


def _record_rows(records: Any, names: list[str]) -> list[list[Any]] | None:
    """Records that each hold exactly ``names``, as rows in that order."""
    if type(records) is not list:
        return None
    rows = []
    for record in records:
        if type(record) is not dict or len(record) != len(names):
            return None
        try:
            rows.append([record[name] for name in names])
        except KeyError:
            return None
    return rows


def _numeric_columns(columns: dict[str, Any], names: list[str], dtype: Any) -> Any:
    """``{"name": [values...]}`` for exactly ``names``, all one non-zero length."""
    if len(columns) != len(names):
        return None
    try:
        values = [columns[name] for name in names]
    except KeyError:
        return None
    length = len(values[0]) if type(values[0]) is list else 0
    for column in values:
        if type(column) is not list or len(column) != length or not _all_numbers(column):
            return None
    if not length:
        return None
    import numpy as np

    return np.array(values, dtype=dtype).T, names


def _all_numbers(cells: list[Any]) -> bool:
    """Every cell a JSON number (bool is not one)."""
    return all(type(cell) is float or type(cell) is int for cell in cells)


def encode(predictions: Any, *, unwrapped: bool = False) -> bytes:
    """``{"predictions": ...}`` as MLflow writes it (its own conversions: pandas as records,
    pydantic models dumped, bytes in base64), but NaN and infinities become null (valid JSON)
    and dict keys that are not strings are written as strings (MLflow would fail)."""
    from mlflow.utils.proto_json_utils import _get_jsonable_obj

    obj = _get_jsonable_obj(predictions, pandas_orient="records")
    return to_json(obj if unwrapped else {"predictions": obj})


def to_json(obj: Any) -> bytes:
    """A model's output as JSON bytes, the way every answer (and stream chunk) is written."""
    return orjson.dumps(
        obj, default=_default, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS
    )


def _default(value: Any) -> Any:
    """What orjson cannot write: MLflow's own NumpyEncoder conversions first (object arrays,
    numpy scalars, bytes, dates, pydantic models), then anything list-like, then its text."""
    from mlflow.utils.proto_json_utils import NumpyEncoder

    converted, ok = NumpyEncoder().try_convert(value)
    if ok:
        return converted
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def _utf8(body: bytes) -> str:
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(
            f"the body is not valid UTF-8 ({exc.reason} at byte {exc.start})"
        ) from None


def _required_format(detail: str) -> str:
    """MLflow's own sentence for a body without exactly one input field, then ``detail``."""
    from mlflow.pyfunc.scoring_server import REQUIRED_INPUT_FORMAT

    return f"{REQUIRED_INPUT_FORMAT}. {detail}"


def error_code_of(exc: Any) -> str:
    code = getattr(exc, "error_code", "BAD_REQUEST")
    return code if code in ("BAD_REQUEST", "INVALID_PARAMETER_VALUE") else "BAD_REQUEST"


_DATA_QUOTED = ("Failed to enforce schema of data '", "' with schema '")


def first_part(message: str) -> str:
    """MLflow's explanation, without what it adds of the request: the offending input, the
    data it quotes in a schema error (the DataFrame's repr: the caller's values), and a long
    protocol note. MLflow's own wording stays, for clients that match on it."""
    for marker in ("\nInput:", ". IMPORTANT: The MLflow Model scoring protocol"):
        message = message.split(marker, 1)[0]
    head, tail = _DATA_QUOTED
    if message.startswith(head) and tail in message:
        message = "Failed to enforce schema of data with schema '" + message.split(tail, 1)[1]
    if ", invalid elements: " in message:  # a type-hint check lists the caller's values
        message = message.split(", invalid elements: ", 1)[0] + ": some elements do not match it"
    return message.strip()
