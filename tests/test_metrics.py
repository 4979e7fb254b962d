"""/metrics in Prometheus format, parsed with prometheus-client's own parser."""

from __future__ import annotations

import mlflow.pyfunc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serving.app import DAEMON, create_app
from tests.helpers import iris_frame, make_config, split_payload, start


def samples(text):
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(found, name, **labels):
    return found.get((name, tuple(sorted(labels.items()))))


async def test_metrics_cover_requests_swaps_cache_and_models(aiohttp_client, registry, cache_dir):
    client = await start(aiohttp_client, make_config(registry, cache_dir, "models:/iris/2"))
    for _ in range(3):
        assert (await client.post("/invocations", json=split_payload(iris_frame(1)))).status == 200
    assert (await client.post("/invocations", json={"nope": 1})).status == 400
    resp = await client.get("/metrics")
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
    found = samples(await resp.text())
    assert value(found, "modeld_requests_total", model="iris", version="2", status="200") == 3
    assert value(found, "modeld_requests_total", model="iris", version="", status="400") == 1
    assert value(found, "modeld_request_duration_seconds_count", model="iris") == 4
    assert value(found, "modeld_requests_in_flight", model="iris") == 0
    assert value(found, "modeld_batch_size_count", model="iris") == 3
    assert value(found, "modeld_swaps_total", model="iris", outcome="swapped", reason="") == 1
    assert value(found, "modeld_load_duration_seconds_count", model="iris") == 1
    assert value(found, "modeld_warmup_duration_seconds_count", model="iris") == 1
    assert value(found, "modeld_registry_poll_duration_seconds_count") >= 1
    assert value(found, "modeld_registry_reachable") == 1
    assert value(found, "modeld_cache_entries") == 1 and value(found, "modeld_cache_bytes") > 0
    assert value(found, "modeld_cache_total", event="misses") == 1
    assert value(found, "modeld_dependency_mismatches", model="iris") == 0
    info = value(
        found, "modeld_model_info", route="iris", ref="models:/iris/2", version="2", stale="false"
    )
    assert info == 1


def test_worker_states_merge_into_one_view():
    """With --workers, the scrape reports every worker's state, whichever one answers: a swap
    half done shows both versions, a worker that cannot reach the registry makes it 0."""
    from prometheus_client import CollectorRegistry, generate_latest

    from serving.runtime.metrics import state_families

    states = [
        {"models": [["iris", "models:/iris@live", "3", "false", 0]], "reachable": True},
        {"models": [["iris", "models:/iris@live", "2", "false", 2]], "reachable": False},
        {"models": [["iris", "models:/iris@live", "3", "false", 0]], "reachable": True},
    ]

    class Merged:
        def collect(self):
            return state_families(states)

    registry = CollectorRegistry()
    registry.register(Merged())
    found = samples(generate_latest(registry).decode())
    infos = {k: v for k, v in found.items() if k[0] == "modeld_model_info"}
    assert sorted(dict(labels)["version"] for _, labels in infos) == ["2", "3"]
    assert value(found, "modeld_registry_reachable") == 0
    assert value(found, "modeld_dependency_mismatches", model="iris") == 2


def test_json_log_lines(capsys):
    import json
    import logging

    from serving.logsetup import setup_logging

    setup_logging("INFO", "json")
    try:
        logging.getLogger("loader.manager").info("iris: swapped %s -> %s", "iris@1", "iris@2")
        line = capsys.readouterr().err.strip().splitlines()[-1]
        entry = json.loads(line)
        assert entry["msg"] == "iris: swapped iris@1 -> iris@2"
        assert entry["level"] == "INFO" and entry["logger"] == "loader.manager" and entry["ts"]
    finally:
        logging.getLogger().handlers[:] = []
        logging.captureWarnings(False)


class SlowLoad(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        import time

        time.sleep(6)

    def predict(self, context, model_input, params=None):
        return [0] * len(model_input)


@pytest.mark.slow
async def test_metrics_and_status_answer_while_a_model_loads(
    aiohttp_client, registry, cache_dir, tmp_path
):
    """A scrape (or the status page) does not queue behind a load that takes a while."""
    import asyncio
    import time

    path = tmp_path / "slow"
    mlflow.pyfunc.save_model(str(path), python_model=SlowLoad(), pip_requirements=[])
    app = create_app(make_config(registry, cache_dir, "models:/iris/2", f"slow={path}"))
    client = await aiohttp_client(app)
    for _ in range(200):  # until the pipeline exists and the slow load is under way
        if app[DAEMON].manager is not None:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)
    for route in ("/metrics", "/"):
        started = time.monotonic()
        resp = await client.get(route)
        assert resp.status == 200 and time.monotonic() - started < 3, route
    assert (await client.get("/health")).status == 503  # still loading: the check meant it
