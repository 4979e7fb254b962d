"""MLflow 3's default URI, ``models:/<model_id>`` (what ``log_model`` returns), served like any
ref: the library, the daemon, status with its run and logged name, and an offline restart."""

from __future__ import annotations

import pytest

import loader
from tests.helpers import (
    BASE_REQUIREMENTS,
    MlflowServer,
    iris_frame,
    make_config,
    pins,
    run,
    split_payload,
    start,
    through,
)


def log_iris(tmp_path, constant: int, tracking_uri: str | None = None):
    """Log a model as an MLflow 3 user does; returns (model_info, run id)."""
    import mlflow
    import mlflow.sklearn
    from sklearn.dummy import DummyClassifier

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    X = iris_frame(10)
    model = DummyClassifier(strategy="constant", constant=constant).fit(X, [constant] * 10)
    experiment = mlflow.create_experiment(
        f"logged-{tmp_path.name}-{constant}", artifact_location=(tmp_path / "art").as_uri()
    )
    with mlflow.start_run(experiment_id=experiment) as active:
        info = mlflow.sklearn.log_model(
            model, name="clf", input_example=X.head(2), pip_requirements=pins(*BASE_REQUIREMENTS)
        )
    return info, active.info.run_id


def test_load_model_takes_the_uri_log_model_printed(registry, cache_dir, tmp_path):
    info, run_id = log_iris(tmp_path, 4)
    assert info.model_uri == f"models:/{info.model_id}"
    model = loader.load_model(info.model_uri, cache_dir=cache_dir)
    assert list(model.predict(iris_frame(3))) == [4, 4, 4]
    version = model.modeld.model_version
    assert version.model_id == info.model_id and version.logged_name == "clf"
    assert model.modeld.run_id == run_id
    again = loader.load_model(info.model_uri, cache_dir=cache_dir)
    assert again is model  # cached by model id: the same object


def test_an_unknown_model_id_says_what_the_uri_means(registry, cache_dir):
    with pytest.raises(loader.ModelNotFound) as info:
        loader.load_model("models:/iris", cache_dir=cache_dir)
    message = str(info.value)
    assert "no logged model 'iris'" in message and "models:/NAME/VERSION" in message


async def test_the_daemon_serves_and_shows_a_logged_model(
    aiohttp_client, registry, cache_dir, tmp_path
):
    info, run_id = await run(log_iris, tmp_path, 5)
    config = make_config(registry, cache_dir, info.model_uri)
    assert config.models[0].name == info.model_id  # the route is named by the model id
    client = await start(aiohttp_client, config)
    resp = await client.post("/invocations", json=split_payload(iris_frame(2)))
    assert resp.status == 200 and (await resp.json()) == {"predictions": [5, 5]}
    assert resp.headers["X-Model-Name"] == info.model_id
    status = await (await client.get(f"/models/{info.model_id}")).json()
    assert status["model_id"] == info.model_id and status["logged_name"] == "clf"
    assert status["run_id"] == run_id and status["ref"] == info.model_uri
    assert status["state"] == "loaded" and status["problem"] is None


@pytest.mark.slow
async def test_a_logged_model_starts_offline_from_the_cache(
    aiohttp_client, registry, cache_dir, tmp_path
):
    """Logged through a real `mlflow server`; served; the server dies; a restart serves the
    same model from the cache, marked stale."""
    server = MlflowServer(registry.db, tmp_path / "server-art", tmp_path / "server.log")
    server.start()
    try:
        info, _ = await run(log_iris, tmp_path, 6, server.url)
        overrides = through(server, poll_interval_s=None)
        config = make_config(registry, cache_dir, info.model_uri, **overrides)
        online = await start(aiohttp_client, config)
        resp = await online.post("/invocations", json=split_payload(iris_frame(1)))
        assert resp.status == 200 and "X-Model-Stale" not in resp.headers
        await online.close()
    finally:
        await run(server.stop)
        import mlflow

        mlflow.set_tracking_uri(registry.uri)
    offline = await start(aiohttp_client, config)
    resp = await offline.post("/invocations", json=split_payload(iris_frame(1)))
    assert resp.status == 200 and (await resp.json()) == {"predictions": [6]}
    assert resp.headers["X-Model-Stale"] == "true"
