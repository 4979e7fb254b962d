"""Policy helpers as tables: poll schedule and rejection backoff."""

import random

import pytest

from loader import ConfigError, PollSchedule


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
