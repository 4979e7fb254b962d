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
    theirs = _enforce_schema(oip.to_model_input(tensors, schema), schema)
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


# -- the protocol complete: names, binary outputs, classification, repository, statistics ----


def _save_proba(path):
    """iris with predict_proba as its pyfunc output ([N, 3] scores), and an array model over a
    single [-1, 4] tensor (for raw binary bodies)."""
    import mlflow.sklearn
    from mlflow.models import infer_signature
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    X, y = load_iris(return_X_y=True, as_frame=True)
    model = LogisticRegression(max_iter=500).fit(X, y)
    mlflow.sklearn.save_model(
        model, str(path / "proba"), pyfunc_predict_fn="predict_proba", input_example=X.head(2)
    )
    arr = LogisticRegression(max_iter=500).fit(X.to_numpy(), y)
    mlflow.sklearn.save_model(
        arr,
        str(path / "array"),
        signature=infer_signature(X.to_numpy(), arr.predict(X.to_numpy())),
    )
    return model, arr


@pytest.fixture
async def full(aiohttp_client, registry, cache_dir, tmp_path):
    model, arr = _save_proba(tmp_path)
    config = make_config(
        registry,
        cache_dir,
        f"real={registry.models['iris']}",
        f"proba={tmp_path / 'proba'}",
        f"array={tmp_path / 'array'}",
    )
    client = await start(aiohttp_client, config)
    return SimpleNamespace(client=client, proba=model, array=arr)


async def test_metadata_names_the_outputs_infer_returns(full):
    import tritonclient.http as httpclient

    frame = iris_frame(3)

    def talk():
        tc = triton(full.client)
        names = {m: [o["name"] for o in tc.get_model_metadata(m)["outputs"]] for m in ("real",)}
        x = httpclient.InferInput("x", [3, 4], "FP64")
        x.set_data_from_numpy(frame.to_numpy())
        wanted = [httpclient.InferRequestedOutput(names["real"][0], binary_data=False)]
        got = tc.infer("real", [x], outputs=wanted).as_numpy(names["real"][0])
        tc.close()
        return names, got

    names, got = await asyncio.to_thread(talk)
    assert names == {"real": ["predict"]}
    assert got.tolist() == [0, 0, 0]


async def test_binary_outputs_classification_and_raw_bodies(full):
    import tritonclient.http as httpclient

    frame = iris_frame(4)
    scores = full.proba.predict_proba(frame)

    def talk():
        tc = triton(full.client)
        x = httpclient.InferInput("x", [4, 4], "FP64")
        x.set_data_from_numpy(frame.to_numpy(), binary_data=True)
        out = [httpclient.InferRequestedOutput("predict", binary_data=True)]
        binary = tc.infer("proba", [x], outputs=out)
        top = [httpclient.InferRequestedOutput("predict", binary_data=True, class_count=2)]
        classes = tc.infer("proba", [x], outputs=top).as_numpy("predict")
        tc.close()
        return binary.as_numpy("predict"), binary.get_response(), classes

    values, response, classes = await asyncio.to_thread(talk)
    np.testing.assert_allclose(values, scores, rtol=0, atol=0)  # bytes: exactly the floats
    assert response["outputs"][0]["parameters"]["binary_data_size"] == scores.nbytes
    assert "data" not in response["outputs"][0]
    best = np.argsort(-scores, axis=1)[:, :2]
    expected = [[f"{scores[r, i]:f}:{i}" for i in row] for r, row in enumerate(best)]
    assert [[c.decode() for c in row] for row in classes] == expected

    # On the wire: the JSON header's length, then the raw tensor.
    body = {
        "inputs": [{"name": "x", "shape": [4, 4], "datatype": "FP64",
                    "data": frame.to_numpy().ravel().tolist()}],
        "outputs": [{"name": "predict", "parameters": {"binary_data": True}}],
    }  # fmt: skip
    resp = await full.client.post("/v2/models/proba/infer", json=body)
    raw = await resp.read()
    length = int(resp.headers["Inference-Header-Content-Length"])
    assert resp.content_type == "application/octet-stream"
    assert np.frombuffer(raw[length:], "<f8").reshape(4, 3).tolist() == scores.tolist()

    # A raw binary body for a one-input model: the whole body is its [-1, 4] tensor.
    matrix = frame.to_numpy()
    resp = await full.client.post(
        "/v2/models/array/infer",
        data=matrix.astype("<f8").tobytes(),
        headers={"Inference-Header-Content-Length": "0"},
    )
    assert resp.status == 200, await resp.text()
    raw = await resp.read()
    length = int(resp.headers["Inference-Header-Content-Length"])
    header = __import__("orjson").loads(raw[:length])
    assert header["outputs"][0]["name"] == "predict"
    assert header["outputs"][0]["datatype"] == "INT64"
    got = np.frombuffer(raw[length:], "<i8")
    assert got.tolist() == full.array.predict(matrix).tolist()
    resp = await full.client.post(
        "/v2/models/real/infer", data=b"\0" * 32, headers={"Inference-Header-Content-Length": "0"}
    )
    assert resp.status == 400 and "exactly one input" in (await resp.json())["error"]


