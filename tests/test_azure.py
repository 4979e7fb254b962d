"""An Azure Machine Learning workspace registry, through the real azureml-mlflow plugin.

The plugin (and azure-identity under it) runs unchanged: an ``azureml://`` tracking URI, its
managed-identity token, its HTTPS calls under the workspace's path prefix. The workspace is
emulated by tests/azure_workspace.py in front of a real ``mlflow server``, refusing what the
registry guide's support matrix marks unsupported; model weights sit in Azurite (``wasbs://``
sources, MLflow's own Azure Blob client). The plugin pins ``mlflow-skinny<=3.15``, so this
module runs in its own venv (see .ci/run); elsewhere it is skipped.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from loader.errors import RegistryError
from loader.registry import Registry
from loader.uri import parse_uri
from tests.azure_workspace import AzureWorkspace
from tests.helpers import (
    POLL_S,
    Azurite,
    MlflowServer,
    free_port,
    iris_frame,
    make_config,
    modeld,
    run,
    save_iris_model,
    served,
    split_body,
    split_payload,
    start,
    until,
    wait_http,
)

if os.environ.get("MODELD_AZURE_REQUIRED"):
    import azureml.mlflow  # noqa: F401 (the Azure CI venv must have the plugin)
else:
    pytest.importorskip("azureml.mlflow", reason="needs azureml-mlflow (MLflow <= 3.15)")

pytestmark = pytest.mark.slow
NAME = "azure-iris"


class Workspace:
    """The emulated workspace, its backend, its blob store and the models it holds."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "artifacts").mkdir()
        self.backend = MlflowServer(root / "mlflow.db", root / "artifacts", root / "mlflow.log")
        self.azure = AzureWorkspace("http://unset", root)
        self.storage: Azurite  # started by the fixture
        self.sources: dict[int, str] = {}

    @property
    def uri(self) -> str:
        return self.azure.tracking_uri

    def client(self):
        from mlflow import MlflowClient

        uri = self.azure.tracking_uri
        return MlflowClient(tracking_uri=uri, registry_uri=uri)

    def register(self, constant: int) -> int:
        """A new version answering ``constant`` (weights in Azurite), through the plugin."""
        directory = save_iris_model(self.root / f"saved-{constant}", constant=constant)
        source = self.storage.upload_dir(directory, f"iris-{constant}")
        mv = self.client().create_model_version(NAME, source=source)
        self.sources[int(mv.version)] = source
        return int(mv.version)

    def env(self) -> dict[str, str]:
        return {
            **self.azure.env(),
            "AZURE_STORAGE_CONNECTION_STRING": self.storage.connection,
            "MLFLOW_TRACKING_URI": self.azure.tracking_uri,
        }


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    ws = Workspace(tmp_path_factory.mktemp("azure"))
    ws.backend.start()
    ws.azure.backend_url = ws.backend.url
    ws.azure.start()
    with Azurite(ws.root, "models") as storage, pytest.MonkeyPatch.context() as patch:
        ws.storage = storage
        for key, value in ws.env().items():
            patch.setenv(key, value)
        ws.client().create_registered_model(NAME)
        for constant in (1, 2):
            ws.register(constant)
        ws.client().transition_model_version_stage(NAME, "1", "Production")
        yield ws
    ws.azure.stop()
    ws.backend.stop()


@pytest.fixture(autouse=True)
def _only_the_probes_are_refused(request, workspace):
    """Nothing modeld does on its own calls an operation the workspace refuses. The
    exceptions are probes: the batched ``name IN (...)`` search, tried once per registry
    client, and (only when a ref names an alias) the alias lookup that tells a registry
    without aliases from an alias not set."""
    before = len(workspace.azure.refused())
    yield
    for call in workspace.azure.refused()[before:]:
        if call.op == "registered-models/alias" and "alias" in request.node.name:
            assert call.method == "GET", call
            continue
        assert call.op == "registered-models/search" and " IN (" in (call.filter or ""), call
        assert "tag" not in call.filter, call  # MLflow's client adds a tag filter; we do not


def _registry(workspace) -> Registry:
    return Registry(workspace.client())


