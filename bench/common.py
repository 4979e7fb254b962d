"""Shared benchmark plumbing: a real `mlflow server`, models logged through it, process RSS,
and a closed-loop HTTP load generator. Benchmarks are scripts, not tests."""

from __future__ import annotations

import asyncio
import importlib.metadata
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REQUIREMENTS = ("mlflow", "scikit-learn", "numpy", "pandas", "scipy", "skops")


def pins() -> list[str]:
    return [f"{n}=={importlib.metadata.version(n)}" for n in REQUIREMENTS]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout_s: float = 180.0, proc: subprocess.Popen | None = None) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited ({proc.returncode}) before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return time.monotonic() - started
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(url)


def modeld_serve(*args: str) -> list[str]:
    """The command line of ``modeld serve`` on 127.0.0.1 with ``args``, quiet (WARNING)."""
    return [
        sys.executable, "-m", "serving", "serve", "--host", "127.0.0.1", *args,
        "--log-level", "WARNING",
    ]  # fmt: skip


def start(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    fh = open(log, "ab")  # noqa: SIM115 - the child owns it for its lifetime
    # `mlflow models serve` execs `uvicorn` by name: the venv's bin must be on PATH.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return subprocess.Popen(
        cmd,
        stdout=fh,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PATH": path, **(env or {})},
        start_new_session=True,
    )


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants, in MB (pages shared between
    them counted in each: see :func:`tree_pss_mb`)."""
    return _tree_sum(pid, "status", "VmRSS:")


def tree_pss_mb(pid: int) -> float:
    """Proportional memory of a process and all its descendants, in MB: each shared page
    counted once across the processes sharing it, so the sum is what the tree costs."""
    return _tree_sum(pid, "smaps_rollup", "Pss:")


def _tree_sum(pid: int, file: str, field: str) -> float:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        children.setdefault(ppid, []).append(int(entry))
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        stack.extend(children.get(current, []))
        try:
            with open(f"/proc/{current}/{file}") as fh:
                for line in fh:
                    if line.startswith(field):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass
    return total / 1024


class MlflowServer:
    """`mlflow server --serve-artifacts`: clients really download artifacts over HTTP."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = root / "mlflow-server.log"

    def __enter__(self) -> MlflowServer:
        self.root.mkdir(parents=True, exist_ok=True)
        self.proc = start(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
                "--backend-store-uri",
                f"sqlite:///{self.root / 'mlflow.db'}",
                "--artifacts-destination",
                str(self.root / "artifacts"),
                "--serve-artifacts",
            ],
            self.log,
            env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )
        wait_http(f"{self.url}/health", proc=self.proc)
        return self

    def __exit__(self, *exc: object) -> None:
        stop(self.proc)


def log_models(tracking_uri: str) -> dict[str, str]:
    """Log iris (LogisticRegression) and a ~10 MB random forest through the server.

    Returns registered model name -> models:/ URI (version 1, in Production).
    """
    import mlflow
    import mlflow.sklearn
    from mlflow import MlflowClient
    from sklearn.datasets import load_iris, make_classification
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("bench")
    X, y = load_iris(return_X_y=True, as_frame=True)
    iris = LogisticRegression(max_iter=500).fit(X, y)
    Xf, yf = make_classification(
        n_samples=3000, n_features=4, n_informative=4, n_redundant=0, random_state=0
    )
    import pandas as pd

    Xf = pd.DataFrame(Xf, columns=X.columns)
    forest = RandomForestClassifier(n_estimators=200, random_state=0).fit(Xf, yf)
    client = MlflowClient(tracking_uri)
    out = {}
    for name, model, extra in (
        ("iris", iris, {}),
        ("forest", forest, {"skops_trusted_types": ["sklearn.tree._tree.Tree"]}),
    ):
        with mlflow.start_run():
            mlflow.sklearn.log_model(
                model,
                name="model",
                registered_model_name=name,
                input_example=X.head(2),
                pip_requirements=pins(),
                **extra,
            )
        client.transition_model_version_stage(name, "1", "Production")
        out[name] = f"models:/{name}/Production"
    return out


@dataclass
class LoadResult:
    requests: int
    errors: int
    seconds: float
    latencies_ms: list[float]

    @property
    def rps(self) -> float:
        """Successful requests per second (an error is not an answer)."""
        return (self.requests - self.errors) / self.seconds if self.seconds else 0.0

    def pct(self, q: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    @property
    def p50(self) -> float:
        return statistics.median(self.latencies_ms) if self.latencies_ms else float("nan")


async def _closed_loop(
    url: str, body: bytes, concurrency: int, count: int, warmup: int
) -> LoadResult:
    import aiohttp

    headers = {"Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        remaining = warmup

        async def one() -> tuple[bool, float]:
            t0 = time.perf_counter()
            try:
                async with session.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    ok = resp.status == 200
            except (TimeoutError, aiohttp.ClientError):
                ok = False
            return ok, (time.perf_counter() - t0) * 1000

        async def worker(n: int, sink: list[tuple[bool, float]]) -> None:
            for _ in range(n):
                sink.append(await one())

        warm: list[tuple[bool, float]] = []
        await asyncio.gather(
            *(worker(remaining // concurrency + 1, warm) for _ in range(concurrency))
        )
        results: list[tuple[bool, float]] = []
        per = max(1, count // concurrency)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(per, results) for _ in range(concurrency)))
        seconds = time.perf_counter() - t0
    ok = [lat for good, lat in results if good]
    return LoadResult(len(results), len(results) - len(ok), seconds, ok)


def closed_loop(
    url: str, body: bytes, *, concurrency: int, count: int, warmup: int = 50
) -> LoadResult:
    """Send ``count`` requests from ``concurrency`` clients, each waiting for its answer."""
    return asyncio.run(_closed_loop(url, body, concurrency, count, warmup))