async def test_server_metadata_names_its_extensions(full):
    for path in ("/v2", "/v2/"):
        meta = await (await full.client.get(path)).json()
        assert {"binary_tensor_data", "classification", "model_repository", "statistics"} <= set(
            meta["extensions"]
        )


async def test_bf16_and_strictness(full, registry):
    x = {"name": "x", "shape": [1, 4], "datatype": "FP64", "data": [5.1, 3.5, 1.4, 0.2]}
    cases = [
        ({"id": 7, "inputs": [x]}, "'id' must be a string"),
        ({"inputs": [x], "outputs": [{"name": "predict"}, {"name": "predict"}]}, "twice"),
        ({"inputs": [x], "outputs": {"name": "predict"}}, "'outputs' must be a list"),
        (
            {"inputs": [{**x, "shape": [4], "data": [[5.1, 3.5], [1.4, 0.2]]}]},
            "nested as [2, 2] for shape [4]",
        ),
    ]
    for body, words in cases:
        resp = await full.client.post("/v2/models/real/infer", json=body)
        assert resp.status == 400, body
        assert words in (await resp.json())["error"], await resp.text()
    # bfloat16: float32's top 16 bits. 5.0, 3.5, 1.5 and 0.25 are exact in it.
    values = np.array([5.0, 3.5, 1.5, 0.25], dtype=np.float32)
    bf16 = (values.view(np.uint32) >> 16).astype("<u2").tobytes()
    header = __import__("orjson").dumps(
        {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "BF16",
                     "parameters": {"binary_data_size": len(bf16)}}]}
    )  # fmt: skip
    resp = await full.client.post(
        "/v2/models/real/infer",
        data=header + bf16,
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert resp.status == 200, await resp.text()
    expected = loader.load_model(str(registry.models["iris"]))
    frame = iris_frame(1).copy()
    frame.iloc[0] = values
    assert (await resp.json())["outputs"][0]["data"] == expected.predict(frame).tolist()


async def test_protocol_parameters_are_not_model_params(full, caplog):
    x = {"name": "x", "shape": [1, 4], "datatype": "FP64", "data": [5.1, 3.5, 1.4, 0.2]}
    body = {"inputs": [x], "parameters": {"binary_data_output": False, "priority": 1}}
    with caplog.at_level("WARNING"):
        resp = await full.client.post("/v2/models/real/infer", json=body)
    assert resp.status == 200
    assert not [r for r in caplog.records if "params" in r.getMessage().lower()]


async def test_repository_and_statistics(full, registry):
    c = full.client
    x = {"name": "x", "shape": [1, 4], "datatype": "FP64", "data": [5.1, 3.5, 1.4, 0.2]}
    for _ in range(3):
        assert (await c.post("/v2/models/real/infer", json={"inputs": [x]})).status == 200
    stats = (await (await c.get("/v2/models/real/stats")).json())["model_stats"]
    assert stats[0]["name"] == "real" and stats[0]["inference_count"] == 3
    assert stats[0]["inference_stats"]["success"]["count"] == 3
    assert stats[0]["inference_stats"]["success"]["ns"] > 0 and stats[0]["last_inference"] > 0

    index = await (await c.post("/v2/repository/index")).json()
    assert {e["name"]: e["state"] for e in index}["real"] == "READY"
    assert (await c.post("/v2/repository/models/real/unload")).status == 200
    index = await (await c.post("/v2/repository/index")).json()
    assert {e["name"]: e["state"] for e in index}["real"] == "UNAVAILABLE"
    assert (await c.post("/v2/models/real/infer", json={"inputs": [x]})).status == 404
    assert (await c.post("/v2/repository/models/real/load")).status == 200  # as configured
    assert (await c.post("/v2/models/real/infer", json={"inputs": [x]})).status == 200
    load = await c.post(
        "/v2/repository/models/extra/load", json={"parameters": {"uri": "models:/iris/1"}}
    )
    assert load.status == 200 and (await load.json())["version"] == "1"
    assert (await c.post("/v2/models/extra/infer", json={"inputs": [x]})).status == 200
    unknown = await c.post("/v2/repository/models/nope/load")
    assert unknown.status == 404 and "parameters.uri" in (await unknown.json())["error"]