def test_resolves_every_supported_ref_with_one_poll_when_in_is_allowed(workspace):
    workspace.azure.refuse_in = False
    try:
        reg = _registry(workspace)
        refs = [parse_uri(f"models:/{NAME}/{tail}") for tail in ("latest", "1", "Production")]
        first = reg.resolve_many(refs)
        assert [first[r].version for r in refs] == [2, 1, 1]
        assert first[refs[0]].source == workspace.sources[2]
        calls = len(workspace.azure.calls)
        again = reg.resolve_many(refs, known=first)
        assert [again[r].version for r in refs] == [2, 1, 1]
        assert workspace.azure.ops()[calls:] == ["registered-models/search"]  # one per cycle
    finally:
        workspace.azure.refuse_in = True


def test_in_refused_falls_back_to_per_model_polling_and_remembers(workspace):
    reg = _registry(workspace)
    refs = [parse_uri(f"models:/{NAME}/latest"), parse_uri(f"models:/{NAME}/Production")]
    before = len(workspace.azure.refused())
    for _ in range(3):
        out = reg.resolve_many(refs)
        assert [out[r].version for r in refs] == [2, 1]
    assert len(workspace.azure.refused()) - before == 1  # asked once, then remembered


def test_alias_refs_say_the_registry_has_no_aliases(workspace, tmp_path):
    reg = _registry(workspace)
    with pytest.raises(RegistryError, match="does not support model aliases") as info:
        reg.resolve(parse_uri(f"models:/{NAME}@champion"))
    assert f"models:/{NAME}/latest" in str(info.value)  # says what to write instead
    calls = len(workspace.azure.calls)
    with pytest.raises(RegistryError, match="does not support model aliases"):
        reg.resolve(parse_uri(f"models:/{NAME}@champion"))
    assert "registered-models/alias" not in workspace.azure.ops()[calls:]  # asked once

    # The daemon stays up (a sidecar waits for its models) and says why the route is empty.
    port = free_port()
    proc = modeld(
        "serve", "-m", f"models:/{NAME}@champion", "--port", str(port),
        "--cache-dir", str(tmp_path / "cache"), env=workspace.env(),
    )  # fmt: skip
    try:
        wait_http(f"http://127.0.0.1:{port}/v2/health/live", timeout_s=120, proc=proc)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            problem = json.loads(_get(port, f"/models/{NAME}")).get("problem") or ""
            if problem:
                break
            time.sleep(0.2)
        assert "does not support model aliases" in problem
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert "does not support model aliases" in err
    assert "Traceback" not in err


async def test_follows_the_workspace_and_serves_from_azurite(aiohttp_client, workspace, tmp_path):
    c = workspace.client()
    routes = {"latest": f"models:/{NAME}/latest", "prod": f"models:/{NAME}/Production"}
    config = make_config(
        workspace,
        tmp_path / "cache",
        *(f"{r}={u}" for r, u in routes.items()),
        registry__registry_uri=workspace.uri,
        registry__poll_interval_s=POLL_S,
    )
    client = await start(aiohttp_client, config)
    payload = split_payload(iris_frame(2))

    async def answers(route):
        resp = await client.post(f"/models/{route}/invocations", json=payload)
        return (await resp.json())["predictions"]

    assert await answers("latest") == [2, 2]
    assert await answers("prod") == [1, 1]

    async def serving(route, version):
        return await until(lambda: _is(client, route, version), timeout_s=30)

    three = await run(workspace.register, 3)
    assert await serving("latest", three)
    assert await answers("latest") == [3, 3]
    # a stage transition that archives the one before, then one that does not
    await run(c.transition_model_version_stage, NAME, str(three), "Production", True)
    assert await serving("prod", three)
    assert (await run(c.get_model_version, NAME, "1")).current_stage == "Archived"
    await run(c.transition_model_version_stage, NAME, "2", "Production", False)
    assert await serving("prod", three)  # the highest version in the stage
    await run(c.transition_model_version_stage, NAME, str(three), "Staging")
    assert await serving("prod", 2)
    assert await answers("prod") == [2, 2]
    # tags and description show without a reload
    await run(c.set_model_version_tag, NAME, "2", "owner", "team-a")
    await run(c.update_model_version, NAME, "2", description="retrained")

    async def described():
        status = await (await client.get("/models/prod")).json()
        return status["tags"] == {"owner": "team-a"} and status["description"] == "retrained"

    assert await until(described, timeout_s=30)
    await run(c.delete_model_version_tag, NAME, "2", "owner")

    async def untagged():
        return (await (await client.get("/models/prod")).json())["tags"] == {}

    assert await until(untagged, timeout_s=30)
    # deleting the newest version moves latest back
    await run(c.delete_model_version, NAME, str(three))
    assert await serving("latest", 2)
    assert await answers("latest") == [2, 2]
    # A workspace cannot delete a registered model: its users delete every version instead.
    # The routes keep their cached versions and say the registry names nothing now.
    for version in ("1", "2"):
        await run(c.delete_model_version, NAME, version)

    async def emptied():
        status = await (await client.get("/models/latest")).json()
        return status["version"] == 2 and status["problem_kind"] == "not found"

    assert await until(emptied, timeout_s=30)
    assert await answers("latest") == [2, 2]
    four = await run(workspace.register, 4)
    await run(c.transition_model_version_stage, NAME, str(four), "Production")
    assert await serving("latest", four) and await serving("prod", four)
    assert await answers("prod") == [4, 4]


