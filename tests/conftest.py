"""Session fixtures: one real MLflow registry (sqlite + local artifacts), built once."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from serving.config import bound_mlflow_http_retries
from tests.helpers import (
    MlflowServer,
    pins,
    register,
    save_iris_model,
    set_status,
    threads_left_running,
)

# What the daemon does at start (the library never touches the environment): a registry outage
# must cost seconds, not MLflow's minutes of retries, in the library tests too.
bound_mlflow_http_retries()


def _quiet_type_hint_nag() -> None:
    """The tests' toy pyfunc models have no type hints on purpose (the plain DataFrame path).
    MLflow nags about that with a UserWarning it forces past every warning filter
    (``filter_user_warnings_once`` sets "once" inside its own catch_warnings), so the
    ``filterwarnings`` of pyproject.toml cannot drop it: drop that one message here."""
    try:
        from mlflow.pyfunc.utils import data_validation
    except ImportError:  # MLflow before 2.20 has no such nag
        return

    nag = data_validation.color_warning

    def color_warning(message: str, *args: object, **kwargs: object) -> None:
        if not message.startswith("Add type hints to the `predict` method"):
            nag(message, *args, **kwargs)

    data_validation.color_warning = color_warning


_quiet_type_hint_nag()


@dataclass
class TestRegistry:
    root: Path
    db: Path
    uri: str
    models: dict[str, Path]  # saved model directories by label

    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)


@pytest.fixture(scope="session")
def registry(tmp_path_factory) -> TestRegistry:
    """iris v1..v3 (v1 Staging + alias champion, v2 Production, v3 none); const-k models;
    needs-deps (requirements that cannot be met); pending (v2 not READY)."""
    root = tmp_path_factory.mktemp("registry")
    db = root / "mlflow.db"
    uri = f"sqlite:///{db}"
    os.environ["MLFLOW_TRACKING_URI"] = uri  # for mlflow.pyfunc.load_model parity checks
    saved = root / "saved"
    models = {
        "iris": save_iris_model(saved / "iris"),
        "const1": save_iris_model(saved / "const1", constant=1),
        "const2": save_iris_model(saved / "const2", constant=2),
        "const3": save_iris_model(saved / "const3", constant=3),
        "bad-deps": save_iris_model(
            saved / "bad-deps",
            constant=1,
            requirements=[
                *pins("mlflow", "numpy", "pandas"),
                "scikit-learn==0.20.3",
                "modeld-no-such-package==1.0",
            ],
        ),
    }
    reg = TestRegistry(root, db, uri, models)
    client = reg.client()
    register(client, "iris", models["const1"], stage="Staging")
    register(client, "iris", models["const2"], stage="Production")
    register(client, "iris", models["const3"])
    client.set_registered_model_alias("iris", "champion", "1")
    register(client, "bad-deps", models["bad-deps"], stage="Production")
    register(client, "pending", models["const1"])
    register(client, "pending", models["const2"])
    set_status(db, "pending", 2, "PENDING_REGISTRATION")
    return reg


@pytest.fixture(scope="session")
def mlflow_server(registry, tmp_path_factory):
    """A real `mlflow server` over the session registry's sqlite file."""
    server = MlflowServer(
        registry.db, registry.root / "server-artifacts", registry.root / "server.log"
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture
def cache_dir(tmp_path) -> Path:
    return tmp_path / "cache"


@pytest.fixture(autouse=True)
def no_thread_leaks():
    """Fail a test that leaves threads running (see helpers.threads_left_running)."""
    before = {t.ident for t in threading.enumerate()}
    yield
    leaked = threads_left_running(before)
    for t in leaked:
        t.join(timeout=5)
    leaked = [t for t in leaked if t.is_alive()]
    assert not leaked, f"test leaked threads: {[t.name for t in leaked]}"
