"""Policy helpers as tables: swap decisions, backoff, poll schedule, rejection backoff.
(As TF Serving tests its availability-preserving policy: every case a row.)"""

import threading
import time
from dataclasses import replace

import pytest

from loader import ModelVersion
from loader.policy import SwapAction, backoff_s, same_files, swap_action, unload_first
from loader.poller import Poller
from tests.helpers import threads_left_running

V3 = ModelVersion(registry="r", name="m", version=3, source="s3://b/m/3")
V3_TAGGED = replace(V3, tags=(("owner", "ops"),))
V3_MOVED = replace(V3, source="s3://b/m/3-again")  # re-registered: other files
V4 = replace(V3, version=4, source="s3://b/m/4")
LOCAL = ModelVersion(registry="local", name="d", version=1, source="/m", local_path="/m")


@pytest.mark.parametrize(
    ("served", "served_stale", "aspired", "aspired_stale", "rejected", "retry_at", "now",
     "force", "expected"),
    [
        # nothing served: load whatever the ref names
        (None, False, V3, False, None, None, 0, False, SwapAction.LOAD),
        # the same version, unchanged: keep
        (V3, False, V3, False, None, None, 0, False, SwapAction.KEEP),
        # same files, new metadata or stale flag: relabel, no reload
        (V3, False, V3_TAGGED, False, None, None, 0, False, SwapAction.RELABEL),
        (V3, False, V3, True, None, None, 0, False, SwapAction.RELABEL),
        (V3, True, V3, False, None, None, 0, False, SwapAction.RELABEL),
        # another version: load it
        (V3, False, V4, False, None, None, 0, False, SwapAction.LOAD),
        # the same number re-registered with other files: load it
        (V3, False, V3_MOVED, False, None, None, 0, False, SwapAction.LOAD),
        # rejected before: wait for the retry time, unless forced or changed since
        (V3, False, V4, False, V4, 100.0, 50, False, SwapAction.WAIT),
        (V3, False, V4, False, V4, 100.0, 100, False, SwapAction.LOAD),
        (V3, False, V4, False, V4, 100.0, 50, True, SwapAction.LOAD),
        (V3, False, replace(V4, description="fixed"), False, V4, 100.0, 50, False,
         SwapAction.LOAD),
        (None, False, V4, False, V4, 100.0, 50, False, SwapAction.WAIT),
        # a local model: same path and MLmodel time keep; a new time reloads
        (LOCAL, False, LOCAL, False, None, None, 0, False, SwapAction.KEEP),
        (LOCAL, False, replace(LOCAL, last_updated_ms=5), False, None, None, 0, False,
         SwapAction.LOAD),
    ],
)  # fmt: skip
def test_swap_action_table(
    served, served_stale, aspired, aspired_stale, rejected, retry_at, now, force, expected
):
    action = swap_action(
        served=served,
        served_stale=served_stale,
        aspired=aspired,
        aspired_stale=aspired_stale,
        rejected=rejected,
        retry_at=retry_at,
        now=now,
        force=force,
    )
    assert action is expected


@pytest.mark.parametrize(
    ("attempt", "base", "cap", "expected"),
    [(0, 30, 3600, 0), (1, 30, 3600, 30), (2, 30, 3600, 60), (3, 30, 3600, 120),
     (8, 30, 3600, 3600), (10_000, 30, 3600, 3600), (1, 2, 30, 2), (4, 2, 30, 16),
     (5, 2, 30, 30)],
)  # fmt: skip
def test_backoff_table(attempt, base, cap, expected):
    assert backoff_s(attempt, base, cap) == expected


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [(V3, V3, True), (V3, V3_TAGGED, True), (V3, V3_MOVED, False), (V3, V4, False),
     (LOCAL, LOCAL, True), (LOCAL, replace(LOCAL, last_updated_ms=1), False), (LOCAL, V3, False)],
)  # fmt: skip
def test_same_files_table(a, b, same):
    assert same_files(a, b) is same


@pytest.mark.parametrize(
    ("swap", "serving", "first"),
    [("availability", True, False), ("availability", False, False), ("memory", True, True),
     ("memory", False, False)],
)  # fmt: skip
def test_unload_first_table(swap, serving, first):
    assert unload_first(swap, serving) is first


@pytest.mark.slow
def test_poller_polls_backs_off_pokes_and_stops():
    """The one poll loop: failed polls count up into the schedule (backoff), a good one resets
    it, a poke polls at once whatever the wait, and stop joins the thread."""
    before = {t.ident for t in threading.enumerate()}
    outcomes = iter([True, False, False, False, True, True])
    asked: list[int] = []
    polled = threading.Event()
    wait_s = [0.01]

    class Schedule:
        def next_delay(self, failures: int = 0) -> float:
            asked.append(failures)
            return wait_s[0]

    def refresh():
        polled.set()
        return next(outcomes, True)

    poller = Poller(refresh, Schedule)
    poller.start()
    assert [t.name for t in threads_left_running(before)] == ["modeld-poll"]  # guard sees it
    deadline = time.monotonic() + 10
    while len(asked) < 7 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert asked[:7] == [0, 0, 1, 2, 3, 0, 0], asked
    wait_s[0] = 60.0  # a long wait: only a poke polls now
    time.sleep(0.05)
    polled.clear()
    poller.poke()
    assert polled.wait(5)
    poller.stop()
    assert threads_left_running(before) == []
