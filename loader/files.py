"""File primitives the cache and the environment store share: a bounded ``flock`` and a
removal that never leaves half a tree under its name."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

LOCK_POLL_S = 0.05


@contextlib.contextmanager
def flock(
    path: Path, mode: int, deadline: float, on_timeout: Callable[[], Exception]
) -> Iterator[None]:
    """Hold ``flock(mode)`` on ``path`` (created 0600), waiting until ``deadline``
    (``time.monotonic()``); past it, raise ``on_timeout()``. Closing releases it, so a
    process that dies holding it releases it too."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        while True:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise on_timeout() from None
                time.sleep(LOCK_POLL_S)
        yield
    finally:
        os.close(fd)


def remove_tree(path: Path) -> None:
    """Remove a file or tree; move it aside first so a crash never leaves half of it in place."""
    if not path.exists() and not path.is_symlink():
        return
    trash = path.with_name(f".trash-{uuid.uuid4().hex[:8]}-{path.name}")
    try:
        os.replace(path, trash)
    except OSError:
        trash = path
    shutil.rmtree(trash, ignore_errors=True) if trash.is_dir() else trash.unlink(missing_ok=True)
