"""``"stream": true``: the model's predict_stream as server-sent events (beyond MLflow's
scoring server), read with MLflow's own Databricks deployments client's stream parser."""

from __future__ import annotations

import asyncio
import json
import os
import time

import pytest

from tests.helpers import make_config, save_streamer, start


def save_plain(path):
    import mlflow.pyfunc

    class Plain(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return ["plain"]

    mlflow.pyfunc.save_model(str(path), python_model=Plain(), pip_requirements=[])
    return path


def parse_with_mlflow(lines):
    """MLflow's own parser of a streaming answer (its Databricks deployments client)."""
    from mlflow.deployments.databricks import DatabricksDeploymentClient

    client = DatabricksDeploymentClient.__new__(DatabricksDeploymentClient)
    client._call_endpoint_stream = lambda **_: iter(lines)
    return list(client.predict_stream(endpoint="x", inputs={}))


@pytest.fixture
async def server(aiohttp_client, registry, cache_dir, tmp_path):
    config = make_config(
        registry,
        cache_dir,
        f"words={save_streamer(tmp_path / 'words')}",
        f"plain={save_plain(tmp_path / 'plain')}",
        server__request_timeout_s=1.0,
    )
    return await start(aiohttp_client, config)


def chat(text, **extra):
    return {"messages": [{"role": "user", "content": text}], **extra}


async def read_events(resp):
    text = (await resp.read()).decode()
    return [line.strip() for line in text.splitlines() if line.strip()]


async def test_chunks_arrive_as_events_and_parse_with_mlflows_client(server):
    resp = await server.post("/models/words/invocations", json=chat("one two three", stream=True))
    assert resp.status == 200 and resp.content_type == "text/event-stream"
    assert resp.headers["X-Model-Route"] == "words" and resp.headers["X-Model-Version"] == "1"
    lines = await read_events(resp)
    assert lines[-1] == "data: [DONE]"
    chunks = parse_with_mlflow(lines)
    assert [c["delta"] for c in chunks] == ["one", "two", "three"]
    whole = await server.post("/models/words/invocations", json=chat("one two"))
    assert (await whole.json()) == {"text": "whole answer"}  # without stream: predict


async def test_an_error_mid_stream_is_an_error_event_then_done(server):
    resp = await server.post("/models/words/invocations", json=chat("ok boom", stream=True))
    lines = await read_events(resp)
    assert lines[0] == 'data: {"index":0,"delta":"ok"}'
    assert "the model broke mid-stream" in json.loads(lines[1][len("data: ") :])["error"]
    assert lines[-1] == "data: [DONE]"


async def test_a_model_without_predict_stream_is_a_400(server):
    resp = await server.post("/models/plain/invocations", json=chat("x", stream=True))
    assert resp.status == 400
    body = await resp.json()
    assert "cannot stream" in body["message"] and "predict_stream" in body["message"]
    ok = await server.post("/models/plain/invocations", json=chat("x"))
    assert ok.status == 200  # the same body without stream is an ordinary prediction


async def test_a_stalled_stream_ends_after_the_timeout(server, tmp_path, monkeypatch):
    marker = tmp_path / "closed"
    monkeypatch.setenv("MODELD_STREAM_MARKER", str(marker))
    started = time.monotonic()
    resp = await server.post("/models/words/invocations", json=chat("a slow b", stream=True))
    lines = await read_events(resp)
    assert time.monotonic() - started < 2.9  # ended at the 1 s timeout, not after the sleep
    assert lines[0] == 'data: {"index":0,"delta":"a"}'
    assert "no chunk within 1s" in lines[1] and lines[-1] == "data: [DONE]"
    for _ in range(100):  # the generator is closed once its sleep returns
        if marker.exists():
            break
        await asyncio.sleep(0.05)
    assert marker.exists()


async def test_a_caller_going_away_closes_the_generator(server, tmp_path, monkeypatch):
    marker = tmp_path / "closed"
    monkeypatch.setenv("MODELD_STREAM_MARKER", str(marker))
    words = " ".join(["w"] * 3 + ["slow"] + ["w"] * 3)
    resp = await server.post("/models/words/invocations", json=chat(words, stream=True))
    await resp.content.readline()  # the first event
    resp.close()  # the caller goes away
    for _ in range(100):
        if marker.exists():
            break
        await asyncio.sleep(0.05)
    assert marker.exists()
    assert os.environ["MODELD_STREAM_MARKER"] == str(marker)
