"""Following the registry and hot-swapping, against the real registry and a real server."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from serving.app import DAEMON
from tests.helpers import (
    POLL_S,
    iris_frame,
    make_config,
    register,
    run,
    save_iris_model,
    served,
    split_payload,
    start,
    until,
)


@pytest.mark.slow
async def test_registry_changes_under_load_drop_nothing(aiohttp_client, registry, cache_dir):
    client_reg = registry.client()
    models = registry.models
    name = "swappy"
    for k in (1, 2):
        register(client_reg, name, models[f"const{k}"])
    client_reg.transition_model_version_stage(name, 1, "Production")
    client_reg.set_registered_model_alias(name, "live", "1")
    routes = {
        "prod": f"models:/{name}/Production",
        "live": f"models:/{name}@live",
        "latest": f"models:/{name}/latest",
    }
    config = make_config(
        registry,
        cache_dir,
        *(f"{r}={u}" for r, u in routes.items()),
        registry__poll_interval_s=POLL_S,
    )
    client = await start(aiohttp_client, config)

    expected = {"prod": 1, "live": 1, "latest": 2}
    epochs = [(time.monotonic(), dict(expected), dict(expected))]  # (start, before, after)
    responses = []
    stop = asyncio.Event()
    payload = split_payload(iris_frame(1))

    async def load(route):
        for _ in range(20_000):  # bounded
            if stop.is_set():
                return
            t0 = time.monotonic()
            resp = await client.post(f"/models/{route}/invocations", json=payload)
            body = await resp.json()
            responses.append(
                (
                    route,
                    resp.status,
                    resp.headers.get("X-Model-Version"),
                    t0,
                    time.monotonic(),
                    body,
                )
            )

    loaders = [asyncio.ensure_future(load(r)) for r in routes for _ in range(2)]
    c = client_reg

    def v(n):  # register a new version from a const model, return its number
        return register(c, name, models[f"const{n}"])

    changes = [
        (lambda: c.transition_model_version_stage(name, 2, "Production", True), {"prod": 2}),
        (lambda: c.set_registered_model_alias(name, "live", "2"), {"live": 2}),
        (lambda: v(3), {"latest": 3}),
        (lambda: c.transition_model_version_stage(name, 3, "Production"), {"prod": 3}),
        (lambda: c.set_registered_model_alias(name, "live", "1"), {"live": 1}),
        (lambda: c.set_registered_model_alias(name, "live", "3"), {"live": 3}),
        (lambda: c.transition_model_version_stage(name, 3, "Archived"), {"prod": 2}),
        (lambda: c.delete_registered_model_alias(name, "live"), {}),  # nothing: keep v3
        (lambda: c.delete_model_version(name, 3), {"latest": 2}),
        (lambda: v(1), {"latest": 4}),
    ]
    convergence = []
    try:
        await asyncio.sleep(0.5)
        for change, effect in changes:
            before = dict(expected)
            t_change = time.monotonic()
            await run(change)
            expected.update(effect)
            epochs.append((t_change, before, dict(expected)))

            async def converged():
                got = {r: await served(client, r) for r in routes}
                return got == expected

            assert await until(converged), (effect, {r: await served(client, r) for r in routes})
            convergence.append(time.monotonic() - t_change)
            await asyncio.sleep(0.3)
    finally:
        stop.set()
        await asyncio.gather(*loaders)

    failed = [r for r in responses if r[1] != 200]
    assert not failed, failed[:5]
    assert len(responses) > 200
    for route, _, version, t0, t1, _ in responses:
        allowed = set()
        for i, (start_t, before, after) in enumerate(epochs):
            end_t = epochs[i + 1][0] if i + 1 < len(epochs) else float("inf")
            if t0 < end_t and t1 >= start_t:
                allowed |= {before[route], after[route]}
        assert int(version) in allowed, (route, version, t0, allowed)
    # The new version answers within poll interval + load time.
    assert max(convergence) < POLL_S + 5.0, convergence
    status = await (await client.get("/models/live")).json()
    assert status["version"] == 3 and "live" in status["problem"]


@pytest.fixture(scope="module")
def broken_models(registry, tmp_path_factory):
    import shutil

    import mlflow.pyfunc

    root = tmp_path_factory.mktemp("broken")
    no_weights = root / "no-weights"
    shutil.copytree(registry.models["const2"], no_weights)
    next(no_weights.glob("model.*")).unlink()

    class Refuses(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            raise RuntimeError("this model refuses every input")

    refuses = root / "refuses"
    mlflow.pyfunc.save_model(
        str(refuses), python_model=Refuses(), input_example=iris_frame(2), pip_requirements=[]
    )
    return {"no-weights": no_weights, "refuses": refuses, "bad-deps": registry.models["bad-deps"]}


@pytest.mark.slow
async def test_failing_versions_are_never_served(
    aiohttp_client, registry, cache_dir, broken_models, caplog
):
    c = registry.client()
    name = "picky"
    register(c, name, registry.models["const1"])
    config = make_config(
        registry,
        cache_dir,
        f"models:/{name}/latest",
        registry__poll_interval_s=POLL_S,
        dependencies__policy="strict",
    )
    client = await start(aiohttp_client, config)
    payload = split_payload(iris_frame(1))
    for number, (label, step) in enumerate(
        [("no-weights", "load"), ("refuses", "warm-up"), ("bad-deps", "dependency check")],
        start=2,
    ):
        register(c, name, broken_models[label])

        async def rejected(number=number):
            status = await (await client.get(f"/models/{name}")).json()
            return [r for r in status["rejected"] if r["version"] == number]

        found = await until(rejected)
        assert found and found[0]["step"] == step, (label, found)
        resp = await client.post("/invocations", json=payload)
        assert resp.status == 200 and resp.headers["X-Model-Version"] == "1"
        assert f"{name}@{number} rejected at {step} (" in caplog.text
        assert f"still serving {name}@1" in caplog.text
    await asyncio.sleep(POLL_S * 5)  # several polls: no retry before the backoff expires
    status = await (await client.get(f"/models/{name}")).json()
    assert status["version"] == 1
    # latest names v4 now: v2 and v3, which no ref names any more, moved to history (issue 15)
    assert [(r["version"], r["attempts"]) for r in status["rejected"]] == [(4, 1)]
    assert [(r["version"], r["attempts"]) for r in status["history"]] == [(2, 1), (3, 1)]
    assert "modeld-no-such-package" in status["rejected"][-1]["reason"]
    health = await client.get("/health")
    assert health.status == 200  # serving the last good version


@pytest.mark.slow
async def test_pin_unpin_and_admin_auth(aiohttp_client, registry, cache_dir):
    c = registry.client()
    name = "pinny"
    for k in (1, 2):
        register(c, name, registry.models[f"const{k}"])
    config = make_config(
        registry,
        cache_dir,
        f"models:/{name}/latest",
        registry__poll_interval_s=POLL_S,
        admin__token="s3cret",
    )
    client = await start(aiohttp_client, config)
    auth = {"Authorization": "Bearer s3cret"}
    assert (await client.post(f"/admin/models/{name}/pin", json={"version": 1})).status == 401
    bad = await client.post(
        f"/admin/models/{name}/pin", json={"version": 1}, headers={"Authorization": "Bearer nope"}
    )
    assert bad.status == 401 and "error_code" in await bad.json()
    resp = await client.post(f"/admin/models/{name}/pin", json={"version": 1}, headers=auth)
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["version"] == 1
    register(c, name, registry.models["const3"])  # v3 appears: the pin holds
    await asyncio.sleep(POLL_S * 4)
    assert await served(client, name) == 1
    for bad_version in ("x", 0, -1, True, None):
        resp = await client.post(
            f"/admin/models/{name}/pin", json={"version": bad_version}, headers=auth
        )
        assert resp.status == 400, bad_version
        assert repr(bad_version) in (await resp.json())["message"]
    missing = await client.post(f"/admin/models/{name}/pin", json={"version": 99}, headers=auth)
    assert missing.status == 404
    assert await served(client, name) == 1
    resp = await client.delete(f"/admin/models/{name}/pin", headers=auth)
    assert resp.status == 200 and (await resp.json())["version"] == 3
    refresh = await client.post("/admin/refresh", headers=auth)
    assert refresh.status == 200 and (await refresh.json())["registry"]["reachable"]
    assert (await client.post("/admin/models/nope/refresh", headers=auth)).status == 404


def test_admin_without_token_is_loopback_only():
    from serving.http.auth import is_loopback as _is_loopback

    assert _is_loopback("127.0.0.1") and _is_loopback("::1") and _is_loopback(None)
    assert not _is_loopback("10.1.2.3") and not _is_loopback("192.168.0.5")
    assert not _is_loopback("garbage")


async def test_webhook_signature_replay_and_age(aiohttp_client, registry, cache_dir):
    import uuid

    delivery = pytest.importorskip("mlflow.webhooks.delivery", reason="MLflow 3.3+ webhooks")
    _generate_hmac_signature = delivery._generate_hmac_signature

    c = registry.client()
    name = "hooked"
    register(c, name, registry.models["const1"])
    config = make_config(
        registry,
        cache_dir,
        f"models:/{name}/latest",
        registry__poll_interval_s=3600,
        admin__webhook_secret="whsec",
    )
    client = await start(aiohttp_client, config)
    register(c, name, registry.models["const2"])

    def signed(secret="whsec", stamp=None, delivery=None):
        body = json.dumps(
            {"entity": "model_version", "action": "created", "data": {"name": name, "version": "2"}}
        )
        delivery = delivery or str(uuid.uuid4())
        stamp = str(int(time.time())) if stamp is None else stamp
        headers = {
            "Content-Type": "application/json",
            "X-MLflow-Delivery-Id": delivery,
            "X-MLflow-Timestamp": stamp,
            "X-MLflow-Signature": _generate_hmac_signature(secret, delivery, stamp, body),
        }
        return body, headers

    body, headers = signed(secret="wrong")
    assert (await client.post("/admin/webhooks/mlflow", data=body, headers=headers)).status == 401
    body, headers = signed(stamp=str(int(time.time()) - 3600))
    assert (await client.post("/admin/webhooks/mlflow", data=body, headers=headers)).status == 401
    assert await served(client, name) == 1  # nothing polled yet (interval is an hour)
    body, headers = signed()
    assert (await client.post("/admin/webhooks/mlflow", data=body, headers=headers)).status == 200

    async def swapped():
        return await served(client, name) == 2

    assert await until(swapped)
    replay = await client.post("/admin/webhooks/mlflow", data=body, headers=headers)
    assert replay.status == 409


@pytest.mark.slow
async def test_config_file_hot_reload(aiohttp_client, registry, cache_dir, tmp_path, caplog):
    from serving.app import create_app
    from serving.config import load_config

    path = tmp_path / "modeld.toml"

    def write(models: str) -> None:
        path.write_text(
            f'[registry]\ntracking_uri = "{registry.uri}"\npoll_interval_s = {POLL_S}\n'
            f'[cache]\ndir = "{cache_dir}"\n' + models
        )

    write('[[models]]\nname = "a"\nuri = "models:/iris/1"\n')
    client = await aiohttp_client(create_app(load_config(path, env={})))

    async def names():
        listing = await (await client.get("/models")).json()
        return {m["name"]: m["version"] for m in listing["models"]}

    assert await until(lambda: _eq(names, {"a": 1}))
    write(
        '[[models]]\nname = "a"\nuri = "models:/iris/1"\n[[models]]\nname = "b"\n'
        'uri = "models:/iris/3"\n'
    )
    assert await until(lambda: _eq(names, {"a": 1, "b": 3}))
    write('[[models]]\nname = "b"\nuri = "models:/iris/2"\n')  # remove a, change b
    assert await until(lambda: _eq(names, {"b": 2}))
    assert (await client.post("/models/a/invocations", json={})).status == 404
    write('[[models]]\nname = "b"\nuri = "models:/iris/Prod"\n')  # invalid: ignored
    await asyncio.sleep(1.5)
    assert await names() == {"b": 2}
    assert "config reload ignored" in caplog.text and "unknown stage 'Prod'" in caplog.text
    resp = await client.post("/models/b/invocations", json=split_payload(iris_frame(1)))
    assert resp.status == 200 and resp.headers["X-Model-Version"] == "2"
    workers = client.server.app[DAEMON].workers
    assert workers["b"].threads == 1
    write('[[models]]\nname = "b"\nuri = "models:/iris/2"\npredict_threads = 3\n')

    async def replaced():
        return "b" not in workers

    assert await until(replaced)  # the old worker drains; the next request starts the new one
    resp = await client.post("/models/b/invocations", json=split_payload(iris_frame(1)))
    assert resp.status == 200 and workers["b"].threads == 3


async def _eq(fn, expected):
    return await fn() == expected


async def test_local_model_directory_reload(aiohttp_client, registry, cache_dir, tmp_path):
    import shutil

    local = tmp_path / "local-model"
    shutil.copytree(registry.models["const1"], local)
    client = await start(
        aiohttp_client,
        make_config(registry, cache_dir, f"loc={local}", registry__poll_interval_s=3600),
    )
    payload = split_payload(iris_frame(1))

    async def answer():
        resp = await client.post("/invocations", json=payload)
        return (await resp.json())["predictions"][0]

    assert await answer() == 1
    save_iris_model(tmp_path / "next", constant=3)
    for item in (tmp_path / "next").iterdir():  # rewrite the served directory in place
        shutil.copy2(item, local / item.name)
    (local / "MLmodel").touch()

    async def is_three():
        return await answer() == 3

    assert await until(is_three, timeout_s=20)
    assert client.server.app[DAEMON].manager.route("loc").swaps == 2


@pytest.mark.slow
async def test_tag_edits_show_without_reload_and_retry_a_rejected_version(
    aiohttp_client, registry, cache_dir, broken_models
):
    c = registry.client()
    name = "taggy"
    register(c, name, registry.models["const1"])
    config = make_config(
        registry, cache_dir, f"models:/{name}/latest", registry__poll_interval_s=POLL_S
    )
    client = await start(aiohttp_client, config)
    c.set_model_version_tag(name, "1", "owner", "team-a")
    c.update_model_version(name, "1", description="first cut")

    async def tagged():
        status = await (await client.get(f"/models/{name}")).json()
        return status["tags"] == {"owner": "team-a"} and status["description"] == "first cut"

    assert await until(tagged)
    assert (await (await client.get(f"/models/{name}")).json())["swaps"] == 1  # no reload
    register(c, name, broken_models["no-weights"])

    async def attempts():
        status = await (await client.get(f"/models/{name}")).json()
        return [r["attempts"] for r in status["rejected"]]

    assert await until(lambda: _eq(attempts, [1]))
    first = (await (await client.get(f"/models/{name}")).json())["rejected"][0]["at"]
    await asyncio.sleep(POLL_S * 3)
    again = (await (await client.get(f"/models/{name}")).json())["rejected"][0]
    assert (again["attempts"], again["at"]) == (1, first)  # backoff: not retried every cycle
    c.set_model_version_tag(name, "2", "fixed", "maybe")  # the registry shows a change

    async def retried():
        rejected = (await (await client.get(f"/models/{name}")).json())["rejected"]
        return rejected[0]["at"] > first

    assert await until(retried)  # at once, not after the 30 s backoff


async def test_warmup_payload_and_memory_swap(aiohttp_client, registry, cache_dir):
    c = registry.client()
    name = "lean"
    register(c, name, registry.models["const1"])
    good = json.dumps(split_payload(iris_frame(1)))
    config = make_config(
        registry, cache_dir, f"models:/{name}/latest", registry__poll_interval_s=POLL_S
    )
    from dataclasses import replace

    model = replace(config.models[0], swap="memory", warmup_payload=good)
    client = await start(aiohttp_client, replace(config, models=(model,)))
    register(c, name, registry.models["const2"])

    async def on_two():
        return await served(client, name) == 2

    assert await until(on_two)
    bad = replace(model, warmup_payload=json.dumps({"inputs": [["not", "numbers"]]}))
    daemon = client.server.app[DAEMON]
    daemon.manager.update(name, bad.uri, swap="memory", warmup_example=bad.warmup_example)
    register(c, name, registry.models["const3"])

    async def rejected_at_warmup():
        status = await (await client.get(f"/models/{name}")).json()
        return [r["step"] for r in status["rejected"]] == ["warm-up"]

    assert await until(rejected_at_warmup)
    status = await (await client.get(f"/models/{name}")).json()
    assert status["version"] is None and status["state"] == "failed"  # the memory-swap gap
    assert (await client.get("/health")).status == 503


async def test_deleted_pinned_version_keeps_serving_and_is_reported(
    aiohttp_client, registry, cache_dir
):
    client_reg = registry.client()
    for k in (1, 2, 3):
        register(client_reg, "fading", registry.models[f"const{k}"])
    config = make_config(
        registry, cache_dir, "fading=models:/fading/2", registry__poll_interval_s=POLL_S
    )
    client = await start(aiohttp_client, config)
    assert await served(client, "fading") == 2

    await run(client_reg.delete_model_version, "fading", "2")

    async def reported():
        status = await (await client.get("/models/fading")).json()
        return status if status["problem"] else None

    status = await until(reported)
    assert status and "fading" in status["problem"] and status["version"] == 2, status
    resp = await client.post("/models/fading/invocations", json=split_payload(iris_frame(2)))
    assert resp.status == 200 and (await resp.json()) == {"predictions": [2, 2]}
    assert resp.headers["X-Model-Version"] == "2"
