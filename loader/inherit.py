"""Models loaded by a parent process before it forked this one, shared copy-on-write.

``modeld serve --workers N`` loads each in-process model once, in a parent that then forks its
serving workers: the pages of the model (and of MLflow, scikit-learn and the rest) are the
parent's, shared by every worker until one writes to them. A worker's pipeline takes its
inherited model here instead of loading the same files again; anything not offered (another
version, an isolated model, a different ``model_config``) loads as usual.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import orjson

Key = tuple[str, str]

_OFFERED: dict[Key, Any] = {}


def key(path: str | Path, model_config: dict[str, Any] | None) -> Key:
    """What identifies one load: the cached directory and the ``model_config`` given to it."""
    config = (
        orjson.dumps(model_config, option=orjson.OPT_SORT_KEYS).decode() if model_config else ""
    )
    return os.path.realpath(path), config


def offer(load: Key, model: Any) -> None:
    """Hold ``model`` (loaded from ``load``) for the processes forked from this one."""
    _OFFERED[load] = model


def take(path: str | Path, model_config: dict[str, Any] | None) -> Any | None:
    """The model loaded from ``path`` with ``model_config`` before this process was forked,
    once (a later load of the same version loads again), or None."""
    return _OFFERED.pop(key(path, model_config), None)


def offered() -> set[Key]:
    return set(_OFFERED)


def withdraw(load: Key) -> None:
    """Drop the parent's hold on one model (its memory goes once no process uses it)."""
    _OFFERED.pop(load, None)
