"""Registry outages against a real `mlflow server` subprocess, and LiveModel in-process."""

from __future__ import annotations

import asyncio
import gc
import threading
import time

import pytest

from serving.app import DAEMON
from tests.helpers import (
    POLL_S,
    MlflowServer,
    iris_frame,
    make_config,
    register,
    served,
    split_payload,
    start,
    through,
    until,
)


@pytest.mark.slow
async def test_outage_keeps_serving_then_catches_up_and_restarts_offline(
    aiohttp_client, registry, cache_dir, tmp_path
):
    c = registry.client()
    name = "outage"
    register(c, name, registry.models["const1"], stage="Production")
    server = MlflowServer(registry.db, tmp_path / "art", tmp_path / "server.log")
    server.start()
    overrides = through(server)
    config = make_config(registry, cache_dir, f"models:/{name}/Production", **overrides)
    client = await start(aiohttp_client, config)
    payload = split_payload(iris_frame(1))
    try:
        await asyncio.to_thread(server.stop)

        async def outage_seen():
            status = await (await client.get("/models")).json()
            return status["registry"]["unreachable_since"] is not None

        assert await until(outage_seen, timeout_s=30)
        for _ in range(20):  # predictions continue while the registry is down
            resp = await client.post("/invocations", json=payload)
            assert resp.status == 200 and resp.headers["X-Model-Version"] == "1"
        assert (await client.get("/health")).status == 200
        # A change made during the outage is picked up when the registry returns.
        register(c, name, registry.models["const2"])
        c.transition_model_version_stage(name, 2, "Production")
        await asyncio.to_thread(server.start)

        async def caught_up():
            return await served(client, name) == 2

        assert await until(caught_up, timeout_s=60)
        status = await (await client.get("/models")).json()
        assert status["registry"]["reachable"] is True
    finally:
        await asyncio.to_thread(server.stop)

    # A restart with the registry down serves the last known version from the cache (stale).
    await client.close()
    config = make_config(registry, cache_dir, f"models:/{name}/Production", **overrides)
    offline = await start(aiohttp_client, config)
    resp = await offline.post("/invocations", json=payload)
    assert resp.status == 200
    assert resp.headers["X-Model-Version"] == "2" and resp.headers["X-Model-Stale"] == "true"
    status = await (await offline.get(f"/models/{name}")).json()
    assert status["stale"] is True and status["state"] == "loaded"


@pytest.mark.slow
def test_live_model_swaps_in_process(registry, cache_dir):
    import loader

    c = registry.client()
    name = "livey"
    for k in (1, 2):
        register(c, name, registry.models[f"const{k}"])
    c.set_registered_model_alias(name, "prod", "1")
    swaps = []
    frame = iris_frame(3)

    def on_swap(old, new):
        swaps.append((old.version.version, new.version.version))

    options = {"cache_dir": cache_dir, "tracking_uri": registry.uri, "registry_uri": registry.uri}
    with loader.LiveModel(
        f"models:/{name}@prod", poll_interval_s=POLL_S, on_swap=on_swap, **options
    ) as live:
        assert live.version == 1 and list(live.predict(frame)) == [1, 1, 1]
        answers = []
        stop = threading.Event()

        def hammer():
            for _ in range(100_000):  # bounded
                if stop.is_set():
                    return
                answers.append(int(live.predict(frame)[0]))

        worker = threading.Thread(target=hammer)
        worker.start()
        c.set_registered_model_alias(name, "prod", "2")
        deadline = time.monotonic() + 15
        while live.version != 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
        stop.set()
        worker.join()
        assert live.version == 2 and swaps == [(1, 2)]
        assert set(answers) <= {1, 2} and answers[-1] == 2  # always one complete model
        assert live.status()["aliases"] == ["prod"]
    assert not [t for t in threading.enumerate() if t.name == "modeld-live"]


def test_live_model_raises_the_real_error(registry, cache_dir):
    import pytest

    import loader

    with pytest.raises(loader.ModelNotFound, match="nobody"):
        loader.LiveModel(
            "models:/iris@nobody",
            cache_dir=cache_dir,
            tracking_uri=registry.uri,
            registry_uri=registry.uri,
        )


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.slow
def test_fifty_swaps_do_not_grow_memory(registry, cache_dir):
    from loader import ModelManager, make_source

    source = make_source(cache_dir=cache_dir, tracking_uri=registry.uri, registry_uri=registry.uri)
    manager = ModelManager(source)
    manager.add("iris", "models:/iris/latest")
    manager.refresh()
    frame = iris_frame(4)
    levels = []
    for i in range(50):
        manager.pin("iris", 1 + i % 2)  # alternate v1 / v2: one swap per round
        manager.refresh()
        assert int(manager.get("iris").predict(frame)[0]) == 1 + i % 2
        if i in (0, 49):
            gc.collect()
            levels.append(rss_mb())
    assert manager.route("iris").swaps == 51
    manager.close()
    assert levels[1] <= levels[0] * 1.10, levels
    assert not list((cache_dir / "tmp").iterdir())  # no temp dirs left behind


async def test_daemon_status_after_swaps(aiohttp_client, registry, cache_dir):
    config = make_config(registry, cache_dir, "models:/iris/Production")
    client = await start(aiohttp_client, config)
    daemon = client.server.app[DAEMON]

    async def following():
        return daemon.follower is not None

    assert await until(following)
    status = await (await client.get("/models/iris")).json()
    assert status["swaps"] == 1 and status["last_swap_at"] is not None
