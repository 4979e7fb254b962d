"""Policy helpers as tables: swap decisions, backoff, poll schedule, rejection backoff.
(As TF Serving tests its availability-preserving policy: every case a row.)"""

import random
import threading
import time
from dataclasses import replace

import pytest

from loader import ConfigError, ModelVersion, PollSchedule
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
    """The one poll loop: on schedule, backing off while polls fail, at once when poked, and
    its thread joined on stop."""
    before = {t.ident for t in threading.enumerate()}
    calls: list[float] = []
    ok = threading.Event()
    ok.set()

    def refresh():
        calls.append(time.monotonic())
        return ok.is_set()

    poller = Poller(refresh, lambda: PollSchedule(0.05, jitter=0.0, max_backoff_s=0.8))
    poller.start()
    assert [t.name for t in threads_left_running(before)] == ["modeld-poll"]  # guard sees it
    time.sleep(0.3)
    assert 3 <= len(calls) <= 7, calls
    ok.clear()  # failing polls back off: 0.1, 0.2, 0.4, 0.8 s
    time.sleep(1.2)
    failing = len(calls)
    time.sleep(1.0)
    assert len(calls) - failing <= 2, calls
    ok.set()
    poller.poke()
    time.sleep(0.1)
    assert len(calls) > failing
    poller.stop()
    assert threads_left_running(before) == []


@pytest.mark.parametrize(
    ("interval", "failures", "cap", "expected"),
    [
        (10, 0, 300, 10),
        (10, 1, 300, 20),
        (10, 2, 300, 40),
        (10, 5, 300, 300),
        (10, 50, 300, 300),
        (500, 3, 300, 500),  # never below the interval
    ],
)
def test_poll_schedule_backoff(interval, failures, cap, expected):
    schedule = PollSchedule(interval, jitter=0.0, max_backoff_s=cap)
    assert schedule.next_delay(failures) == expected


def test_poll_schedule_jitter_stays_in_band():
    schedule = PollSchedule(10, jitter=0.1)
    rng = random.Random(1)
    delays = [schedule.next_delay(0, rng=rng) for _ in range(200)]
    assert min(delays) >= 9 and max(delays) <= 11 and len(set(delays)) > 100


@pytest.mark.parametrize(("interval", "jitter"), [(0, 0.1), (-1, 0.1), (10, 1.0), (10, -0.1)])
def test_poll_schedule_rejects_bad_values(interval, jitter):
    with pytest.raises(ConfigError):
        PollSchedule(interval, jitter=jitter)


def test_rejection_backoff_table(registry, cache_dir, tmp_path):
    import shutil

    from loader import ModelManager, make_source
    from tests.helpers import register

    broken = tmp_path / "broken"
    shutil.copytree(registry.models["const1"], broken)
    next(broken.glob("model.*")).unlink()
    register(registry.client(), "backoff", broken)
    now = [1000.0]
    source = make_source(cache_dir=cache_dir, tracking_uri=registry.uri, registry_uri=registry.uri)
    manager = ModelManager(source, retry_base_s=30, retry_max_s=100, clock=lambda: now[0])
    manager.add("b", "models:/backoff/latest")
    expected = [  # (seconds later, attempts after the refresh)
        (0, 1),
        (10, 1),
        (29, 1),
        (31, 2),
        (60, 2),
        (92, 3),
        (150, 3),
        (193, 4),
        (294, 5),
    ]
    start = now[0]
    for later, attempts in expected:
        now[0] = start + later
        manager.refresh()
        rejection = next(iter(manager.route("b").rejections.values()))
        assert rejection.attempts == attempts, (later, rejection)
    assert manager.route("b").handle is None
    manager.close()
