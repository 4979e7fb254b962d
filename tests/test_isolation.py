"""Isolated environments: a version trained with another scikit-learn is served from a uv-built
environment of its own, predicting exactly what that environment predicts.

The "legacy" model is trained and saved inside a venv with scikit-learn 1.6 (built by the same
EnvStore, so uv's cache serves the daemon's build of the same requirements), and registered in
the session registry. Its estimator is pickled by that scikit-learn: the daemon's (1.9) would
only warn and load it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import mlflow
import numpy as np
import pytest

from loader.envs import EnvSpec, EnvStore, find_pythons, model_environment, pick_python
from loader.envworker import Block, WireError, decode, encode
from loader.errors import EnvBuildError
from tests.helpers import (
    free_port,
    iris_frame,
    make_config,
    modeld,
    register,
    run,
    save_iris_model,
    save_streamer,
    split_payload,
    start,
    until,
    wait_http,
)

OLD_SKLEARN = "1.6.1"  # another minor than the installed scikit-learn: its pickles are its own
TRAIN = """
import json, sys, mlflow, mlflow.sklearn, sklearn
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression
X, y = load_iris(return_X_y=True, as_frame=True)
model = LogisticRegression(max_iter=300).fit(X, y)
mlflow.sklearn.save_model(
    model, sys.argv[1], serialization_format="cloudpickle", pyfunc_predict_fn="predict_proba",
    pip_requirements=[f"scikit-learn=={sklearn.__version__}"], input_example=X.head(2),
)
json.dump({"sklearn": sklearn.__version__, "proba": model.predict_proba(X).tolist()},
          open(sys.argv[2], "w"))
