"""Traffic between refs: split by weight, sticky keys, fallback, shadows, run-time weights."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest
from prometheus_client.parser import text_string_to_metric_families

from serving.config import ConfigProblems, load_config
from serving.runtime.arms import Split
from tests.helpers import iris_frame, split_payload, start, until


def arm_config(registry, cache_dir, tmp_path, arms: str, extra: str = "", top: str = ""):
    path = tmp_path / "modeld.toml"
    path.write_text(
        f"{top}\n[registry]\ntracking_uri = {json.dumps(registry.uri)}\n"
        f"[cache]\ndir = {json.dumps(str(cache_dir))}\n"
        f'[[models]]\nname = "split"\narms = [{arms}]\n{extra}\n'
    )
    return load_config(path, env={})


def test_sticky_keys_share_traffic_by_weight_and_never_flip(registry, cache_dir, tmp_path):
    config = arm_config(
        registry, cache_dir, tmp_path,
        '{name = "champion", uri = "models:/iris/1", weight = 90},'
        '{name = "challenger", uri = "models:/iris/2", weight = 10}',
        'sticky = "header:X-User-Id"',
    )  # fmt: skip
    split = Split.of(config.models[0])
    keys = [f"user-{i}" for i in range(10_000)]

    def chosen(key: str) -> str:
        return next(split.order(lambda source, name: key)).config.name

    first = [chosen(k) for k in keys]
    share = first.count("challenger") / len(keys)
    assert abs(share - 0.10) <= 0.01, share
    assert [chosen(k) for k in keys] == first  # 100% of repeated keys on the same arm
    split.set_weights({"champion": 0})
    assert {chosen(k) for k in keys[:500]} == {"challenger"}
    with pytest.raises(ValueError, match="nothing would answer"):
        split.set_weights({"challenger": 0})
    with pytest.raises(KeyError, match="arms: champion, challenger"):
        split.set_weights({"nope": 1})


async def all_arms_loaded(client) -> None:
    async def loaded() -> bool:
        view = await (await client.get("/models/split")).json()
        return all(a["status"]["state"] == "loaded" for a in view["arms"])

    assert await until(loaded, timeout_s=60)


async def predict(client, path="/invocations", **headers):
    resp = await client.post(path, json=split_payload(iris_frame(1)), headers=headers)
    assert resp.status == 200, await resp.text()
    return (await resp.json())["predictions"][0], resp.headers


async def test_a_split_route_answers_from_its_arms_and_a_user_stays_on_one(
    aiohttp_client, registry, cache_dir, tmp_path
):
    config = arm_config(
        registry, cache_dir, tmp_path,
        '{name = "one", uri = "models:/iris/1", weight = 1},'
        '{name = "two", uri = "models:/iris/2", weight = 1}',
        'sticky = "header:X-User-Id"',
    )  # fmt: skip
    client = await start(aiohttp_client, config)  # ready on its primary arm
    await all_arms_loaded(client)  # until then a key of "two" falls back to "one"
    seen = {}
    for _ in range(60):
        user = uuid.uuid4().hex
        answer, headers = await predict(client, **{"X-User-Id": user})
        assert headers["X-Model-Route"] == "split"
        arm = headers["X-Model-Arm"]
        assert (arm, answer, headers["X-Model-Version"]) in {("one", 1, "1"), ("two", 2, "2")}
        for _ in range(3):  # the same user, the same arm, every time
            again, again_headers = await predict(client, **{"X-User-Id": user})
            assert again_headers["X-Model-Arm"] == arm and again == answer
        seen[arm] = seen.get(arm, 0) + 1
    assert set(seen) == {"one", "two"}
    # an arm is a route of its own too: ROUTE@ARM
    answer, headers = await predict(client, "/models/split@two/invocations")
    assert answer == 2 and "X-Model-Arm" not in headers
    view = await (await client.get("/models/split")).json()
    assert view["ready"] and [a["arm"] for a in view["arms"]] == ["one", "two"]
    assert sum(a["answered"] for a in view["arms"]) == 240
    assert {a["status"]["version"] for a in view["arms"]} == {1, 2}
    page = await (await client.get("/")).text()
    assert "<b>split</b> arms: one (50%, v1: " in page and "sticky on header:X-User-Id" in page
    listing = await (await client.get("/models")).json()
    assert [s["name"] for s in listing["splits"]] == ["split"]
    metrics = await (await client.get("/metrics")).text()
    by_arm = {
        s.labels["arm"]: s.value
        for f in text_string_to_metric_families(metrics)
        for s in f.samples
        if s.name == "modeld_arm_requests_total" and s.labels["status"] == "200"
    }
    assert by_arm == {a["arm"]: float(a["answered"]) for a in view["arms"]}
    latency_counts = {
        s.labels["arm"]: s.value
        for f in text_string_to_metric_families(metrics)
        for s in f.samples
        if s.name == "modeld_arm_request_duration_seconds_count"
    }
    assert latency_counts == by_arm
    # run-time weights (admin): everything to "one"
    resp = await client.put("/admin/models/split/weights", json={"weights": {"two": 0}})
    assert resp.status == 200, await resp.text()
    assert {a["arm"]: a["weight"] for a in (await resp.json())["arms"]} == {"one": 1, "two": 0}
    answers = {(await predict(client, **{"X-User-Id": uuid.uuid4().hex}))[0] for _ in range(30)}
    assert answers == {1}
    bad = await client.put("/admin/models/split/weights", json={"weights": {"one": 0}})
    assert bad.status == 400 and "nothing would answer" in (await bad.json())["message"]
    missing = await client.put("/admin/models/split/weights", json={"weights": {"x": 1}})
    assert missing.status == 404 and "arms: one, two" in (await missing.json())["message"]


async def test_an_arm_that_cannot_load_falls_back_and_the_route_is_ready_on_its_primary(
    aiohttp_client, registry, cache_dir, tmp_path
):
    config = arm_config(
        registry, cache_dir, tmp_path,
        '{name = "stable", uri = "models:/iris/1", weight = 1},'
        '{name = "broken", uri = "models:/iris/99", weight = 99}',
    )  # fmt: skip
    client = await start(aiohttp_client, config)  # /health: 200 without the broken arm
    answers = [await predict(client) for _ in range(20)]
    assert {(a, h["X-Model-Arm"]) for a, h in answers} == {(1, "stable")}
    view = await (await client.get("/models/split")).json()
    stable = next(a for a in view["arms"] if a["arm"] == "stable")
    assert stable["answered"] == 20 and stable["fallbacks"] > 10  # most draws chose "broken"
    broken = next(a for a in view["arms"] if a["arm"] == "broken")
    assert broken["status"]["state"] == "failed"


async def test_a_shadow_gets_a_copy_after_the_answer_and_both_are_logged(
    aiohttp_client, registry, cache_dir, tmp_path
):
    log_file = tmp_path / "payloads.jsonl"
    top = (
        f"[logging.payloads]\nenabled = true\nfile = {json.dumps(str(log_file))}\n"
        "flush_interval_s = 0.05\n"
    )
    config = arm_config(
        registry, cache_dir, tmp_path,
        '{name = "live", uri = "models:/iris/1"},'
        '{name = "candidate", uri = "models:/iris/3", shadow = true}',
        top=top,
    )  # fmt: skip
    client = await start(aiohttp_client, config)
    await all_arms_loaded(client)
    results = await asyncio.gather(*(predict(client) for _ in range(30)))
    assert {(a, h["X-Model-Arm"]) for a, h in results} == {(1, "live")}

    async def mirrored() -> dict | None:
        view = await (await client.get("/models/split")).json()
        candidate = next(a for a in view["arms"] if a["arm"] == "candidate")
        return view if candidate["mirrored"] + candidate["mirror_dropped"] == 30 else None

    view = await until(mirrored, timeout_s=20)
    assert view is not None
    candidate = next(a for a in view["arms"] if a["arm"] == "candidate")
    assert candidate["mirrored"] >= 1 and candidate["share"] is None

    async def logged() -> list[dict] | None:
        lines = [json.loads(line) for line in log_file.read_text().splitlines()]
        shadows = [e for e in lines if e["arm"] == "candidate"]
        return lines if len(shadows) == candidate["mirrored"] else None

    lines = await until(logged, timeout_s=20)
    assert lines is not None
    by_id: dict[str, list[dict]] = {}
    for event in lines:
        by_id.setdefault(event["id"], []).append(event)
    pairs = [e for e in by_id.values() if any(x["arm"] == "candidate" for x in e)]
    assert pairs
    for events in pairs:  # the request, its answer and the shadow's, side by side
        answers = {e["arm"]: e["body"] for e in events if e["type"] == "response"}
        assert answers == {"live": {"predictions": [1]}, "candidate": {"predictions": [3]}}
    metrics = await (await client.get("/metrics")).text()
    shadow_ok = sum(
        s.value
        for f in text_string_to_metric_families(metrics)
        for s in f.samples
        if s.name == "modeld_shadow_requests_total" and s.labels["status"] == "200"
    )
    assert shadow_ok == candidate["mirrored"]


@pytest.mark.parametrize(
    ("arms", "extra", "expected"),
    [
        ('{uri = "models:/iris/1", shadow = true}', "", "no arm answers"),
        ('{uri = "models:/iris/1", weight = -1}', "", "expected a number >= 0"),
        ('{uri = "models:/iris/1"}, {uri = "models:/iris/1"}', "", "two arms named '1'"),
        ('{name = "a b", uri = "models:/iris/1"}', "", "expected letters, digits"),
        ('{uri = "models:/iris/1", colour = "red"}', "", "colour: unknown key"),
        ('{uri = "models:/iris/1"}', 'sticky = "cookie:x"', "expected header:NAME or query:NAME"),
        ('{uri = "models:/iris/1"}', 'uri = "models:/iris/2"', "give uri or arms, not both"),
    ],
)
def test_bad_arms_are_named(registry, cache_dir, tmp_path, arms, extra, expected):
    with pytest.raises(ConfigProblems, match=expected):
        arm_config(registry, cache_dir, tmp_path, arms, extra)


async def test_a_config_reload_changes_weights_and_arms_without_a_restart(
    aiohttp_client, registry, cache_dir, tmp_path
):
    from serving.app import DAEMON

    config = arm_config(
        registry, cache_dir, tmp_path,
        '{name = "one", uri = "models:/iris/1", weight = 1},'
        '{name = "two", uri = "models:/iris/2", weight = 0}',
    )  # fmt: skip
    client = await start(aiohttp_client, config)
    assert {(await predict(client))[0] for _ in range(10)} == {1}
    arm_config(  # rewrites the same file
        registry, cache_dir, tmp_path,
        '{name = "two", uri = "models:/iris/2", weight = 1},'
        '{name = "three", uri = "models:/iris/3", weight = 0}',
    )  # fmt: skip
    await client.server.app[DAEMON].reload_config()
    await all_arms_loaded(client)
    assert {(await predict(client))[0] for _ in range(10)} == {2}
    view = await (await client.get("/models/split")).json()
    assert [a["arm"] for a in view["arms"]] == ["two", "three"]
    assert (await client.post("/models/split@one/invocations", json={})).status == 404


async def test_an_arm_whose_alias_moves_swaps_like_a_route(
    aiohttp_client, registry, cache_dir, tmp_path
):
    from tests.helpers import register

    client_ = registry.client()
    register(client_, "armed", registry.models["const1"])
    register(client_, "armed", registry.models["const2"])
    client_.set_registered_model_alias("armed", "challenger", "1")
    config = arm_config(
        registry, cache_dir, tmp_path,
        '{name = "champion", uri = "models:/iris/3", weight = 1},'
        '{name = "challenger", uri = "models:/armed@challenger", weight = 1}',
        'sticky = "query:user"',
    )  # fmt: skip
    client = await start(aiohttp_client, config)
    await all_arms_loaded(client)
    split = Split.of(config.models[0])
    user = next(
        f"u{i}" for i in range(1000)
        if next(split.order(lambda s, k, i=i: f"u{i}")).config.name == "challenger"
    )  # fmt: skip
    answer, headers = await predict(client, f"/invocations?user={user}")
    assert (answer, headers["X-Model-Arm"], headers["X-Model-Version"]) == (1, "challenger", "1")
    client_.set_registered_model_alias("armed", "challenger", "2")
    refreshed = await client.post("/admin/models/split@challenger/refresh")
    assert refreshed.status == 200, await refreshed.text()
    answer, headers = await predict(client, f"/invocations?user={user}")
    assert (answer, headers["X-Model-Arm"], headers["X-Model-Version"]) == (2, "challenger", "2")
