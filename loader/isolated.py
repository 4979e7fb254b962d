"""A model served by a worker process in its own environment, behind a pyfunc's face.

:class:`IsolatedModel` has what the daemon and a library user use of a ``PyFuncModel``:
``metadata`` (read from the model's MLmodel by the daemon's MLflow), ``predict``,
``predict_stream``, ``loader_module`` and the scikit-learn fast path (``_predict_fn``), so the
routes, batching, warm-up, streaming, metrics and hot-swap treat it like any loaded model.

The worker (:mod:`loader.envworker`, run by the environment's Python) answers on ``channels``
socket pairs, one call at a time each, so up to that many calls run at once. A worker that dies
fails the calls it held with :class:`~loader.errors.WorkerUnavailable` and is restarted with
backoff; calls arriving meanwhile wait (up to ``restart_wait_s``) for it. The worker stops when
the model is closed or its last reference goes (a swapped-out version's last request), and
exits when the daemon is gone.
"""

from __future__ import annotations

import builtins
import collections
import contextlib
import functools
import json
import logging
import os
import queue
import signal
import socket
import subprocess
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from loader.envs import EnvInfo
from loader.envworker import PROTOCOL, recv, send
from loader.errors import ModelLoadError, WorkerUnavailable
from loader.policy import backoff_s

log = logging.getLogger(__name__)

CHANNELS = 4
START_TIMEOUT_S = 600.0
RESTART_WAIT_S = 30.0
RESTART_BASE_S = 1.0
RESTART_MAX_S = 60.0
#: Run by the environment's Python as a script: it imports nothing of modeld.
_WORKER_SCRIPT = str(Path(__file__).resolve().with_name("envworker.py"))
_STDERR_TAIL = 40


class RemoteError(Exception):
    """An exception the model raised in its worker (its type's name is kept)."""


def _rebuild_error(error: dict[str, Any]) -> BaseException:
    """The worker's exception as the daemon's: MLflow's with its error code, a builtin as
    itself, anything else as a :class:`RemoteError` subclass of the same name."""
    message = str(error.get("message") or error.get("type") or "error")
    name = str(error.get("type") or "Exception")
    if str(error.get("module", "")).startswith("mlflow"):
        from mlflow.exceptions import MlflowException

        code = error.get("error_code") or "INTERNAL_ERROR"
        return MlflowException(message, error_code=code)  # type: ignore[arg-type]
    cls = getattr(builtins, name, None)
    exc: BaseException
    if isinstance(cls, type) and issubclass(cls, Exception) and cls is not KeyError:
        try:
            exc = cls(message)
        except Exception:
            exc = type(name, (RemoteError,), {})(message)
    else:
        exc = type(name, (RemoteError,), {})(message)
    exc.remote_traceback = error.get("traceback")  # type: ignore[attr-defined]
    return exc


