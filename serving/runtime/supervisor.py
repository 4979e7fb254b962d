"""``--workers N``: N serving processes on one port (SO_REUSEPORT), sharing one disk cache.

The supervisor starts each worker as ``modeld serve`` again (same arguments) with
``MODELD_WORKER`` set; every worker follows the registry and swaps on its own, and the cache's
per-version locks make N workers on an empty cache download each version once. A worker that
dies is restarted (with backoff when it keeps dying). SIGTERM or SIGINT is passed to every
worker, each drains its in-flight requests, and the supervisor exits 0 once all have stopped.
Metrics are merged across workers through prometheus-client's multiprocess mode.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

from loader.policy import backoff_s

log = logging.getLogger("modeld.workers")
WORKER_ENV = "MODELD_WORKER"
RESTART_WINDOW_S = 60.0
RESTARTS_BEFORE_BACKOFF = 5
RESTART_BACKOFF_BASE_S = 2.0
RESTART_BACKOFF_MAX_S = 30.0


def is_worker() -> bool:
    return bool(os.environ.get(WORKER_ENV))


def supervise(argv: Sequence[str], workers: int, *, drain_timeout_s: float) -> int:
    """Run ``workers`` copies of ``modeld <argv>`` and keep them running until a signal."""
    metrics_dir = tempfile.mkdtemp(prefix="modeld-metrics-")
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": metrics_dir}
    procs: dict[int, subprocess.Popen[bytes]] = {}
    restarts: list[float] = []
    stopping = False

    def spawn(index: int) -> None:
        procs[index] = subprocess.Popen(
            [sys.executable, "-m", "serving", *argv],
            env={**env, WORKER_ENV: str(index + 1)},
            preexec_fn=_die_with_parent,
        )
        log.info("worker %d started (pid %d)", index + 1, procs[index].pid)

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        if not stopping:
            log.info("received %s: draining %d workers", signal.Signals(signum).name, len(procs))
        stopping = True
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    def hangup(signum: int, _frame: object) -> None:
        log.info("SIGHUP: every worker reloads the config")
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGHUP)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, hangup)
    for index in range(workers):
        spawn(index)
    deadline = None
    try:
        while True:
            time.sleep(0.2)
            if stopping:
                deadline = deadline or time.monotonic() + drain_timeout_s + 10
                if all(p.poll() is not None for p in procs.values()):
                    break
                if time.monotonic() > deadline:
                    log.warning("workers did not stop in time: killing them")
                    for p in procs.values():
                        p.kill()
                    break
                continue
            for index, proc in list(procs.items()):
                code = proc.poll()
                if code is None:
                    continue
                _mark_dead(proc.pid, metrics_dir)
                now = time.monotonic()
                restarts[:] = [t for t in restarts if now - t < RESTART_WINDOW_S] + [now]
                log.error(
                    "worker %d (pid %d) exited with %s: restarting", index + 1, proc.pid, code
                )
                if len(restarts) > RESTARTS_BEFORE_BACKOFF:
                    backoff = backoff_s(
                        len(restarts) - RESTARTS_BEFORE_BACKOFF,
                        RESTART_BACKOFF_BASE_S,
                        RESTART_BACKOFF_MAX_S,
                    )
                    until = time.monotonic() + backoff
                    while not stopping and time.monotonic() < until:  # SIGTERM ends the wait
                        time.sleep(0.2)
                if not stopping:
                    spawn(index)
    finally:
        for proc in procs.values():
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(metrics_dir, ignore_errors=True)
    log.info("all workers stopped")
    return 0


def _die_with_parent() -> None:
    """In a worker, before it runs: SIGTERM when the supervisor dies (even by SIGKILL), so no
    worker serves on unsupervised (Linux's PR_SET_PDEATHSIG; elsewhere nothing)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _mark_dead(pid: int, directory: str) -> None:
    """Drop a dead worker's live gauges and published state (the supervisor's own environment
    has no PROMETHEUS_MULTIPROC_DIR: only its workers' has)."""
    try:
        from prometheus_client import multiprocess

        from serving.runtime.peers import STATE_FILE_PREFIX

        multiprocess.mark_process_dead(pid, directory)
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(directory, f"{STATE_FILE_PREFIX}{pid}.json"))
    except Exception as exc:  # metrics bookkeeping must not stop the restart
        log.warning("could not drop dead worker %d's live metrics: %s", pid, exc)
