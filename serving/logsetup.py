"""Logging configuration for the daemon (the library never configures handlers)."""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime

import orjson

from loader.errors import redact

LOG_FORMATS = ("text", "json")


class RedactingFilter(logging.Filter):
    """Every line leaves without credentials: the message and its traceback are redacted
    (MLflow's and urllib3's texts carry the registry's URL, userinfo included)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg (and exc when there is one)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = record.exc_text or self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter(
                "%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S"
            )
        )
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.captureWarnings(True)
    # Per-request access lines and MLflow's chatter stay out of INFO.
    for noisy in ("aiohttp.access", "mlflow", "alembic", "py.warnings"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    # urllib3 logs each retry of each registry call (a long URL each) at WARNING: an outage
    # is reported once by modeld itself, then reminded every few minutes.
    logging.getLogger("urllib3").setLevel(max(logging.ERROR, root.level))
