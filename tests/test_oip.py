"""Open Inference Protocol v2 with a real client (tritonclient[http]) and odd requests."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import numpy as np
import pytest

import loader
from tests.helpers import IRIS_COLUMNS, iris_frame, make_config, split_payload, start


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


def _v2(inputs):
    import orjson

    return orjson.dumps({"inputs": inputs})


@pytest.mark.parametrize(
    "layout", ["columns", "columns-n1", "columns-shuffled", "one-tensor", "one-column-fp32"]
)
def test_conformant_tensors_equal_mlflows_enforced_frame(registry, layout):
    """Column tensors in the signature's dtype are read into one block whose frame is exactly
    what MLflow's schema enforcement makes of the generic frame; anything else (here FP32 for
    double columns) takes the generic path."""
    from mlflow.models.utils import _enforce_schema

    from serving.codecs import oip

    model = loader.load_model(str(registry.models["iris"]))
    schema = model.metadata.get_input_schema()
    values = np.random.default_rng(1).uniform(0, 8, size=(7, 4))
    names = list(reversed(IRIS_COLUMNS)) if layout == "columns-shuffled" else IRIS_COLUMNS
    if layout == "one-tensor":
        inputs = [
            {"name": "x", "shape": [7, 4], "datatype": "FP64", "data": values.ravel().tolist()}
        ]
    else:
        inputs = [
            {
                "name": name,
                "shape": [7, 1] if layout == "columns-n1" else [7],
                "datatype": "FP32" if layout == "one-column-fp32" and name == names[0] else "FP64",
                "data": values[:, IRIS_COLUMNS.index(name)].tolist(),
            }
            for name in names
        ]
    codec = oip.OipCodec(None)
    ours = codec.decode(_v2(inputs), model)
    tensors = {
        i["name"]: np.array(
            i["data"], dtype=np.float32 if i["datatype"] == "FP32" else np.float64
        ).reshape(i["shape"])
        for i in inputs
    }
    theirs = _enforce_schema(oip._to_model_input(tensors, schema), schema)
    if layout == "one-column-fp32":
        assert not ours.conformant
        return
    assert ours.conformant and ours.rows == 7
    frame = ours.model_input()
    assert frame.equals(theirs) and list(frame.columns) == IRIS_COLUMNS
    assert list(frame.dtypes) == list(theirs.dtypes) and frame.index.equals(theirs.index)
    handle = SimpleNamespace(route="iris", version=SimpleNamespace(version=1))
    assert codec.encode(model.predict(frame), ours, handle) == codec.encode(
        model.predict(theirs), ours, handle
    )


async def test_every_v2_failure_has_the_oip_body(aiohttp_client, registry, cache_dir):
    """Whatever fails under /v2 (no route, wrong method, a token, a body too large, a model
    not loaded), the body is {"error": ...}, never MLflow's envelope; and the rest of the
    server keeps MLflow's."""
    config = make_config(
        registry,
        cache_dir,
        "models:/iris/Production",
        "nothing=models:/iris@nobody",
        server__token="t0k",
        server__max_body_bytes=1024,
    )
    from serving.app import create_app

    client = await aiohttp_client(create_app(config))
    auth = {"Authorization": "Bearer t0k"}
    x = {"name": "x", "shape": [1, 4], "datatype": "FP64", "data": [5.1, 3.5, 1.4, 0.2]}
    for _ in range(600):  # iris loads; "nothing" never will
        if (await client.get("/models/iris")).status == 200 and (
            await (await client.get("/models/iris")).json()
        )["version"]:
            break
        await asyncio.sleep(0.05)
    cases = [
        (client.post("/v2/models/iris/infer", json={"inputs": [x]}), 401),
        (client.post("/v2/models/iris/infer", data=b"x" * 4096, headers=auth), 413),
        (client.get("/v2/models/iris/infer"), 405),
        (client.get("/v2/no/such/path"), 404),
        (client.get("/v2/models/nothing"), 503),
        (client.post("/v2/models/nothing/infer", json={"inputs": [x]}, headers=auth), 503),
        (client.post("/v2/models/iris/infer", data=b"{", headers=auth), 400),
    ]
    for request, status in cases:
        resp = await request
        assert resp.status == status, (status, await resp.text())
        assert set(await resp.json()) == {"error"}, await resp.text()
    mlflow_style = await client.post("/models/nothing/invocations", json={}, headers=auth)
    assert mlflow_style.status == 503 and set(await mlflow_style.json()) == {
        "error_code",
        "message",
    }


async def test_v2_answers_carry_the_same_version_headers(server):
    from dataclasses import replace

    from serving.app import DAEMON

    x = {"name": "x", "shape": [1, 4], "datatype": "FP64", "data": [5.1, 3.5, 1.4, 0.2]}
    route = server.server.app[DAEMON].manager.route("iris")
    route.handle = replace(route.handle, stale=True)  # as after a start with the registry down
    for path in ("/v2/models/iris/infer", "/models/iris/invocations"):
        body = {"inputs": [x]} if path.startswith("/v2") else split_payload(iris_frame(1))
        resp = await server.post(path, json=body)
        assert resp.status == 200, await resp.text()
        headers = resp.headers
        assert (headers["X-Model-Route"], headers["X-Model-Name"]) == ("iris", "iris"), path
        assert headers["X-Model-Version"] == "2" and headers["X-Model-Stale"] == "true", path
