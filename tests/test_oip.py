"""Open Inference Protocol v2 with a real client (tritonclient[http]) and odd requests."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

import loader
from tests.helpers import IRIS_COLUMNS, iris_frame
from tests.test_http import make_config, start


@pytest.fixture
async def server(aiohttp_client, registry, cache_dir):
    config = make_config(
        registry, cache_dir, "models:/iris/Production", f"real={registry.models['iris']}"
    )
    return await start(aiohttp_client, config)


def triton(client):
    import tritonclient.http as httpclient

    return httpclient.InferenceServerClient(url=f"127.0.0.1:{client.server.port}")


async def test_tritonclient_health_metadata_and_infer(server, registry):
    import tritonclient.http as httpclient

    frame = iris_frame(5)
    expected = loader.load_model(str(registry.models["iris"])).predict(frame)

    def talk():
        tc = triton(server)
        assert tc.is_server_live() and tc.is_server_ready()
        assert tc.is_model_ready("real") and tc.is_model_ready("iris", model_version="2")
        assert not tc.is_model_ready("iris", model_version="1")
        meta = tc.get_model_metadata("real")
        answers = []
        for binary in (False, True):
            # one [N, 4] tensor spread over the signature's four columns
            x = httpclient.InferInput("x", [5, 4], "FP64")
            x.set_data_from_numpy(frame.to_numpy(), binary_data=binary)
            answers.append(tc.infer("real", [x]).as_numpy("predict"))
        # a named tensor per column
        columns = []
        for name in IRIS_COLUMNS:
            col = httpclient.InferInput(name, [5], "FP32")
            col.set_data_from_numpy(frame[name].to_numpy(np.float32), binary_data=True)
            columns.append(col)
        answers.append(tc.infer("real", columns, request_id="abc").as_numpy("predict"))
        tc.close()
        return meta, answers

    meta, answers = await asyncio.to_thread(talk)
    assert meta["name"] == "real" and meta["platform"] == "mlflow"
    assert [i["name"] for i in meta["inputs"]] == IRIS_COLUMNS
    assert {i["datatype"] for i in meta["inputs"]} == {"FP64"}
    for answer in answers:
        assert answer.tolist() == expected.tolist()


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/v2/models/real/infer", b"not json", 400),
        ("/v2/models/real/infer", b"{}", 400),
        ("/v2/models/real/infer", b'{"inputs": []}', 400),
        (
            "/v2/models/real/infer",
            b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP64", "data": [1]}]}',
            400,
        ),
        (
            "/v2/models/real/infer",
            b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP99", "data": [1]}]}',
            400,
        ),
        (
            "/v2/models/real/infer",
            b'{"inputs": [{"name": "x", "shape": [-1], "datatype": "FP64", "data": [1]}]}',
            400,
        ),
        (
            "/v2/models/real/infer",
            b'{"inputs": [{"name": "x", "shape": [1, 4], "datatype": '
            b'"FP64", "data": ["a", "b", "c", "d"]}]}',
            400,
        ),
        (
            "/v2/models/real/infer",
            b'{"inputs": [{"name": "sepal length (cm)", "shape": [1], '
            b'"datatype": "FP64", "data": [1.0]}]}',
            400,
        ),  # missing columns: schema refuses
        ("/v2/models/nope/infer", b"{}", 404),
        ("/v2/models/iris/versions/1/infer", b"{}", 404),
    ],
)
async def test_bad_infer_requests_get_protocol_errors(server, path, body, status):
    resp = await server.post(path, data=body, headers={"Content-Type": "application/json"})
    assert resp.status == status, await resp.text()
    payload = await resp.json()
    assert set(payload) == {"error"} and payload["error"]
    x = {"name": "x", "shape": [1, 4], "datatype": "FP64", "data": [5.1, 3.5, 1.4, 0.2]}
    ok = await server.post("/v2/models/real/infer", json={"inputs": [x]})
    assert ok.status == 200


async def test_versioned_metadata_answers_only_the_served_version(server):
    assert (await server.get("/v2/models/iris/versions/2")).status == 200
    missing = await server.get("/v2/models/iris/versions/1")
    assert missing.status == 404 and "serves version 2" in (await missing.json())["error"]
    ready = await server.get("/v2/health/ready")
    assert ready.status == 200 and (await ready.json()) == {"ready": True}