async def _is(client, route, version):
    return await served(client, route) == version


def test_offline_start_from_the_cache_when_the_workspace_is_down(workspace, tmp_path):
    cache = tmp_path / "cache"
    port = free_port()
    args = ["serve", "-m", f"models:/{NAME}/Production", "--cache-dir", str(cache)]
    first = modeld(*args, "--port", str(port), env=workspace.env())
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout_s=120, proc=first)
        expected = _predict(port)
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=60)
    workspace.azure.stop()
    try:
        started = time.monotonic()
        offline = modeld(*args, "--port", str(port), env=workspace.env())
        try:
            wait_http(f"http://127.0.0.1:{port}/health", timeout_s=120, proc=offline)
            assert time.monotonic() - started < 60
            assert _predict(port) == expected
            assert json.loads(_get(port, f"/models/{NAME}"))["stale"] is True
            assert json.loads(_get(port, "/models"))["registry"]["reachable"] is False
        finally:
            offline.send_signal(signal.SIGTERM)
            _, err = offline.communicate(timeout=60)
        assert "Traceback" not in err
    finally:
        workspace.azure.start()


def test_no_credential_is_reported_in_seconds_and_never_asks_for_a_login(workspace, tmp_path):
    """No managed identity, no service principal, no ``az login``: the plugin's own chain would
    end in a device-code login that holds the start for fifteen minutes. modeld comes up, says
    in seconds that there is no Azure credential, and keeps asking (an identity may appear)."""
    env = {**workspace.env(), "HOME": str(tmp_path)}  # no shared token cache, no az login
    for key in ("IDENTITY_ENDPOINT", "IDENTITY_HEADER", "MSI_ENDPOINT", "AZURE_CLIENT_ID"):
        env[key] = ""
    port = free_port()
    started = time.monotonic()
    proc = modeld(
        "serve", "-m", f"models:/{NAME}/latest", "--port", str(port),
        "--cache-dir", str(tmp_path / "cache"), env=env,
    )  # fmt: skip
    try:
        wait_http(f"http://127.0.0.1:{port}/v2/health/live", timeout_s=120, proc=proc)
        problem = ""
        while time.monotonic() - started < 90 and not problem:
            problem = json.loads(_get(port, f"/models/{NAME}")).get("problem") or ""
            time.sleep(0.2)
        assert "no Azure credential" in problem
        assert time.monotonic() - started < 90
        assert json.loads(_get(port, "/models"))["registry"]["reachable"] is False
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert "devicelogin" not in err and "To sign in" not in err
    assert "Traceback" not in err


def _get(port: int, path: str) -> str:
    """The body of a GET, whatever its status (a route with nothing to serve answers 503)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
            return resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.read().decode()


def _predict(port: int) -> list:
    import urllib.request

    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations",
        data=split_body(2),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as resp:
        return json.loads(resp.read())["predictions"]
