"""Webhook deliveries seen, shared by every worker on one cache volume: a replayed delivery is
refused once in all, not once per worker.

A small sqlite file beside the cache index (``<cache>/webhook-deliveries.db``); sqlite does the
cross-process locking. Deliveries older than twice the accepted timestamp skew are pruned (a
replay of one is refused by its timestamp anyway). Blocking: call it off the event loop.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)
FILE = "webhook-deliveries.db"
_MEMORY_KEPT = 4096


class DeliveryLedger:
    """``root_of()`` gives the cache root once there is one (None: not yet)."""

    def __init__(self, root_of: Callable[[], Path | None]) -> None:
        self._root_of = root_of
        self._memory: OrderedDict[str, None] = OrderedDict()  # when the file cannot be used
        self._lock = threading.Lock()

    def first_time(self, delivery: str, *, max_age_s: float) -> bool:
        """Record ``delivery``; False when any worker recorded it before."""
        if self.path is not None:
            try:
                return self._record(delivery, max_age_s)
            except sqlite3.Error as exc:  # a full or read-only disk: this worker's memory
                log.warning("webhook deliveries cannot be shared (%s): remembered here only", exc)
        with self._lock:
            if delivery in self._memory:
                return False
            self._memory[delivery] = None
            while len(self._memory) > _MEMORY_KEPT:
                self._memory.popitem(last=False)
            return True

    @property
    def path(self) -> Path | None:
        root = self._root_of()
        return root / FILE if root is not None else None

    def _record(self, delivery: str, max_age_s: float) -> bool:
        path = self.path
        assert path is not None
        now = time.time()
        with sqlite3.connect(path, timeout=5) as db:
            db.execute("CREATE TABLE IF NOT EXISTS seen (id TEXT PRIMARY KEY, at REAL)")
            db.execute("DELETE FROM seen WHERE at < ?", (now - 2 * max_age_s,))
            try:
                db.execute("INSERT INTO seen VALUES (?, ?)", (delivery, now))
            except sqlite3.IntegrityError:
                return False
        return True
