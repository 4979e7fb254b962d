"""Faults the daemon must survive: hung loads, a deleted cache, a damaged index, garbage."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import mlflow.pyfunc
import pytest

from loader import ModelCache, ModelManager, make_source
from tests.helpers import (
    POLL_S,
    iris_frame,
    make_config,
    register,
    served,
    split_payload,
    start,
    until,
)


def save_hanging_model(path):
    class HangsInLoad(mlflow.pyfunc.PythonModel):
        def load_context(self, context):
            import time

            time.sleep(3600)

        def predict(self, context, model_input, params=None):
            return [0] * len(model_input)

    mlflow.pyfunc.save_model(str(path), python_model=HangsInLoad(), pip_requirements=[])
    return path


@pytest.mark.slow
def test_a_load_that_hangs_is_rejected_and_following_goes_on(registry, cache_dir, tmp_path):
    c = registry.client()
    name = "hangy"
    register(c, name, registry.models["const1"])
    source = make_source(cache_dir=cache_dir, tracking_uri=registry.uri, registry_uri=registry.uri)
    manager = ModelManager(source, load_timeout_s=2.0)
    manager.add(name, f"models:/{name}/latest")
    manager.refresh()
    register(c, name, save_hanging_model(tmp_path / "hangs"))
    manager.refresh()
    route = manager.route(name)
    assert route.handle.version.version == 1  # still serving the good version
    (rejection,) = route.rejections.values()
    assert rejection.step == "load" and "within 2s" in rejection.reason
    register(c, name, registry.models["const3"])  # the manager is not stuck: v3 arrives
    manager.refresh()
    assert manager.get(name).version.version == 3
    manager.close()


async def test_cache_deleted_while_running(aiohttp_client, registry, cache_dir):
    c = registry.client()
    name = "wiped"
    register(c, name, registry.models["const1"])
    config = make_config(
        registry, cache_dir, f"models:/{name}/latest", registry__poll_interval_s=POLL_S
    )
    client = await start(aiohttp_client, config)
    await asyncio.to_thread(shutil.rmtree, cache_dir)
    assert (await client.post("/invocations", json=split_payload(iris_frame(1)))).status == 200
    register(c, name, registry.models["const2"])

    async def on_two():
        return await served(client, name) == 2

    assert await until(on_two)
    resp = await client.post("/invocations", json=split_payload(iris_frame(1)))
    assert resp.status == 200 and (await resp.json())["predictions"] == [2]
    assert any((cache_dir / "models").rglob("MLmodel"))  # the cache was rebuilt


def test_damaged_index_is_rebuilt_and_nothing_damaged_is_served(registry, cache_dir, caplog):
    source = make_source(cache_dir=cache_dir, tracking_uri=registry.uri, registry_uri=registry.uri)
    from loader import parse_uri

    version = source.resolve(parse_uri("models:/iris/2")).version
    first = source.prepare(version)
    source.cache.close()
    (cache_dir / "index" / "cache.db").write_bytes(b"this is not sqlite" * 100)
    cache = ModelCache(cache_dir)  # a fresh process opening the damaged index
    assert "rebuilding it empty" in caplog.text
    assert cache.lookup(ModelCache.key(version)) is None  # unverifiable: not served
    again = make_source(cache_dir=cache_dir, tracking_uri=registry.uri, registry_uri=registry.uri)
    prepared = again.prepare(version)
    assert prepared.downloaded and prepared.path == first.path
    assert int(again.load(prepared, uri="models:/iris/2").predict(iris_frame(1))[0]) == 2


async def test_artifacts_that_vanish_after_registration(
    aiohttp_client, registry, cache_dir, tmp_path
):
    c = registry.client()
    name = "vanish"
    register(c, name, registry.models["const1"])
    config = make_config(
        registry, cache_dir, f"models:/{name}/latest", registry__poll_interval_s=POLL_S
    )
    client = await start(aiohttp_client, config)
    gone = tmp_path / "gone"
    shutil.copytree(registry.models["const2"], gone)
    register(c, name, gone)
    shutil.rmtree(gone)  # the artifacts disappear before modeld fetches them

    async def rejected():
        status = await (await client.get(f"/models/{name}")).json()
        return [r["step"] for r in status["rejected"]]

    assert await until(rejected)
    assert await rejected() == ["fetch"]
    resp = await client.post("/invocations", json=split_payload(iris_frame(1)))
    assert resp.status == 200 and resp.headers["X-Model-Version"] == "1"
    assert not list((cache_dir / "tmp").iterdir())  # no partial download left behind
    assert not (cache_dir / "models" / name / "2").exists()


@pytest.mark.slow
def test_disk_full_while_fetching_leaves_no_entry_and_recovers(registry, cache_dir, tmp_path):
    """A file-size limit on the fetching process (the classic stand-in for a full disk): the
    model carries a 4 MB file, the limit is 1 MB."""
    import subprocess
    import sys

    big = tmp_path / "big"
    shutil.copytree(registry.models["const3"], big)
    (big / "blob.bin").write_bytes(b"\0" * 4_000_000)
    register(registry.client(), "bigone", big)
    code = (
        "import resource, signal, sys\n"
        "from loader import make_source, parse_uri, LoaderError\n"
        f"s = make_source(cache_dir={str(cache_dir)!r}, tracking_uri={registry.uri!r})\n"
        "v = s.resolve(parse_uri('models:/bigone/latest')).version\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))\n"
        "try:\n"
        "    s.prepare(v)\n"
        "except LoaderError as exc:\n"
        "    print('ERROR', exc); sys.exit(3)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
        timeout=120,
    )
    assert proc.returncode == 3, proc.stdout + proc.stderr[-2000:]
    assert "downloading from" in proc.stdout and "File too large" in proc.stdout, proc.stdout
    assert not list((cache_dir / "tmp").iterdir())
    source = make_source(cache_dir=cache_dir, tracking_uri=registry.uri, registry_uri=registry.uri)
    from loader import parse_uri

    version = source.resolve(parse_uri("models:/bigone/latest")).version
    assert source.cache.lookup(ModelCache.key(version)) is None  # nothing half-written visible
    prepared = source.prepare(version)  # space is back: it recovers
    assert prepared.downloaded and (prepared.path / "blob.bin").stat().st_size == 4_000_000


@pytest.mark.slow
def test_sigkill_mid_load_then_restart_serves_the_right_version(registry, tmp_path):
    import json
    import os
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    from tests.helpers import free_port, wait_http

    class LoadsSlowly(mlflow.pyfunc.PythonModel):
        def load_context(self, context):
            import time

            time.sleep(4)

        def predict(self, context, model_input, params=None):
            return [2] * len(model_input)

    slow = tmp_path / "slow-load"
    mlflow.pyfunc.save_model(str(slow), python_model=LoadsSlowly(), pip_requirements=[])
    c = registry.client()
    register(c, "killme", registry.models["const1"])
    cache = tmp_path / "cache"
    root = Path(__file__).resolve().parent.parent

    def launch(port):
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "serving",
                "serve",
                "-m",
                "models:/killme/latest",
                "--port",
                str(port),
                "--cache-dir",
                str(cache),
                "--poll-interval",
                "0.2",
            ],
            cwd=root,
            env={**os.environ, "MLFLOW_TRACKING_URI": registry.uri},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )

    def version(port):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/models/killme", timeout=10) as resp:
            return json.loads(resp.read())["version"]

    port = free_port()
    proc = launch(port)
    wait_http(f"http://127.0.0.1:{port}/health", timeout_s=120, proc=proc)
    register(c, "killme", slow)
    deadline = time.monotonic() + 60
    while (
        not (cache / "models" / "killme").exists()
        or len(list((cache / "models" / "killme").iterdir())) < 2
    ):
        assert time.monotonic() < deadline, "v2 was never fetched"
        time.sleep(0.1)
    time.sleep(1.0)  # v2 is cached and loading (its load takes 4 s)
    assert version(port) == 1
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    assert all(problem is None for problem in ModelCache(cache).verify(full=True).values())
    port = free_port()
    proc = launch(port)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout_s=120, proc=proc)
        assert version(port) == 2  # the right version: what the ref names now
        assert not list((cache / "tmp").iterdir())
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_locked_index_is_reported_not_wiped(registry, cache_dir, monkeypatch):
    import sqlite3

    import pytest

    from loader import CacheError, parse_uri
    from loader import cache as cache_module

    monkeypatch.setattr(cache_module, "INDEX_TIMEOUT_S", 0.5)
    source = make_source(cache_dir=cache_dir, tracking_uri=registry.uri, registry_uri=registry.uri)
    version = source.resolve(parse_uri("models:/iris/1")).version
    source.prepare(version)
    holder = sqlite3.connect(cache_dir / "index" / "cache.db", timeout=0.1)
    holder.execute("BEGIN EXCLUSIVE")  # another process writing, for as long as it likes
    try:
        with pytest.raises(CacheError, match="locked by another process"):
            source.cache.lookup(ModelCache.key(version))
    finally:
        holder.rollback()
        holder.close()
    assert source.cache.lookup(ModelCache.key(version)) is not None  # intact once released


def test_a_model_returning_garbage_is_never_served(registry, cache_dir, tmp_path):
    class Garbage(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return object()

    path = tmp_path / "garbage"
    mlflow.pyfunc.save_model(
        str(path), python_model=Garbage(), input_example=iris_frame(2), pip_requirements=[]
    )
    c = registry.client()
    register(c, "junk", registry.models["const1"])
    source = make_source(cache_dir=cache_dir, tracking_uri=registry.uri, registry_uri=registry.uri)
    manager = ModelManager(source)
    manager.add("junk", "models:/junk/latest")
    manager.refresh()
    register(c, "junk", path)
    manager.refresh()
    route = manager.route("junk")
    assert route.handle.version.version == 1
    (rejection,) = route.rejections.values()
    assert rejection.step == "warm-up" and "returned a object" in rejection.reason
    manager.close()


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MB tmpfs of our own (root only: skipped elsewhere), unmounted after."""
    import subprocess

    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64M", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path) -> Path:
    filler = disk / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 1_048_576)
        except OSError:
            pass
    return filler