class _Worker:
    """The process and its channels. Holds no reference to the :class:`IsolatedModel`, so the
    model's last reference going stops it (``weakref.finalize``)."""

    def __init__(
        self,
        *,
        label: str,
        env: EnvInfo,
        model_dir: str,
        model_config: dict[str, Any] | None,
        channels: int,
        start_timeout_s: float,
        restart_wait_s: float,
        lease: contextlib.AbstractContextManager[Any] | None,
    ) -> None:
        self.label = label
        self.env = env
        self.model_dir = model_dir
        self.model_config = model_config
        self.channels = channels
        self.start_timeout_s = start_timeout_s
        self.restart_wait_s = restart_wait_s
        self._leases = contextlib.ExitStack()
        if lease is not None:
            self._leases.enter_context(lease)
        self._cond = threading.Condition()
        self._free: queue.SimpleQueue[tuple[int, socket.socket]] = queue.SimpleQueue()
        self._generation = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._state = "starting"  # starting | ready | restarting | closed
        self._reason = ""
        self._failures = 0
        self._retry_at = 0.0
        self.tail: collections.deque[str] = collections.deque(maxlen=_STDERR_TAIL)
        self.hello: dict[str, Any] = {}
        self.restarts = 0

    # -- process ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the process and wait until it has loaded the model.

        Raises:
            ModelLoadError: the worker could not load the model (its error and log tail).
        """
        pairs = [socket.socketpair() for _ in range(self.channels)]
        ours = [a for a, _ in pairs]
        theirs = [b for _, b in pairs]
        argv = [
            self.env.executable,
            "-I",  # no PYTHON* variables, no user site: the environment's packages only
            _WORKER_SCRIPT,
            str(os.getpid()),
            self.model_dir,
            ",".join(str(s.fileno()) for s in theirs),
            json.dumps(self.model_config) if self.model_config else "",
        ]
        try:
            proc = subprocess.Popen(
                argv,
                pass_fds=[s.fileno() for s in theirs],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                cwd=self.model_dir,
            )
        except OSError as exc:
            for s in ours + theirs:
                s.close()
            raise ModelLoadError(f"{self.label}: could not start its worker: {exc}") from exc
        for s in theirs:
            s.close()
        assert proc.stderr is not None
        threading.Thread(
            target=_drain, args=(proc.stderr, self.tail, self.label, proc.pid),
            name=f"modeld-envlog-{proc.pid}", daemon=True,
        ).start()  # fmt: skip
        try:
            ours[0].settimeout(self.start_timeout_s)
            hello = recv(ours[0])
            ours[0].settimeout(None)
        except (EOFError, OSError) as exc:
            _kill(proc)
            for s in ours:
                s.close()
            why = "did not load in time" if isinstance(exc, TimeoutError) else "exited"
            raise ModelLoadError(
                f"{self.label}: its worker {why} before loading the model"
                f"{_exit_text(proc)}: {self._tail_text()}"
            ) from exc
        if not hello.get("ok") or hello.get("protocol") != PROTOCOL:
            _kill(proc)  # it exits on its own after a failed load; never wait on it unbounded
            for s in ours:
                s.close()
            if not hello.get("ok"):
                err = hello.get("error") or {}
                raise ModelLoadError(
                    f"mlflow.pyfunc.load_model failed in the environment {self.env.key}: "
                    f"{err.get('type')}: {_first_line(str(err.get('message')))}"
                )
            raise ModelLoadError(
                f"{self.label}: its worker speaks protocol {hello.get('protocol')}, this modeld "
                f"{PROTOCOL}: rebuild the environment (modeld env gc)"
            )
        with self._cond:
            if self._state == "closed":
                _kill(proc)
                for s in ours:
                    s.close()
                return
            self._generation += 1
            self._proc, self.hello = proc, hello
            self._free = queue.SimpleQueue()
            for s in ours:
                self._free.put((self._generation, s))
            self._state, self._failures = "ready", 0
            self._cond.notify_all()
        log.info("%s: worker pid %d ready in environment %s", self.label, proc.pid, self.env.key)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def close(self) -> None:
        with self._cond:
            if self._state == "closed":
                return
            self._state = "closed"
            proc, self._proc = self._proc, None
            self._cond.notify_all()
        while True:
            try:
                _, s = self._free.get_nowait()
            except queue.Empty:
                break
            s.close()
        if proc is not None:
            _stop(proc)
            log.debug("%s: worker pid %d stopped", self.label, proc.pid)
        self._leases.close()

    # -- calls --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def channel(self) -> Iterator[socket.socket]:
        """A free channel of a live worker, for one call. A value that cannot be sent
        (:class:`~loader.envworker.WireError`, raised before a byte is written) or an error the
        model answered leaves the channel in step and reusable.

        Raises:
            WorkerUnavailable: the worker died during the call, or is restarting.
        """
        generation, sock = self._take()
        try:
            yield sock
        except (EOFError, OSError) as exc:
            sock.close()
            self._died(generation)
            raise WorkerUnavailable(
                f"{self.label}: its worker died during the call{self._exit()}; it is being "
                "restarted"
            ) from exc
        except BaseException:
            self._give(generation, sock)
            raise
        self._give(generation, sock)

    def _take(self) -> tuple[int, socket.socket]:
        deadline = time.monotonic() + self.restart_wait_s
        while True:
            with self._cond:
                if self._state == "closed":
                    raise WorkerUnavailable(f"{self.label}: its worker was stopped")
                if self._state == "ready":
                    try:
                        item = self._free.get_nowait()
                    except queue.Empty:
                        item = None
                    if item is not None:
                        if item[0] == self._generation:
                            return item
                        item[1].close()
                        continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise WorkerUnavailable(
                        f"{self.label}: its worker is restarting ({self._reason or 'starting'})"
                    )
                self._cond.wait(min(remaining, 0.05))

    def _give(self, generation: int, sock: socket.socket) -> None:
        with self._cond:
            if generation == self._generation and self._state == "ready":
                self._free.put((generation, sock))
                self._cond.notify()
                return
        sock.close()

    def _exit(self) -> str:
        proc = self._proc
        if proc is None:
            return ""
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(0.2)
        return _exit_text(proc)

    def _died(self, generation: int) -> None:
        """A channel broke: restart the worker (once per generation) in the background."""
        with self._cond:
            if generation != self._generation or self._state != "ready":
                return
            self._state = "restarting"
            self._reason = f"the worker died{self._exit()}"
            proc = self._proc
        log.warning("%s: %s; restarting it", self.label, self._reason)
        if proc is not None:
            _kill(proc)
        threading.Thread(
            target=self._restart, name=f"modeld-envrestart-{self.label}", daemon=True
        ).start()

    def _restart(self) -> None:
        while True:
            with self._cond:
                if self._state == "closed":
                    return
            try:
                self.start()
                self.restarts += 1
                return
            except ModelLoadError as exc:
                with self._cond:
                    self._failures += 1
                    delay = backoff_s(self._failures, RESTART_BASE_S, RESTART_MAX_S)
                    self._reason = f"restart failed ({exc}); next attempt in {delay:.0f}s"
                log.warning("%s: %s", self.label, self._reason)
                time.sleep(delay)

    def _tail_text(self) -> str:
        lines = [line for line in self.tail if line.strip()]
        return " | ".join(lines[-6:]) or "no output"

    def stats(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "state": self._state,
            "restarts": self.restarts,
            "problem": self._reason if self._state != "ready" else None,
        }


class IsolatedModel:
    """A pyfunc model whose calls run in a worker process of its environment."""

    #: Where it came from (``loader.pipeline.ModelInfo``), attached once loaded.
    modeld: Any
    #: Takes a :class:`~loader.envworker.Block` wherever it takes a DataFrame.
    takes_blocks = True

    def __init__(
        self,
        model_dir: str | Path,
        env: EnvInfo,
        *,
        label: str,
        model_config: dict[str, Any] | None = None,
        channels: int = CHANNELS,
        start_timeout_s: float = START_TIMEOUT_S,
        restart_wait_s: float = RESTART_WAIT_S,
        lease: contextlib.AbstractContextManager[Any] | None = None,
    ) -> None:
        from mlflow.models import Model

        self.environment = env
        self.metadata = Model.load(str(Path(model_dir) / "MLmodel"))
        pyfunc = self.metadata.flavors.get("python_function") or {}
        self.loader_module = pyfunc.get("loader_module")
        self._worker = _Worker(
            label=label,
            env=env,
            model_dir=str(model_dir),
            model_config=model_config,
            channels=channels,
            start_timeout_s=start_timeout_s,
            restart_wait_s=restart_wait_s,
            lease=lease,
        )
        self._finalizer = weakref.finalize(self, self._worker.close)
        try:
            self._worker.start()
        except BaseException:
            self._finalizer()
            raise

    # Nothing kept on the model, or handed out by it, refers back to it: its last reference
    # going is what stops a swapped-out version's worker (weakref.finalize).

    @property
    def _predict_stream_fn(self) -> Callable[..., Any] | None:
        """Non-None when the model streams (``serving.runtime.streaming`` asks)."""
        return self.predict_stream if self._worker.hello.get("streams") else None

    @property
    def _predict_fn(self) -> Callable[[Any], Any] | None:
        """The fast path (``serving.runtime.predict`` keeps it per model): the worker calls the
        flavor's own predict function on a frame that already conforms to the signature."""
        if self.loader_module != "mlflow.sklearn":
            return None
        return functools.partial(_call, self._worker, "direct")

    def predict(self, data: Any, params: dict[str, Any] | None = None) -> Any:
        return _call(self._worker, "predict", data, params)

    def predict_stream(self, data: Any, params: dict[str, Any] | None = None) -> Iterator[Any]:
        worker = self._worker

        def chunks() -> Iterator[Any]:
            with worker.channel() as sock:
                send(sock, {"op": "stream", "data": data, "params": params})
                try:
                    while True:
                        send(sock, {"op": "next"})
                        answer = recv(sock)
                        if not answer.get("ok"):
                            raise _rebuild_error(answer.get("error") or {})
                        if answer.get("end"):
                            return
                        yield answer.get("chunk")
                except GeneratorExit:
                    send(sock, {"op": "close"})
                    raise

        return chunks()

    @property
    def worker(self) -> dict[str, Any]:
        """The worker's pid, state and restarts (for status)."""
        return self._worker.stats()

    def close(self) -> None:
        """Stop the worker now (calls in flight fail); also done when the model is freed."""
        self._finalizer()

    def unwrap_python_model(self) -> Any:
        raise AttributeError("an isolated model's Python object lives in its worker process")

    def __repr__(self) -> str:
        return f"IsolatedModel({self._worker.label}, env={self.environment.key})"


