"""loader.load_model end to end: parity with MLflow, identity, deps policy, offline start."""

import time

import mlflow.pyfunc
import pytest
from packaging.version import Version

import loader
from loader import DependencyMismatch, RegistryUnavailable
from tests.helpers import MlflowServer, iris_frame, register


def test_same_answer_as_mlflow(registry, cache_dir):
    ours = loader.load_model("models:/iris/Production", cache_dir=cache_dir)
    theirs = mlflow.pyfunc.load_model("models:/iris/Production")
    frame = iris_frame(5)
    assert list(ours.predict(frame)) == list(theirs.predict(frame))
    info = ours.modeld
    assert (info.name, info.version, info.stale) == ("iris", 2, False)
    assert info.cache_path.startswith(str(cache_dir))
    assert info.dependency_report.ok, info.dependency_report.mismatches


def test_same_version_twice_is_the_same_object(registry, cache_dir):
    a = loader.load_model("models:/iris/2", cache_dir=cache_dir)
    b = loader.load_model("models:/iris/Production", cache_dir=cache_dir)
    c = loader.load_model("models:/iris/1", cache_dir=cache_dir)
    assert a is b
    assert c is not a


def test_local_path_and_file_uri(registry, cache_dir):
    path = registry.models["const3"]
    by_path = loader.load_model(str(path), cache_dir=cache_dir)
    by_uri = loader.load_model(f"file://{path}", cache_dir=cache_dir)
    assert int(by_path.predict(iris_frame(1))[0]) == 3
    assert by_uri.modeld.cache_path == str(path)


def test_runs_uri(registry, cache_dir, tmp_path):
    import mlflow.sklearn
    from sklearn.dummy import DummyClassifier

    from tests.helpers import BASE_REQUIREMENTS, pins

    X = iris_frame(10)
    model = DummyClassifier(strategy="constant", constant=7).fit(X, [7] * 10)
    # Artifacts under tmp_path: the sqlite store's default root is ./mlruns in the checkout.
    experiment = mlflow.create_experiment(
        f"runs-uri-{tmp_path.name}", artifact_location=(tmp_path / "artifacts").as_uri()
    )
    with mlflow.start_run(experiment_id=experiment) as run:
        where = {"name": "m"} if Version(mlflow.__version__).major >= 3 else {"artifact_path": "m"}
        mlflow.sklearn.log_model(model, **where, pip_requirements=pins(*BASE_REQUIREMENTS))
    loaded = loader.load_model(f"runs:/{run.info.run_id}/m", cache_dir=cache_dir)
    assert int(loaded.predict(X)[0]) == 7
    assert loaded.modeld.run_id == run.info.run_id


def test_strict_refuses_before_downloading_weights(registry, cache_dir):
    with pytest.raises(DependencyMismatch) as info:
        loader.load_model(
            "models:/bad-deps/Production", cache_dir=cache_dir, dependency_policy="strict"
        )
    text = str(info.value)
    assert "modeld-no-such-package: not installed, model needs ==1.0" in text
    assert "scikit-learn: installed" in text
    assert not any((cache_dir / "models").rglob("model.skops"))  # weights never fetched
    assert any((cache_dir / "meta").rglob("requirements.txt"))


def test_warn_loads_and_reports(registry, cache_dir):
    model = loader.load_model("models:/bad-deps/Production", cache_dir=cache_dir)
    texts = [str(m) for m in model.modeld.dependency_report.mismatches]
    assert "modeld-no-such-package: not installed, model needs ==1.0" in texts
    ignored = loader.load_model(
        "models:/bad-deps/Production",
        cache_dir=cache_dir,
        dependency_policy="strict",
        dependency_ignore=["scikit-learn", "modeld-no-such-package"],
    )
    assert ignored.modeld.dependency_report.ok


@pytest.mark.slow
def test_offline_start_serves_cached_version_marked_stale(registry, tmp_path, cache_dir):
    server = MlflowServer(registry.db, tmp_path / "art", tmp_path / "server.log")
    number = register(registry.client(), "offline", registry.models["const2"], stage="Production")
    server.start()
    try:
        online = loader.load_model(
            "models:/offline/Production", cache_dir=cache_dir, tracking_uri=server.url
        )
        assert online.modeld.stale is False
    finally:
        server.stop()
    started = time.monotonic()
    offline = loader.load_model(
        "models:/offline/Production", cache_dir=cache_dir, tracking_uri=server.url
    )
    assert offline.modeld.stale is True
    assert offline.modeld.version == number
    assert int(offline.predict(iris_frame(1))[0]) == 2
    with pytest.raises(RegistryUnavailable, match="no copy"):
        loader.load_model("models:/offline/latest", cache_dir=cache_dir, tracking_uri=server.url)
    assert time.monotonic() - started < 30


@pytest.mark.slow
def test_no_registry_needed_no_mlflow_store_made(registry, tmp_path):
    """With no registry configured, MLflow 3's default tracking store is ./mlflow.db: listing
    the cache, or loading a local path through the library, must not create it in the working
    directory (`mlflow models serve` touches no store for a local path)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PYTHONPATH"] = str(root)
    library = (
        "import loader; "
        f"model = loader.load_model({str(registry.models['iris'])!r}, cache_dir='cache'); "
        "print(type(model).__name__)"
    )
    runs = [
        [sys.executable, "-m", "serving", "cache", "ls", "--cache-dir", "cache"],
        [sys.executable, "-c", library],
    ]
    for cmd in runs:
        done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=120)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        assert "Creating initial MLflow database tables" not in done.stderr
        assert not (tmp_path / "mlflow.db").exists(), cmd
    assert "PyFuncModel" in done.stdout