@pytest.mark.slow
def test_a_full_disk_keeps_the_index_and_an_offline_start_serves_stale(registry, small_disk):
    """A full disk is a write error, never damage: the index is not rebuilt, an offline start
    on it serves the cached version (stale), and writes work again once space returns."""
    import os
    import subprocess
    import sys

    from loader import load_model
    from tests.helpers import MlflowServer

    cache = small_disk / "cache"
    server = MlflowServer(registry.db, registry.root / "full-artifacts", small_disk.parent / "log")
    server.start()
    try:
        model = load_model("models:/iris/1", cache_dir=cache, tracking_uri=server.url)
        assert not model.modeld.stale
    finally:
        server.stop()  # the registry goes away; the same URL is asked below
    filler = _fill(small_disk)
    dead = server.url
    code = (
        "from loader import load_model\n"
        f"m = load_model('models:/iris/1', cache_dir={str(cache)!r}, tracking_uri={dead!r})\n"
        "print('STALE', m.modeld.stale, m.modeld.version)\n"
    )
    env = {**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
        timeout=180,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "STALE True 1" in proc.stdout
    assert "rebuilding it empty" not in proc.stderr and "is full" in proc.stderr
    filler.unlink()  # space is back: the same index, whole, takes writes again
    from loader.registry import ModelVersion

    again = ModelCache(cache)
    entries = again.entries()
    assert [e["version"]["version"] for e in entries] == [1]
    version = ModelVersion.from_dict(entries[0]["version"])
    again.remember("test", "models:/iris/1", version)
    assert again.recall("test", "models:/iris/1") == version