def _call(worker: _Worker, op: str, data: Any, params: dict[str, Any] | None = None) -> Any:
    with worker.channel() as sock:
        send(sock, {"op": op, "data": data, "params": params})
        answer = recv(sock)
    if not answer.get("ok"):
        raise _rebuild_error(answer.get("error") or {})
    return answer.get("value")


def _drain(stream: Any, tail: collections.deque[str], label: str, pid: int) -> None:
    """The worker's stderr into the daemon's log (and a tail for error messages)."""
    worker_log = logging.getLogger("loader.envworker")
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", "replace").rstrip()
        if line:
            tail.append(line)
            worker_log.info("[%s pid %d] %s", label, pid, line)
    stream.close()


def _exit_text(proc: subprocess.Popen[bytes]) -> str:
    code = proc.poll()
    if code is None:
        return ""
    if code < 0:
        with contextlib.suppress(ValueError):
            return f" (killed by {signal.Signals(-code).name})"
    return f" (exit {code})"


def _kill(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 5 s (the worker holds nothing worth a longer wait)."""
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        _kill(proc)


def _first_line(text: str, limit: int = 300) -> str:
    lines = text.strip().splitlines()
    line = lines[0] if lines else ""
    return line if len(line) <= limit else line[:limit] + "..."


__all__ = ["IsolatedModel", "RemoteError"]
