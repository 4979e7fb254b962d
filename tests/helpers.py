"""Build real MLflow models and registries for the tests (no MLflow mocks)."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pandas as pd

IRIS_COLUMNS = ["sepal length (cm)", "sepal width (cm)", "petal length (cm)", "petal width (cm)"]


def pins(*names: str) -> list[str]:
    """Requirements pinned to what is installed (saves MLflow's slow inference subprocess);
    a package this MLflow does not bring (skops before MLflow 3.6) is left out."""
    out = []
    for name in names:
        try:
            out.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


BASE_REQUIREMENTS = ("mlflow", "scikit-learn", "numpy", "pandas", "scipy", "skops")


def iris_frame(rows: int = 2) -> pd.DataFrame:
    from sklearn.datasets import load_iris

    X, _ = load_iris(return_X_y=True, as_frame=True)
    return X.head(rows).reset_index(drop=True)


def save_iris_model(path: Path, *, constant: int | None = None, requirements=None) -> Path:
    """A real iris classifier; with ``constant`` a DummyClassifier answering that class.

    Every version of a test model answers differently, so a prediction names its version.
    """
    import mlflow.sklearn
    from sklearn.datasets import load_iris
    from sklearn.dummy import DummyClassifier
    from sklearn.linear_model import LogisticRegression

    X, y = load_iris(return_X_y=True, as_frame=True)
    if constant is None:
        model = LogisticRegression(max_iter=500).fit(X, y)
    else:
        model = DummyClassifier(strategy="constant", constant=constant).fit(X, y + constant)
    mlflow.sklearn.save_model(
        model,
        str(path),
        input_example=X.head(2),
        pip_requirements=list(requirements or pins(*BASE_REQUIREMENTS)),
    )
    return path


def register(client: Any, name: str, source: Path, *, stage: str | None = None) -> int:
    from mlflow.exceptions import MlflowException

    with contextlib.suppress(MlflowException):
        client.create_registered_model(name)
    mv = client.create_model_version(name, source=str(source))
    if stage:
        client.transition_model_version_stage(name, mv.version, stage)
    return int(mv.version)


def set_status(db: Path, name: str, version: int, status: str) -> None:
    """Mark a version non-READY (the sqlite store creates every version READY)."""
    with sqlite3.connect(db) as conn:
        conn.execute(
            "UPDATE model_versions SET status = ? WHERE name = ? AND version = ?",
            (status, name, version),
        )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout_s: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer in {timeout_s}s")


class MlflowServer:
    """A real ``mlflow server`` subprocess on 127.0.0.1 over a given sqlite registry."""

    def __init__(self, db: Path, artifacts: Path, log_path: Path, port: int | None = None) -> None:
        self.db, self.artifacts, self.log_path = db, artifacts, log_path
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.log = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop())
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--backend-store-uri",
                f"sqlite:///{self.db}",
                "--default-artifact-root",
                str(self.artifacts),
                "--artifacts-destination",  # mlflow-artifacts:/ URIs land here
                str(self.artifacts / "served"),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
                *self._access_log(),
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        wait_http(f"{self.url}/health", timeout_s=120, proc=self.proc)

    @staticmethod
    def _access_log() -> list[str]:
        """MLflow 2 serves with gunicorn, which logs no requests unless asked."""
        import mlflow

        return ["--gunicorn-opts", "--access-logfile -"] if mlflow.__version__ < "3" else []

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()
        self.proc = None
        if getattr(self, "log", None):
            self.log.close()

    def api_requests(self) -> list[str]:
        """Registry API request lines the server logged so far (uvicorn's access log)."""
        text = self.log_path.read_text(errors="replace")
        return [line for line in text.splitlines() if "/api/2.0/mlflow/" in line]


def save_slow_model(path: Path, answer: int = 7) -> Path:
    """A pyfunc model that sleeps as many seconds as its first input value, then answers
    ``answer`` per row: for timeouts and drains. Defined in a function so cloudpickle stores the
    class by value and any process can load it."""
    import mlflow.pyfunc

    class Slow(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            import time

            import numpy as np

            time.sleep(float(np.asarray(model_input).ravel()[0]))
            return [answer] * len(model_input)

    mlflow.pyfunc.save_model(str(path), python_model=Slow(), pip_requirements=[])
    return path


def save_streamer(path):
    """Streams the words of the last message; a word 'boom' raises; 'slow' sleeps 3 s; when
    closed early it leaves a marker file (the path in $MODELD_STREAM_MARKER)."""
    import mlflow.pyfunc

    class Words(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return {"text": "whole answer"}

        def predict_stream(self, context, model_input, params=None):
            import os
            import time

            words = str(model_input["messages"][-1]["content"]).split()
            done = False
            try:
                for i, word in enumerate(words):
                    if word == "boom":
                        raise RuntimeError("the model broke mid-stream")
                    if word == "slow":
                        time.sleep(3)
                    yield {"index": i, "delta": word}
                done = True
            finally:
                marker = os.environ.get("MODELD_STREAM_MARKER")
                if not done and marker:
                    open(marker, "w").close()

    mlflow.pyfunc.save_model(str(path), python_model=Words(), pip_requirements=[])
    return path


def self_signed(root: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key (openssl), in ``root``."""
    cert, key = root / "cert.pem", root / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def serve_modeld(registry: Any, cache_dir: Path, *models_and_flags: str, **popen: Any):
    """`modeld serve` as a subprocess on a free port over the test registry.

    Returns (process, base URL); stderr is piped (text) unless ``popen`` says otherwise.
    """
    port = free_port()
    options = {"stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE, "text": True, **popen}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "serving",
            "serve",
            *models_and_flags,
            "--port",
            str(port),
            "--cache-dir",
            str(cache_dir),
        ],
        cwd=Path(__file__).resolve().parent.parent,
        env={**os.environ, "MLFLOW_TRACKING_URI": registry.uri},
        **options,
    )
    return proc, f"http://127.0.0.1:{port}"


def split_body(rows: int = 1) -> bytes:
    """A `dataframe_split` request body of the first iris rows."""
    import json

    frame = iris_frame(rows)
    return json.dumps(
        {"dataframe_split": json.loads(frame.to_json(orient="split", index=False))}
    ).encode()


# -- the daemon in-process (aiohttp test server) ---------------------------------------------

#: A registry poll interval short enough for following tests.
POLL_S = 0.2


def through(server: MlflowServer, poll_interval_s: float | None = POLL_S) -> dict[str, Any]:
    """``make_config`` overrides that reach the registry through a real ``mlflow server``."""
    overrides: dict[str, Any] = {
        "registry__tracking_uri": server.url,
        "registry__registry_uri": server.url,
    }
    if poll_interval_s is not None:
        overrides["registry__poll_interval_s"] = poll_interval_s
    return overrides


def make_config(registry: Any, cache_dir: Path, *models: str, **overrides: Any) -> Any:
    """A daemon config over the test registry; ``section__key=value`` overrides."""
    from serving.config import load_config

    return load_config(
        env={},
        overrides={
            "registry.tracking_uri": registry.uri,
            "registry.registry_uri": registry.uri,
            "cache.dir": str(cache_dir),
            **{k.replace("__", "."): v for k, v in overrides.items()},
        },
        extra_models=list(models),
    )


async def start(aiohttp_client: Any, config: Any) -> Any:
    """The app on a test server, once /health says every model is loaded (bounded)."""
    from serving.app import create_app

    client = await aiohttp_client(create_app(config))
    for _ in range(600):
        resp = await client.get("/health")
        if resp.status == 200:
            return client
        await asyncio.sleep(0.05)
    raise AssertionError(f"never healthy: {await resp.text()}")


def split_payload(frame: pd.DataFrame) -> dict[str, Any]:
    """A `dataframe_split` request document of ``frame``."""
    return {"dataframe_split": json.loads(frame.to_json(orient="split", index=False))}


async def until(predicate: Any, timeout_s: float = 15.0, interval_s: float = 0.05) -> Any:
    """Wait (bounded) for an async predicate to hold; returns its last value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await predicate()
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(interval_s)


async def served(client: Any, route: str) -> Any:
    """The version route ``route`` serves now, per GET /models/{route}."""
    resp = await client.get(f"/models/{route}")
    return (await resp.json())["version"]


def threads_left_running(before: set[int | None]) -> list[threading.Thread]:
    """Threads started since ``before`` (their idents) and still alive that a test must not
    leave: every thread modeld starts (all are named ``modeld-*``, daemon threads included) and
    any other non-daemon thread. A load that hangs in a model's own code cannot be killed:
    modeld renames its thread ``modeld-abandoned-*`` when it gives up on it (a documented gap),
    and only those are let go. MLflow's process-wide artifact download pools are reused."""
    return [
        t
        for t in threading.enumerate()
        if t.ident not in before
        and t.is_alive()
        and (t.name.startswith("modeld") or not t.daemon)
        and not t.name.startswith("modeld-abandoned-")
        and not t.name.startswith(("asyncio_", "ThreadPoolExecutor", "Mlflow"))
    ]


def modeld(*args: str, env: dict[str, str] | None = None, **popen: Any) -> subprocess.Popen:
    """``python -m serving ARGS`` from the checkout, stdout and stderr piped as text."""
    return subprocess.Popen(
        [sys.executable, "-m", "serving", *args],
        cwd=Path(__file__).resolve().parent.parent,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def run(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Registry edits are blocking: keep them off the loop the server runs on."""
    return asyncio.to_thread(fn, *args, **kwargs)


def wait_shared(base, workers, timeout_s=120):
    """Wait until every route is answered by ``workers`` workers that all adopted the
    supervisor's loaded model (the first worker loads alone; then the shared generation)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            models = json.loads(urllib.request.urlopen(f"{base}/models", timeout=10).read())
        except OSError:
            models = None
        if models and all(
            len(m["workers"]) == workers
            and all(w["loaded_by"] == "inherited" for w in m["workers"])
            for m in models["models"]
        ):
            return {str(w["pid"]) for w in models["models"][0]["workers"]}
        time.sleep(0.2)
    raise AssertionError(f"the workers did not adopt the supervisor's models: {models}")


# -- Azure Storage: Azurite -----------------------------------------------------------------

#: Azurite's well-known development account (public, documented by Microsoft).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)
ROOT = Path(__file__).resolve().parent.parent


def azurite_binary() -> str | None:
    import shutil

    for candidate in (
        os.environ.get("MODELD_AZURITE"),
        shutil.which("azurite-blob"),
        str(ROOT / ".ci" / "node" / "node_modules" / ".bin" / "azurite-blob"),
    ):
        if candidate and Path(candidate).exists():
            return candidate
    return None


class Azurite:
    """Azurite (Microsoft's Azure Storage emulator, from the npm registry) as a process, with
    one container; skips the test where it is not installed (fails it in CI)."""

    def __init__(self, root: Path, container: str) -> None:
        self.root, self.container_name = root, container

    def __enter__(self) -> Azurite:
        import pytest

        binary = azurite_binary()
        if binary is None:
            if os.environ.get("CI"):
                pytest.fail("CI must install azurite from the npm registry (see .ci/run)")
            pytest.skip("needs azurite: npm install azurite (or set MODELD_AZURITE)")
        port = free_port()
        data = self.root / "azurite"
        data.mkdir(exist_ok=True)
        with open(self.root / "azurite.log", "ab") as out:
            self.proc = subprocess.Popen(
                [binary, "--blobHost", "127.0.0.1", "--blobPort", str(port), "--location",
                 str(data), "--silent", "--disableTelemetry", "--skipApiVersionCheck", "--loose"],
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.connection = (
            f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};"
            f"AccountKey={AZURITE_KEY};BlobEndpoint=http://127.0.0.1:{port}/{AZURITE_ACCOUNT};"
        )
        from azure.storage.blob import BlobServiceClient

        service = BlobServiceClient.from_connection_string(self.connection)
        deadline = time.monotonic() + 60
        while True:
            try:
                service.create_container(self.container_name)
                break
            except Exception:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.proc.kill()
                    raise
                time.sleep(0.2)
        self.container = service.get_container_client(self.container_name)
        return self

    def upload_dir(self, directory: Path, prefix: str) -> str:
        """Upload a model directory under ``prefix``; returns its ``wasbs://`` URI."""
        for path in sorted(p for p in directory.rglob("*") if p.is_file()):
            self.container.upload_blob(f"{prefix}/{path.relative_to(directory)}", path.read_bytes())
        return f"wasbs://{self.container_name}@{AZURITE_ACCOUNT}.blob.core.windows.net/{prefix}"

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)
