"""``--workers N``: N serving processes forked from one parent that holds their models.

The parent binds the port once and forks the workers; each inherits the listening socket (the
kernel hands every connection to whichever worker accepts it) and, once the parent has loaded
them, the models, whose pages stay shared copy-on-write: N workers cost little more model
memory than one (``gc.freeze()`` keeps the collector from writing to the shared objects).

Each worker follows the registry and swaps on its own, as one server does, and publishes what
it serves (:mod:`serving.runtime.peers`). A *generation* is the set of workers forked from one
parent state. It starts with one worker, which resolves, downloads and loads every model; the
parent then loads the same cached versions itself and *rolls*: it forks a full generation of
N workers, which adopt the parent's models instead of loading them, and once every new worker
has started, stops the old ones (each drains its in-flight requests; the socket stays open in
the others, so no connection is refused or reset). When every worker of the generation has
swapped to the same new set of versions, the parent rolls again: it loads the new set from the
cache the workers filled and drops the old, whose memory returns to the system as the old
generation exits. A version the parent cannot load (or an isolated one) is simply loaded by
each worker, as before. A worker that dies is forked again from the parent (with backoff when
it keeps dying). SIGTERM or SIGINT drains every worker and exits 0; SIGHUP is passed on, and
so is SIGUSR1, by which a worker says it recorded a runtime edit for the others
(:mod:`serving.runtime.edits`).
Metrics are merged across workers through prometheus-client's multiprocess mode.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import logging
import os
import random
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

import loader.inherit as inherit
from loader.policy import backoff_s
from serving.runtime import edits, peers
from serving.runtime.peers import MODULES_FILE_PREFIX, STATE_FILE_PREFIX

log = logging.getLogger("modeld.workers")
WORKER_ENV = "MODELD_WORKER"
#: The inherited listening socket's descriptor, in a worker.
LISTEN_FD_ENV = "MODELD_LISTEN_FD"
TICK_S = 0.2
RESTART_WINDOW_S = 60.0
RESTARTS_BEFORE_BACKOFF = 5
RESTART_BACKOFF_BASE_S = 2.0
RESTART_BACKOFF_MAX_S = 30.0


def is_worker() -> bool:
    return bool(os.environ.get(WORKER_ENV))


def inherited_socket() -> socket.socket | None:
    """In a worker: the listening socket its supervisor bound, else None."""
    fd = os.environ.get(LISTEN_FD_ENV)
    return socket.socket(fileno=int(fd)) if fd and fd.isdigit() else None


@dataclass
class _Worker:
    index: int
    generation: int


@dataclass
class _Parent:
    """The supervisor's state: its workers by pid and the generations they belong to."""

    sock: socket.socket
    size: int
    run: Callable[[], int]
    directory: str
    load_timeout_s: float
    share: Callable[[], object] | None = None
    workers: dict[int, _Worker] = field(default_factory=dict)
    generation: int = 0
    #: The versions the current generation was forked with (None: the first worker's own).
    basis: frozenset[inherit.Key] | None = None
    retiring: set[int] = field(default_factory=set)
    restarts: list[float] = field(default_factory=list)
    stopping: bool = False
    #: The workers sent SIGTERM since the supervisor began to stop.
    stopped: set[int] = field(default_factory=set)
    #: SIGHUPs received and not yet passed on.
    hangups: int = 0

    def fork(self, index: int) -> None:
        if self.stopping:  # SIGTERM came in the middle of a roll: no new generation
            return
        pid = os.fork()
        if pid == 0:  # the worker: never returns
            _run_worker(self.run, index, self.sock)
        self.workers[pid] = _Worker(index, self.generation)
        log.info("worker %d started (pid %d, generation %d)", index + 1, pid, self.generation)

    def current(self) -> list[int]:
        return [pid for pid, w in self.workers.items() if w.generation == self.generation]

    def signal_all(self, signum: int) -> None:
        for pid in self.workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def stop_all(self) -> None:
        """SIGTERM every worker not yet sent one: called again while stopping, it reaches a
        worker forked after the signal came (in the middle of a roll)."""
        for pid in set(self.workers) - self.stopped:
            self.stopped.add(pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def reap(self) -> None:
        """Collect exited workers; fork a current one again (old generations just go)."""
        while self.workers:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self.workers.pop(pid, None)
            _mark_dead(pid, self.directory)
            if worker is None:
                continue
            if pid in self.retiring:
                self.retiring.discard(pid)
                log.info(
                    "worker %d (pid %d) of the previous generation stopped", worker.index + 1, pid
                )
                continue
            if self.stopping:
                continue
            code = os.waitstatus_to_exitcode(status)
            log.error("worker %d (pid %d) exited with %s: restarting", worker.index + 1, pid, code)
            self._backoff()
            if not self.stopping and worker.generation == self.generation:
                self.fork(worker.index)

    def _backoff(self) -> None:
        now = time.monotonic()
        self.restarts[:] = [t for t in self.restarts if now - t < RESTART_WINDOW_S] + [now]
        if len(self.restarts) <= RESTARTS_BEFORE_BACKOFF:
            return
        wait = backoff_s(
            len(self.restarts) - RESTARTS_BEFORE_BACKOFF,
            RESTART_BACKOFF_BASE_S,
            RESTART_BACKOFF_MAX_S,
        )
        until = time.monotonic() + wait
        while not self.stopping and time.monotonic() < until:  # SIGTERM ends the wait
            time.sleep(TICK_S)

    def step(self) -> None:
        """Retire the previous generation once the current one has started; roll when the
        current one agrees on versions the parent does not hold."""
        current = self.current()
        states = [_state(self.directory, pid) for pid in current]
        started = [s for s in states if s is not None and s.get("started")]
        if len(started) < (1 if self.basis is None else self.size):
            return  # the current generation is still starting
        old = [
            pid
            for pid, w in self.workers.items()
            if w.generation < self.generation and pid not in self.retiring
        ]
        if old:
            log.info(
                "generation %d started: the previous one's %d workers drain and stop",
                self.generation,
                len(old),
            )
            self.retiring.update(old)
            for pid in old:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            return
        if self.retiring or len(started) < len(current):
            return  # one generation at a time; a restarted worker is still starting
        configs = {inherit.key(p, c): c for s in started for p, c in s.get("loads", [])}
        sets = {frozenset(inherit.key(p, c) for p, c in s.get("loads", [])) for s in started}
        if len(sets) != 1:
            return  # mid-swap: wait until every worker serves the same versions
        (wanted,) = sets
        if wanted != self.basis:
            self.roll(wanted, configs)

    def roll(self, wanted: frozenset[inherit.Key], configs: dict[inherit.Key, Any]) -> None:
        """Hold exactly ``wanted`` and fork a new generation from it."""
        gc.unfreeze()
        _import_like(self.directory, self.current())
        for load in inherit.offered() - wanted:
            inherit.withdraw(load)
        if self.share is not None:  # now, not before the first worker: it may be unreachable
            _share(self.share, self.load_timeout_s)
        gc.collect()
        for load in sorted(wanted - inherit.offered()):
            _load(load, configs.get(load), self.load_timeout_s)
        gc.collect()
        gc.freeze()  # the workers share these objects: the collector must not write to them
        if threading.active_count() > 1:
            names = ", ".join(t.name for t in threading.enumerate()[1:])
            log.warning("forking workers with other threads running (%s)", names)
        self.basis = wanted
        self.generation += 1
        log.info(
            "generation %d: %d workers sharing %d loaded models",
            self.generation,
            self.size,
            len(inherit.offered()),
        )
        for index in range(self.size):
            self.fork(index)


def supervise(
    sock: socket.socket,
    workers: int,
    run: Callable[[], int],
    *,
    drain_timeout_s: float,
    load_timeout_s: float,
    prepare: Callable[[], object] | None = None,
    share: Callable[[], object] | None = None,
) -> int:
    """Serve on ``sock`` with ``workers`` forked processes, each running ``run`` (the one-server
    path, which adopts the parent's models), until a signal. ``prepare`` runs once before the
    first fork (imports whose pages the workers then share); ``share`` before each fork of a
    generation, once the first worker has started (it builds what every worker would build
    alike: the registry client's database store)."""
    directory = tempfile.mkdtemp(prefix="modeld-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory  # before prometheus-client is imported
    if prepare is not None:
        prepare()
    parent = _Parent(sock, workers, run, directory, load_timeout_s, share)

    def stop(signum: int, _frame: object) -> None:
        if not parent.stopping:
            log.info(
                "received %s: draining %d workers",
                signal.Signals(signum).name,
                len(parent.workers),
            )
        parent.stopping = True
        parent.stop_all()

    def hangup(signum: int, _frame: object) -> None:  # passed on by the loop below
        parent.hangups += 1

    def relay(signum: int, _frame: object) -> None:  # a worker recorded a runtime edit
        parent.signal_all(edits.RELAY_SIGNAL)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, hangup)
    signal.signal(edits.RELAY_SIGNAL, relay)
    _import_ahead()
    gc.freeze()
    parent.generation = 1
    parent.fork(0)  # the first worker loads (one copy); then the parent does, and rolls
    deadline = None
    try:
        while True:
            time.sleep(TICK_S)
            parent.reap()
            if parent.stopping:
                parent.stop_all()
                deadline = deadline or time.monotonic() + drain_timeout_s + 10
                if not parent.workers:
                    break
                if time.monotonic() > deadline:
                    log.warning("workers did not stop in time: killing them")
                    parent.signal_all(signal.SIGKILL)
                    break
                continue
            if parent.hangups:
                parent.hangups = 0
                _pass_hangup(parent)
            parent.step()
    finally:
        for pid in list(parent.workers):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        shutil.rmtree(directory, ignore_errors=True)
    log.info("all workers stopped")
    return 0


def _pass_hangup(parent: _Parent) -> None:
    """SIGHUP: every worker reloads the config; the reload also ends the runtime edits that
    last until one, for workers forked later too (a mark in the edit ledger)."""
    log.info("SIGHUP: every worker reloads the config")
    try:
        edits.record(parent.directory, edits.RELOAD, "")
    except OSError as exc:
        log.error("could not mark the reload for workers forked later: %s", exc)
    parent.signal_all(signal.SIGHUP)


def _run_worker(run: Callable[[], int], index: int, sock: socket.socket) -> None:
    """The forked worker's whole life: serve until stopped, then exit with its code."""
    code = 1
    try:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, signal.SIG_DFL)
        # Until its loop handles it (after its start, which applies the ledger), a relayed
        # edit must not kill a starting worker (SIGUSR1's default).
        signal.signal(edits.RELAY_SIGNAL, signal.SIG_IGN)
        _die_with_parent()
        random.seed()  # forked workers would otherwise jitter their polls in step
        os.environ[WORKER_ENV] = str(index + 1)
        os.environ[LISTEN_FD_ENV] = str(sock.fileno())
        peers.forked()
        code = run()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _import_ahead() -> None:
    """Import MLflow's model loading in the parent, so every worker shares those pages too."""
    from loader.pyfunc import import_ahead_of_mlflow

    import_ahead_of_mlflow()
    with contextlib.suppress(ImportError):
        import mlflow.pyfunc  # noqa: F401
        import watchdog.observers  # noqa: F401  (every worker's follower)
    try:  # MLflow's registry stores and plugins, found by an entry-point scan
        from mlflow.tracking._model_registry.utils import _get_store_registry

        _get_store_registry()
    except Exception as exc:  # a broken plugin: each worker meets it on its own
        log.debug("MLflow's registry stores not listed ahead of the workers: %s", exc)


