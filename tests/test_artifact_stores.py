"""Models at artifact store URIs (s3://, mlflow-artifacts:/, ...), through MLflow's own artifact
repositories, against real servers on 127.0.0.1: moto's S3 server, and `mlflow server`
serving artifacts. Cached, followed (a changed model is swapped in), served offline."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import loader
from tests.helpers import (
    AZURITE_ACCOUNT,
    Azurite,
    MlflowServer,
    free_port,
    iris_frame,
    make_config,
    run,
    served,
    split_payload,
    start,
    until,
    wait_http,
)

BUCKET = "models"


class S3Server:
    """moto's S3-compatible server as a process (``moto_server``), its clients pointed at it."""

    def __init__(self, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        server = Path(sys.executable).parent / "moto_server"
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [str(server), "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        wait_http(f"{self.url}/moto-api/", timeout_s=60, proc=self.proc)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=20)

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1")

    def upload(self, directory: Path, prefix: str) -> None:
        client = self.client()
        for path in sorted(p for p in directory.rglob("*") if p.is_file()):
            client.upload_file(str(path), BUCKET, f"{prefix}/{path.relative_to(directory)}")


@pytest.fixture
def s3(tmp_path, monkeypatch):
    server = S3Server(tmp_path / "moto.log")
    server.start()
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", server.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "modeld-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "modeld-test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    server.client().create_bucket(Bucket=BUCKET)
    yield server
    server.stop()


def test_load_model_from_s3_is_cached_and_verified(s3, registry, cache_dir):
    s3.upload(registry.models["const1"], "iris")
    model = loader.load_model(f"s3://{BUCKET}/iris", cache_dir=cache_dir)
    assert list(model.predict(iris_frame(2))) == [1, 1]
    version = model.modeld.model_version
    assert version.source == f"s3://{BUCKET}/iris" and version.revision
    assert version.registry == f"s3://{BUCKET}"
    assert Path(model.modeld.cache_path).is_relative_to(cache_dir)
    with pytest.raises(loader.ModelNotFound) as info:  # no MLmodel there
        loader.load_model(f"s3://{BUCKET}/nothing-here", cache_dir=cache_dir)
    assert "MLmodel" in str(info.value)


@pytest.mark.slow
async def test_the_daemon_follows_an_s3_model_and_serves_it_offline(
    aiohttp_client, s3, registry, cache_dir
):
    s3.upload(registry.models["const1"], "live")
    uri = f"s3://{BUCKET}/live"
    config = make_config(registry, cache_dir, uri, registry__poll_interval_s=0.2)
    assert config.models[0].name == "live"
    client = await start(aiohttp_client, config)
    resp = await client.post("/invocations", json=split_payload(iris_frame(1)))
    assert (await resp.json()) == {"predictions": [1]}
    await run(s3.upload, registry.models["const2"], "live")  # the model at the URI changes

    async def answers_two():
        resp = await client.post("/invocations", json=split_payload(iris_frame(1)))
        return (await resp.json()) == {"predictions": [2]}

    assert await until(answers_two, timeout_s=30)
    status = await (await client.get("/models/live")).json()
    assert status["swaps"] == 2 and status["problem"] is None
    await client.close()
    await run(s3.stop)  # the store goes away; a restart serves from the cache
    offline = await start(aiohttp_client, config)
    resp = await offline.post("/invocations", json=split_payload(iris_frame(1)))
    assert (await resp.json()) == {"predictions": [2]} and resp.headers["X-Model-Stale"] == "true"
    assert await served(offline, "live") == 1


def test_a_store_whose_client_is_missing_names_the_package(cache_dir):
    with pytest.raises(loader.RegistryError) as info:
        loader.load_model("gs://bucket/model", cache_dir=cache_dir)
    assert "pip install google-cloud-storage" in str(info.value)


@pytest.mark.parametrize("uri", ["s3:///no-bucket", "s3://b/../x", "s3://b/m?x=1", "zz://h/m"])
def test_bad_store_uris_say_what_is_accepted(uri):
    with pytest.raises(loader.InvalidModelURI) as info:
        loader.parse_uri(uri)
    assert "s3://" in str(info.value)


@pytest.mark.slow
async def test_mlflow_artifacts_uris_through_a_real_mlflow_server(
    aiohttp_client, registry, cache_dir, tmp_path
):
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    server = MlflowServer(registry.db, tmp_path / "art", tmp_path / "server.log")
    server.start()
    try:
        uri = "mlflow-artifacts:/shared/iris"
        repo = get_artifact_repository(uri, tracking_uri=server.url)
        await run(repo.log_artifacts, str(registry.models["const3"]))
        config = make_config(
            registry,
            cache_dir,
            f"shared={uri}",
            registry__tracking_uri=server.url,
            registry__registry_uri=server.url,
        )
        client = await start(aiohttp_client, config)
        resp = await client.post("/invocations", json=split_payload(iris_frame(2)))
        assert (await resp.json()) == {"predictions": [3, 3]}
    finally:
        await run(server.stop)


@pytest.fixture
def azurite(tmp_path, monkeypatch):
    """Azurite (Microsoft's Azure Storage emulator, from the npm registry) as a process."""
    with Azurite(tmp_path, BUCKET) as storage:
        monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", storage.connection)
        yield storage.container


def test_wasbs_models_load_from_azurite(azurite, registry, cache_dir):
    directory = registry.models["const2"]
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        azurite.upload_blob(f"iris/{path.relative_to(directory)}", path.read_bytes())
    uri = f"wasbs://{BUCKET}@{AZURITE_ACCOUNT}.blob.core.windows.net/iris"
    model = loader.load_model(uri, cache_dir=cache_dir)
    assert list(model.predict(iris_frame(2))) == [2, 2]
    assert model.modeld.model_version.revision
