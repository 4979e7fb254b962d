"""Following the registry: when to poll next, and the one poll loop that does it.

:class:`PollSchedule` is pure policy (interval with jitter, backoff while polls fail).
:class:`Poller` is the loop itself, a thread that calls ``refresh`` on that schedule; both
schedulers use it: :class:`~loader.live.LiveModel` and the daemon (``serving.runtime``).
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass

from loader.errors import ConfigError
from loader.policy import backoff_s

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 10.0
JITTER = 0.1
MAX_BACKOFF_S = 300.0
JOIN_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class PollSchedule:
    """``interval_s`` +/- ``jitter`` (a fraction) between polls; after ``failures`` consecutive
    failed polls, ``interval_s * 2**failures`` capped at ``max_backoff_s`` (never below the
    interval)."""

    interval_s: float = POLL_INTERVAL_S
    jitter: float = JITTER
    max_backoff_s: float = MAX_BACKOFF_S

    def __post_init__(self) -> None:
        if not self.interval_s > 0:
            raise ConfigError("poll_interval_s", self.interval_s, "a number of seconds > 0")
        if not 0 <= self.jitter < 1:
            raise ConfigError("poll_jitter", self.jitter, "a fraction in [0, 1)")

    def next_delay(self, failures: int = 0, *, rng: random.Random | None = None) -> float:
        base = self.interval_s
        if failures > 0:
            base = max(
                self.interval_s, backoff_s(failures + 1, self.interval_s, self.max_backoff_s)
            )
        spread = base * self.jitter
        return base + (rng or random).uniform(-spread, spread)


class Poller:
    """Call ``refresh`` on ``schedule`` from a thread until :meth:`stop`; :meth:`poke` polls
    at once (a webhook, an operator). ``refresh`` returns whether the registry answered: a
    failed poll backs off. Any exception is logged and the loop goes on, because the served
    models keep serving whatever following does.

    Args:
        refresh: one poll; returns False when the registry could not be reached.
        schedule: the schedule, read before each wait (so it can change while running).
        name: the thread's name.
    """

    def __init__(
        self,
        refresh: Callable[[], bool],
        schedule: Callable[[], PollSchedule],
        *,
        name: str = "modeld-poll",
    ) -> None:
        self._refresh = refresh
        self._schedule = schedule
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def poke(self) -> None:
        """Poll now (thread-safe)."""
        self._wake.set()

    def stop(self, timeout_s: float = JOIN_TIMEOUT_S) -> None:
        """Stop and join the thread (a poll under way finishes first). Idempotent."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            self._wake.wait(self._schedule().next_delay(failures))
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                ok = self._refresh()
            except Exception:  # never let following die: the served models keep serving
                log.exception("registry poll failed")
                ok = False
            failures = 0 if ok else failures + 1