def _import_like(directory: str, pids: list[int]) -> None:
    """Import what a started worker had imported (its registry client, MLflow's scoring
    code, the flavor's helpers...): the next generation then shares those pages as well. A
    module that does not import here is left to the workers."""
    for pid in pids:
        try:
            with open(os.path.join(directory, f"{MODULES_FILE_PREFIX}{pid}.json"), "rb") as fh:
                names = orjson.loads(fh.read())
        except (OSError, ValueError):
            continue
        missing = [n for n in names if isinstance(n, str) and n not in sys.modules]
        for name in sorted(missing, key=lambda n: n.count(".")):  # packages first
            if name in sys.modules or name == "__main__":
                continue
            try:
                importlib.import_module(name)
            except Exception as exc:  # any module's import may fail out of its context
                log.debug("not imported ahead of the workers: %s (%s)", name, exc)
        return


def _share(share: Callable[[], object], timeout_s: float) -> None:
    """Build what the workers would each build alike (the registry's database store), once,
    bounded: the parent must go back to supervising."""
    try:
        with _alarm(timeout_s, "sharing the registry client"):
            share()
    except Exception as exc:  # each worker builds its own, as before
        log.warning("could not build the registry client to share it: %s", exc)


def _load(load: inherit.Key, model_config: Any, timeout_s: float) -> None:
    """Load one version the workers serve, bounded by ``timeout_s`` (the parent must go back
    to supervising: a load stuck in a model's own Python code is interrupted)."""
    from loader.pyfunc import PyFuncLoader

    path = load[0]
    started = time.perf_counter()
    try:
        with _alarm(timeout_s, "the load"):
            model = PyFuncLoader(path).load(model_config=model_config or None)
    except Exception as exc:  # each worker loads it on its own, as before
        log.warning("could not load %s to share it: %s (each worker loads its own)", path, exc)
        return
    inherit.offer(load, model)
    log.info("loaded %s in %.3fs to share with the workers", path, time.perf_counter() - started)


@contextlib.contextmanager
def _alarm(timeout_s: float, what: str) -> Iterator[None]:
    """Interrupt the block with TimeoutError after ``timeout_s`` (in Python code: a blocking
    C call ends first)."""

    def expire(_signum: int, _frame: object) -> None:
        raise TimeoutError(f"{what} took longer than {timeout_s:g}s (server.load_timeout_s)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _state(directory: str, pid: int) -> dict[str, Any] | None:
    try:
        with open(os.path.join(directory, f"{STATE_FILE_PREFIX}{pid}.json"), "rb") as fh:
            state = orjson.loads(fh.read())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def _die_with_parent() -> None:
    """In a worker: SIGTERM when the supervisor dies (even by SIGKILL), so no worker serves
    on unsupervised (Linux's PR_SET_PDEATHSIG; elsewhere nothing)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _mark_dead(pid: int, directory: str) -> None:
    """Drop a dead worker's live gauges and published state."""
    try:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, directory)
        for prefix in (STATE_FILE_PREFIX, MODULES_FILE_PREFIX):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(directory, f"{prefix}{pid}.json"))
    except Exception as exc:  # metrics bookkeeping must not stop the restart
        log.warning("could not drop dead worker %d's live metrics: %s", pid, exc)
