"""Swap and retry decisions as pure functions: no I/O, no clock, no state.

The manager asks :func:`swap_action` what to do with each answer of the registry, the poll
loops, the manager's retries and the daemon's worker supervisor all wait :func:`backoff_s`.
Tested as tables (``tests/test_policies.py``), as TF Serving tests its availability-preserving
policy.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from loader.registry import ModelVersion

SwapPolicy = Literal["availability", "memory"]
SWAP_POLICIES: tuple[SwapPolicy, ...] = ("availability", "memory")


class SwapAction(StrEnum):
    """What the manager does with the version a ref resolves to now."""

    KEEP = "keep"  #: already served, nothing changed
    RELABEL = "relabel"  #: same files, new metadata (stage, aliases, tags, stale flag): no reload
    WAIT = "wait"  #: rejected before and its retry time has not come
    LOAD = "load"  #: fetch, check, load, warm up, then swap


def backoff_s(attempt: int, base_s: float, max_s: float) -> float:
    """``base_s * 2**(attempt - 1)``, capped at ``max_s``: the wait after the ``attempt``-th
    consecutive failure (attempt 1 waits ``base_s``). The one backoff formula of modeld."""
    if attempt < 1:
        return 0.0
    return min(max_s, base_s * 2.0 ** min(attempt - 1, 64))


def same_files(a: ModelVersion, b: ModelVersion) -> bool:
    """Whether two versions are the same files: a local directory by path and MLmodel time,
    a registry version by its cache key (registry, name, version, source)."""
    if a.local_path is not None or b.local_path is not None:
        return a.local_path == b.local_path and a.last_updated_ms == b.last_updated_ms
    return a.cache_key == b.cache_key


def swap_action(
    *,
    served: ModelVersion | None,
    served_stale: bool,
    aspired: ModelVersion,
    aspired_stale: bool,
    rejected: ModelVersion | None,
    retry_at: float | None,
    now: float,
    force: bool = False,
) -> SwapAction:
    """Decide what to do with ``aspired`` (what the ref resolves to now).

    ``served`` is the version answering (None: nothing loaded); ``rejected`` and ``retry_at``
    describe an earlier rejection of ``aspired``'s files, if any. ``force`` retries a rejected
    version at once (an operator's refresh). A changed rejected version (say, new tags or a new
    source behind the same number) is loaded again at once.
    """
    if served is not None and same_files(served, aspired):
        if served != aspired or served_stale != aspired_stale:
            return SwapAction.RELABEL
        return SwapAction.KEEP
    if (
        rejected is not None
        and not force
        and rejected == aspired
        and retry_at is not None
        and now < retry_at
    ):
        return SwapAction.WAIT
    return SwapAction.LOAD


def unload_first(swap: SwapPolicy, serving: bool) -> bool:
    """``swap = "memory"`` frees the old version before loading the new one (one model in
    memory at a time, at the cost of a gap); ``availability`` keeps it serving meanwhile."""
    return swap == "memory" and serving