"""


def _not_installed_sklearn() -> None:
    import sklearn

    assert not sklearn.__version__.startswith(OLD_SKLEARN.rsplit(".", 1)[0] + "."), (
        "pick another OLD_SKLEARN: the test needs a minor the daemon does not have"
    )


@pytest.fixture(scope="module")
def legacy(tmp_path_factory, registry):
    """(saved model dir, the training environment's own predict_proba on all of iris)."""
    _not_installed_sklearn()
    root = tmp_path_factory.mktemp("legacy")
    store = EnvStore(root / "trainer-envs")
    spec = EnvSpec(None, (f"mlflow=={mlflow.__version__}", f"scikit-learn=={OLD_SKLEARN}"))
    env = store.ensure(spec, root, "trainer")
    script = root / "train.py"
    script.write_text(TRAIN, encoding="utf-8")
    model_dir, expected = root / "model", root / "expected.json"
    subprocess.run(
        [env.executable, "-I", str(script), str(model_dir), str(expected)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    truth = json.loads(expected.read_text())
    assert truth["sklearn"] == OLD_SKLEARN
    register(registry.client(), "legacy", model_dir)
    return model_dir, np.array(truth["proba"])


def _iris_all():
    return iris_frame(150)


async def _predict(client, route="legacy"):
    resp = await client.post(f"/models/{route}/invocations", json=split_payload(_iris_all()))
    return resp.status, await resp.json()


# -- the wire -------------------------------------------------------------------------------


def test_values_cross_the_wire_unchanged():
    import pandas as pd

    frame = pd.DataFrame(
        {
            "f": [1.5, float("nan")],
            "i": np.array([1, 2], dtype="int32"),
            "s": ["a", None],
            "b": [True, False],
            "t": pd.to_datetime(["2024-01-01", "2024-01-02"]),
            "n": pd.array([1, None], dtype="Int64"),
        },
        index=[10, 11],
    )
    block = pd.DataFrame(np.arange(6.0).reshape(3, 2), columns=["x", "y"])
    values = [
        frame,
        block,
        pd.Series([1, 2], name="s"),
        {"a": np.arange(4).reshape(2, 2), "b": np.array(["x", "yz"])},
        np.array([[1, 2]], dtype="uint8"),
        np.array([{"k": 1}, None], dtype=object),
        [1, "two", None, 3.0, float("inf"), b"\x00\xff"],
        ("tuple", 1),
        "text",
        np.float32(1.25),
        {1: "int key"},
        None,
    ]
    for value in values:
        buffers = []
        node = json.loads(json.dumps(encode(value, buffers)))
        back = decode(node, [bytearray(b) for b in buffers])
        if isinstance(value, pd.DataFrame):  # the same labels (as objects: see decode)
            pd.testing.assert_frame_equal(back, value, check_column_type=False)
            assert back.columns.tolist() == value.columns.tolist()
        elif isinstance(value, pd.Series):
            pd.testing.assert_series_equal(back, value)
        elif isinstance(value, dict) and "a" in value:
            assert back.keys() == value.keys()
            np.testing.assert_array_equal(back["a"], value["a"])
            np.testing.assert_array_equal(back["b"], value["b"])
        elif isinstance(value, np.ndarray):
            assert back.dtype == value.dtype and back.shape == value.shape
            assert back.tolist() == value.tolist()
        else:
            assert back == value and type(back) is type(value), value
    # The daemon's fast path sends its block unbuilt; the worker gets the frame it stands for.
    buffers = []
    node = json.loads(json.dumps(encode(Block(block.to_numpy(), ["x", "y"]), buffers)))
    rebuilt = decode(node, [bytearray(b) for b in buffers])
    pd.testing.assert_frame_equal(rebuilt, block, check_column_type=False)
    with pytest.raises(WireError, match="cannot be passed") as info:
        encode(object(), [])
    assert "accepted: DataFrame" in str(info.value)


# -- the environment ------------------------------------------------------------------------


def test_environment_is_read_from_the_model_files(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "MLmodel").write_text("mlflow_version: 3.1.0\nflavors: {}\n")
    (model / "conda.yaml").write_text(
        "dependencies:\n- python=3.10.4\n- libgomp\n- pip:\n  - scikit-learn==1.5.2\n"
    )
    spec = model_environment(model)
    assert spec.python == "3.10" and spec.source == "conda.yaml"
    assert spec.requirements == ("mlflow==3.1.0", "scikit-learn==1.5.2")
    assert spec.skipped == ("libgomp",)
    (model / "requirements.txt").write_text("mlflow-skinny==3.2\n# comment\nxgboost>=2\n")
    (model / "python_env.yaml").write_text("python: 3.12.1\n")
    spec = model_environment(model)
    assert spec.python == "3.12" and spec.requirements == ("mlflow-skinny==3.2", "xgboost>=2")


def test_a_python_that_is_not_here_is_named_with_those_that_are(tmp_path):
    store = EnvStore(tmp_path / "envs")
    with pytest.raises(EnvBuildError) as info:
        store.ensure(EnvSpec("3.99", ("mlflow",)), tmp_path, "m v1")
    text = str(info.value)
    assert "needs Python 3.99" in text and f"{sys.version_info[0]}.{sys.version_info[1]}." in text
    assert "downloads no interpreter" in text
    assert not (tmp_path / "envs").exists() or not list((tmp_path / "envs").glob("[!.]*"))


@pytest.mark.slow
def test_a_failed_or_stuck_build_leaves_nothing_usable(tmp_path, monkeypatch):
    import socket

    store = EnvStore(tmp_path / "envs", build_timeout_s=5)
    spec = EnvSpec(None, ("mlflow", "modeld-no-such-package==1.0"))
    # A package index that accepts connections and never answers: the build is stopped.
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(64)
    monkeypatch.setenv("UV_INDEX_URL", f"http://127.0.0.1:{hole.getsockname()[1]}/simple")
    monkeypatch.setenv("UV_NO_CACHE", "1")
    try:
        started = time.monotonic()
        with pytest.raises(
            EnvBuildError,
            match=r"uv pip install did not finish within 5s \(environments.build_timeout_s\)",
        ):
            store.ensure(spec, tmp_path, "stuck v1")
        assert time.monotonic() - started < 30
    finally:
        hole.close()
    # What a crash mid-build leaves (a temporary directory) is removed by the next build.
    key = store.key(spec, pick_python(spec, find_pythons(), "refused v1"))
    key_dir = store.root / f".tmp-{key}-99999999-deadbeef"
    key_dir.mkdir()
    monkeypatch.setenv("UV_INDEX_URL", f"http://127.0.0.1:{free_port()}/simple")  # refused
    monkeypatch.setenv("UV_HTTP_RETRIES", "0")
    store.build_timeout_s = 120
    with pytest.raises(EnvBuildError) as info:
        store.ensure(spec, tmp_path, "refused v1")
    assert "uv pip install failed" in str(info.value)
    assert not key_dir.exists()
    assert [p.name for p in store.root.iterdir() if not p.name.startswith(".")] == ["builds.jsonl"]
    assert [b["ok"] for b in store.builds()] == [False, False]


# -- served by the daemon ------------------------------------------------------------------


@pytest.mark.slow
async def test_isolate_serves_what_its_own_environment_predicts(
    aiohttp_client, registry, legacy, cache_dir
):
    _, expected = legacy
    config = make_config(registry, cache_dir, "models:/legacy/1", dependencies__policy="isolate")
    client = await start(aiohttp_client, config)
    status, body = await _predict(client)
    assert status == 200
    np.testing.assert_allclose(np.array(body["predictions"]), expected, rtol=0, atol=1e-9)

    frame = _iris_all()
    infer = {
        "inputs": [
            {"name": c, "shape": [150], "datatype": "FP64", "data": frame[c].tolist()}
            for c in frame.columns
        ]
    }
    resp = await client.post("/v2/models/legacy/infer", json=infer)
    assert resp.status == 200, await resp.text()
    outputs = (await resp.json())["outputs"]
    got = np.array(outputs[0]["data"]).reshape(outputs[0]["shape"])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)

    info = await (await client.get("/models/legacy")).json()
    env = info["environment"]
    assert env["packages"]["scikit-learn"] == OLD_SKLEARN
    assert env["python"].startswith(f"{sys.version_info[0]}.{sys.version_info[1]}.")
    assert info["env_worker"]["state"] == "ready" and info["env_worker"]["pid"]
    page = await (await client.get("/")).text()
    assert env["key"] in page and f"scikit-learn=={OLD_SKLEARN}" in page
    metrics = await (await client.get("/metrics")).text()
    assert 'modeld_env_builds_total{outcome="built"} 1.0' in metrics

    # A bad request is the model's 400, as in-process; the worker keeps serving.
    resp = await client.post(
        "/models/legacy/invocations", json={"dataframe_split": {"columns": ["x"], "data": [[1]]}}
    )
    assert resp.status == 400 and "Failed to predict data" in (await resp.json())["message"]
    assert (await _predict(client))[0] == 200


@pytest.mark.slow
async def test_warn_serves_it_here_as_before(aiohttp_client, registry, legacy, cache_dir):
    config = make_config(registry, cache_dir, "models:/legacy/1", dependencies__policy="warn")
    client = await start(aiohttp_client, config)
    info = await (await client.get("/models/legacy")).json()
    assert info["environment"] is None and info["env_worker"] is None
    mismatched = {m["package"] for m in info["dependency_report"]["mismatches"]}
    assert "scikit-learn" in mismatched
    assert (await _predict(client))[0] == 200
    assert not (cache_dir / "envs").exists() or not any(
        p for p in (cache_dir / "envs").iterdir() if not p.name.startswith(".")
    )


@pytest.mark.slow
async def test_swaps_between_isolated_and_local_versions_drop_nothing(
    aiohttp_client, registry, legacy, cache_dir, tmp_path
):
    legacy_dir, expected = legacy
    client_ = registry.client()
    local_dir = save_iris_model(tmp_path / "local")  # this environment's versions: in-process
    v_iso = await run(register, client_, "flip", legacy_dir)
    v_local = await run(register, client_, "flip", local_dir)
    await run(client_.set_registered_model_alias, "flip", "live", str(v_iso))
    config = make_config(
        registry,
        cache_dir,
        "models:/flip@live",
        dependencies__policy="isolate",
        registry__poll_interval_s=0.2,
    )
    client = await start(aiohttp_client, config)
    failures: list[tuple[int, str]] = []
    answered = 0
    stop = asyncio.Event()

    async def load() -> None:
        nonlocal answered
        while not stop.is_set() and answered < 100_000:
            resp = await client.post("/models/flip/invocations", json=split_payload(iris_frame(3)))
            if resp.status != 200:
                failures.append((resp.status, await resp.text()))
            answered += 1

    workers = [asyncio.create_task(load()) for _ in range(4)]
    pids = set()
    try:
        for i in range(10):
            target = v_local if i % 2 == 0 else v_iso
            await run(client_.set_registered_model_alias, "flip", "live", str(target))

            async def swapped(target=target):
                info = await (await client.get("/models/flip")).json()
                return info["version"] == target and info

            info = await until(swapped, timeout_s=120)
            assert info, f"swap {i} to v{target} did not happen"
            assert (info["environment"] is not None) == (target == v_iso)
            if info["env_worker"]:
                pids.add(info["env_worker"]["pid"])
            await asyncio.sleep(0.3)  # requests on the new version, under load
    finally:
        stop.set()
        await asyncio.gather(*workers)
    assert failures == [] and answered > 50
    assert len(pids) == 5  # each isolated turn started its own worker...

    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    serving = info["env_worker"]["pid"]  # the last turn's, serving now

    async def retired():  # ...and each earlier one was stopped after its last request
        return all(gone(p) for p in pids - {serving})

    assert await until(retired, timeout_s=20)


@pytest.mark.slow
async def test_a_killed_worker_fails_only_its_requests_and_comes_back(
    aiohttp_client, registry, legacy, cache_dir
):
    _, expected = legacy
    config = make_config(registry, cache_dir, "models:/legacy/1", dependencies__policy="isolate")
    client = await start(aiohttp_client, config)
    pid = (await (await client.get("/models/legacy")).json())["env_worker"]["pid"]
    results: list[tuple[int, dict]] = []
    stop = asyncio.Event()

    async def load() -> None:
        while not stop.is_set() and len(results) < 100_000:
            status, body = await _predict(client)
            results.append((status, body))

    clients = 4
    workers = [asyncio.create_task(load()) for _ in range(clients)]
    await asyncio.sleep(0.5)
    os.kill(pid, signal.SIGKILL)

    async def back():
        info = await (await client.get("/models/legacy")).json()
        worker = info["env_worker"]
        return worker["state"] == "ready" and worker["pid"] != pid and info

    info = await until(back, timeout_s=120)
    await asyncio.sleep(0.5)
    stop.set()
    await asyncio.gather(*workers)
    assert info and info["env_worker"]["restarts"] == 1
    failed = [(s, b) for s, b in results if s != 200]
    # At most the requests the worker held fail (a batch that fails is retried one request
    # at a time, and those retries wait for the restart: usually none fails at all)...
    assert len(failed) <= clients, failed
    for status, body in failed:
        assert status == 503 and body["error_code"] == "TEMPORARILY_UNAVAILABLE"
        assert "worker died" in body["message"] and "SIGKILL" in body["message"]
    assert results[-1][0] == 200  # ...then it is back, the route never unloaded
    np.testing.assert_allclose(np.array(results[-1][1]["predictions"]), expected, atol=1e-9)


@pytest.mark.slow
async def test_a_build_that_fails_keeps_the_old_version(
    aiohttp_client, registry, cache_dir, tmp_path
):
    good = save_iris_model(tmp_path / "good")
    broken = save_iris_model(
        tmp_path / "broken", requirements=[f"mlflow=={mlflow.__version__}", "modeld-nope==9.9"]
    )
    client_ = registry.client()
    await run(register, client_, "unbuildable", good)
    config = make_config(
        registry,
        cache_dir,
        "models:/unbuildable/latest",
        dependencies__policy="isolate",
        registry__poll_interval_s=0.2,
    )
    client = await start(aiohttp_client, config)
    await run(register, client_, "unbuildable", broken)

    async def rejected():
        info = await (await client.get("/models/unbuildable")).json()
        return info["rejected"] and info

    info = await until(rejected, timeout_s=120)
    assert info["version"] == 1 and info["rejected"][-1]["step"] == "env"
    assert "modeld-nope" in info["rejected"][-1]["reason"]  # the tail of uv's error
    resp = await client.post("/models/unbuildable/invocations", json=split_payload(iris_frame()))
    assert resp.status == 200 and resp.headers["X-Model-Version"] == "1"


@pytest.mark.slow
async def test_an_isolated_model_streams(aiohttp_client, registry, cache_dir, tmp_path):
    words = save_streamer(tmp_path / "words")
    config = make_config(
        registry, cache_dir, f"words={words}", dependencies__policy="isolate_always"
    )
    client = await start(aiohttp_client, config)
    assert (await (await client.get("/models/words")).json())["environment"] is not None

    def chat(text: str, **extra):
        return {"messages": [{"role": "user", "content": text}], **extra}

    async def events(text: str) -> list[str]:
        resp = await client.post("/models/words/invocations", json=chat(text, stream=True))
        assert resp.status == 200 and resp.content_type == "text/event-stream"
        body = (await resp.read()).decode()
        return [line for line in body.splitlines() if line.startswith("data: ")]

    lines = await events("one two three")
    assert lines[-1] == "data: [DONE]"
    assert [json.loads(x[6:])["delta"] for x in lines[:-1]] == ["one", "two", "three"]
    lines = await events("ok boom")  # the worker's exception, as an error event
    assert "the model broke mid-stream" in json.loads(lines[1][6:])["error"]
    whole = await client.post("/models/words/invocations", json=chat("one two"))
    assert (await whole.json()) == {"text": "whole answer"}  # the same channel, reusable


# -- the library ----------------------------------------------------------------------------


@pytest.mark.slow
def test_load_model_with_env_manager_uv(registry, legacy, tmp_path):
    from loader import load_model

    _, expected = legacy
    model = load_model(
        "models:/legacy/1", env_manager="uv", cache_dir=tmp_path / "c", tracking_uri=registry.uri
    )
    try:
        assert model.modeld.environment.packages["scikit-learn"] == OLD_SKLEARN
        got = np.asarray(model.predict(_iris_all()))
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)
        pid = model.worker["pid"]
    finally:
        model.close()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)

    from loader import LiveModel  # the same environment, followed

    with LiveModel(
        "models:/legacy/1", env_manager="uv", cache_dir=tmp_path / "c", tracking_uri=registry.uri
    ) as live:
        got = np.asarray(live.predict(_iris_all()))
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)
        pid = live.handle.model.worker["pid"]
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert len(EnvStore(tmp_path / "c" / "envs").builds()) == 1  # one build for both


