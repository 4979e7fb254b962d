"""When to poll the registry next: interval with jitter, exponential backoff while it fails.

Pure policy, shared by both schedulers: the daemon's asyncio task (``serving/hotswap.py``) and
:class:`~loader.live.LiveModel`'s thread.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from loader.errors import ConfigError

POLL_INTERVAL_S = 10.0
JITTER = 0.1
MAX_BACKOFF_S = 300.0


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
            base = max(self.interval_s, min(self.max_backoff_s, self.interval_s * 2**failures))
        spread = base * self.jitter
        return base + (rng or random).uniform(-spread, spread)
