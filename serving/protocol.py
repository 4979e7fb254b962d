"""The MLflow scoring protocol: request decoding, prediction encoding, the error envelope.

No aiohttp here: these functions take bytes and return bytes, and run in the predict executor.
Parsing and schema handling reuse MLflow's own scoring-server functions so behaviour matches
``mlflow models serve``; JSON goes through orjson (fast, nesting bounded at 1024 levels).
"""

from __future__ import annotations

import io
import logging
from typing import Any

import orjson

log = logging.getLogger(__name__)

JSON = "application/json"
CSV = "text/csv"
PARQUET = "application/vnd.apache.parquet"
CONTENT_TYPES = (JSON, CSV, PARQUET)
FORMAT_KEYS = ("dataframe_split", "dataframe_records", "instances", "inputs")
MAX_MESSAGE_CHARS = 1000


class ProtocolError(Exception):
    """A request the protocol refuses: carries the HTTP status and MLflow's error code."""

    def __init__(self, status: int, error_code: str, message: str) -> None:
        self.status, self.error_code = status, error_code
        self.message = bound(message)
        super().__init__(self.message)


def bound(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """Cut a message so an error body never carries a large part of a request."""
    return message if len(message) <= limit else message[:limit] + f"... ({len(message)} chars)"


def error_body(error_code: str, message: str) -> bytes:
    """MLflow's error envelope."""
    return orjson.dumps({"error_code": error_code, "message": bound(message)})


def parse_content_type(header: str | None) -> tuple[str, dict[str, str]]:
    """Split a Content-Type per RFC 9110: type/subtype lower-cased, parameter names
    lower-cased, quoted values unquoted.

    Raises:
        ProtocolError: 415 when the header is missing or malformed.
    """
    if header is None or not header.strip():
        raise ProtocolError(
            415,
            "BAD_REQUEST",
            f"missing Content-Type header; send one of {', '.join(CONTENT_TYPES)}",
        )
    parts = _split_params(header)
    mime = parts[0].strip().lower()
    if mime.count("/") != 1 or not all(mime.split("/")):
        raise ProtocolError(415, "BAD_REQUEST", f"malformed Content-Type {header[:100]!r}")
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
    """The mime type of a supported request, else a 415 like MLflow's.

    Raises:
        ProtocolError: unsupported type, charset other than UTF-8, unknown parameters.
    """
    mime, params = parse_content_type(header)
    if mime not in CONTENT_TYPES:
        raise ProtocolError(
            415,
            "BAD_REQUEST",
            f"unsupported Content-Type {mime!r}: this server accepts {', '.join(CONTENT_TYPES)}",
        )
    charset = params.pop("charset", "utf-8").lower()
    if charset not in ("utf-8", "utf8"):
        raise ProtocolError(415, "BAD_REQUEST", f"charset {charset!r}: only UTF-8 is supported")
    if params:
        raise ProtocolError(
            415,
            "BAD_REQUEST",
            f"unrecognized Content-Type parameters: {', '.join(sorted(params))} "
            "(the MLflow 2.0 scoring protocol takes only charset)",
        )
    return mime


def decode(body: bytes, mime: str, model: Any) -> tuple[Any, dict[str, Any] | None, bool]:
    """Turn a request body into ``(data, params, unwrapped)`` for ``model.predict``.

    ``unwrapped`` is True for MLflow's unified LLM input, whose answer is not wrapped in
    ``{"predictions": ...}``.

    Raises:
        ProtocolError: 400 with MLflow's error code when the body is not a valid request.
    """
    from mlflow.exceptions import MlflowException

    schema = model.metadata.get_input_schema()
    try:
        if mime == CSV:
            from mlflow.pyfunc.scoring_server import parse_csv_input

            if not body.strip():
                raise ProtocolError(400, "BAD_REQUEST", "empty CSV body: send a header row")
            return parse_csv_input(io.StringIO(_utf8(body)), schema=schema), None, False
        if mime == PARQUET:
            from mlflow.pyfunc.scoring_server import parse_parquet_input

            return parse_parquet_input(io.BytesIO(body)), None, False
        return _decode_json(body, model, schema)
    except MlflowException as exc:
        raise ProtocolError(400, _code(exc), _first_part(exc.message)) from exc


def _decode_json(body: bytes, model: Any, schema: Any) -> tuple[Any, Any, bool]:
    from mlflow.pyfunc.scoring_server import _parse_json_data

    if not body.strip():
        raise ProtocolError(400, "BAD_REQUEST", _required_format("the body is empty"))
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(400, "BAD_REQUEST", f"invalid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise ProtocolError(
            400, "BAD_REQUEST", _required_format(f"received a JSON {type(document).__name__}")
        )
    params = document.get("params")
    if params is not None and not isinstance(params, dict):
        raise ProtocolError(
            400,
            "INVALID_PARAMETER_VALUE",
            f"'params' must be a JSON object of parameter names to values, got "
            f"{type(params).__name__}",
        )
    present = [k for k in FORMAT_KEYS if k in document]
    if len(present) > 1:
        raise ProtocolError(
            400, "BAD_REQUEST", _required_format(f"received several: {', '.join(present)}")
        )
    parsed = _parse_json_data(document, model.metadata, schema)
    return parsed.data, parsed.params, parsed.is_unified_llm_input


def predict(model: Any, data: Any, params: dict[str, Any] | None) -> Any:
    """``model.predict`` with MLflow's error semantics (bad input -> 400).

    Raises:
        ProtocolError: the model refused the input (schema) or raised.
    """
    from mlflow.exceptions import MlflowException

    try:
        return model.predict(data, params=params) if params else model.predict(data)
    except MlflowException as exc:
        raise ProtocolError(_status(exc), _code(exc), _first_part(exc.message)) from exc
    except Exception as exc:
        log.warning("predict raised %s: %s", type(exc).__name__, bound(str(exc), 300))
        raise ProtocolError(
            400,
            "BAD_REQUEST",
            "Encountered an unexpected error while evaluating the model. Verify that the "
            f"input is compatible with the model for inference. Error: {type(exc).__name__}: "
            f"{bound(str(exc), 300)}",
        ) from exc


def encode(predictions: Any, *, unwrapped: bool = False) -> bytes:
    """``{"predictions": ...}`` as MLflow writes it, but NaN and infinities become null."""
    from mlflow.utils.proto_json_utils import _get_jsonable_obj

    obj = _get_jsonable_obj(predictions, pandas_orient="records")
    payload = obj if unwrapped else {"predictions": obj}
    return orjson.dumps(payload, default=_default, option=orjson.OPT_SERIALIZE_NUMPY)


def _default(value: Any) -> Any:
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        import base64

        return base64.b64encode(value).decode("ascii")
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def _utf8(body: bytes) -> str:
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(400, "BAD_REQUEST", f"the body is not valid UTF-8 ({exc.reason} "
                            f"at byte {exc.start})") from None  # fmt: skip


def _required_format(detail: str) -> str:
    return (
        "The input must be a JSON object with exactly one of the input fields "
        f"{', '.join(FORMAT_KEYS)} (and optionally params); {detail}"
    )


def _code(exc: Any) -> str:
    code = getattr(exc, "error_code", "BAD_REQUEST")
    return code if code in ("BAD_REQUEST", "INVALID_PARAMETER_VALUE") else "BAD_REQUEST"


def _status(exc: Any) -> int:
    status = exc.get_http_status_code() if hasattr(exc, "get_http_status_code") else 400
    return status if 400 <= status < 500 else 400


def _first_part(message: str) -> str:
    """MLflow appends the offending input and a long protocol note; keep the explanation."""
    for marker in ("\nInput:", ". IMPORTANT: The MLflow Model scoring protocol"):
        message = message.split(marker, 1)[0]
    return message.strip()