# -- the sidecar: workers, restarts, offline ------------------------------------------------


def _post(url: str) -> int:
    body = json.dumps(split_payload(iris_frame())).encode()
    req = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.slow
def test_two_workers_build_once_and_a_restart_needs_no_index(registry, legacy, tmp_path):
    cache = tmp_path / "cache"

    def serve(extra_env: dict[str, str]) -> tuple[subprocess.Popen, str]:
        port = free_port()
        proc = modeld(
            "serve", "-m", "models:/legacy/1", "--workers", "2", "--port", str(port),
            "--cache-dir", str(cache), "--dependency-policy", "isolate",
            env={"MLFLOW_TRACKING_URI": registry.uri, **extra_env},
            start_new_session=True,
        )  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/health", timeout_s=300, proc=proc)
        return proc, base

    def stop(proc: subprocess.Popen) -> str:
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        return err

    store = EnvStore(cache / "envs")
    proc, base = serve({})
    try:
        assert all(_post(f"{base}/invocations") == 200 for _ in range(20))
    finally:
        stop(proc)
    builds = store.builds()
    assert [b["ok"] for b in builds] == [True], builds  # two workers, one build
    [entry] = store.entries()
    assert not entry["in_use"]  # the workers' leases went with them

    dead = f"http://127.0.0.1:{free_port()}/simple"
    proc, base = serve({"UV_INDEX_URL": dead, "PIP_INDEX_URL": dead, "UV_OFFLINE": "1"})
    try:
        assert _post(f"{base}/invocations") == 200
        assert store.entries()[0]["in_use"]
    finally:
        stop(proc)
    assert len(store.builds()) == 1  # served from the cached environment

    ls = modeld("env", "ls", "--cache-dir", str(cache), "--json")
    out, err = ls.communicate(timeout=60)
    assert ls.returncode == 0, err
    assert [e["key"] for e in json.loads(out)] == [entry["key"]]
    gc = modeld("env", "gc", "--cache-dir", str(cache))
    out, err = gc.communicate(timeout=60)
    assert gc.returncode == 0 and entry["key"] in out, err
    assert store.entries() == []


@pytest.mark.slow
def test_pull_builds_the_environment(registry, legacy, tmp_path):
    cache = tmp_path / "cache"
    pull = modeld(
        "pull", "models:/legacy/1", "--cache-dir", str(cache), "--env-manager", "uv",
        env={"MLFLOW_TRACKING_URI": registry.uri},
    )  # fmt: skip
    out, err = pull.communicate(timeout=600)
    assert pull.returncode == 0, err
    assert "environment" in out and "loads in" in out
    [entry] = EnvStore(cache / "envs").entries()
    assert entry["packages"]["scikit-learn"] == OLD_SKLEARN and not entry["in_use"]
