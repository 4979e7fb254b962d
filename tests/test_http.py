"""The daemon over real HTTP (aiohttp test server) against the real test registry."""

from __future__ import annotations

import asyncio
import json
import time

import mlflow.pyfunc
import numpy as np
import pytest

import loader
from serving.app import DAEMON, create_app
from tests.helpers import (
    IRIS_COLUMNS,
    iris_frame,
    make_config,
    save_slow_model,
    split_payload,
    start,
)


@pytest.fixture
async def iris(aiohttp_client, registry, cache_dir):
    config = make_config(
        registry, cache_dir, "models:/iris/Production", "real=" + str(registry.models["iris"])
    )
    return await start(aiohttp_client, config)


async def test_every_input_format_matches_in_process_predict(iris, registry):
    frame = iris_frame(5)
    expected = loader.load_model(str(registry.models["iris"])).predict(frame).tolist()
    records = frame.to_dict(orient="records")
    bodies = [
        split_payload(frame),
        {"dataframe_records": records},
        {"instances": records},
        {"inputs": {c: frame[c].tolist() for c in frame.columns}},
        {"inputs": records, "params": {}},
    ]
    for body in bodies:
        resp = await iris.post("/models/real/invocations", json=body)
        assert resp.status == 200, (body, await resp.text())
        assert (await resp.json()) == {"predictions": expected}, body
    resp = await iris.post(
        "/models/real/invocations",
        data=frame.to_csv(index=False),
        headers={"Content-Type": "text/csv; charset=UTF-8"},
    )
    assert resp.status == 200
    assert (await resp.json()) == {"predictions": expected}


async def test_default_route_and_version_headers(iris):
    resp = await iris.post("/invocations", json=split_payload(iris_frame(3)))
    assert resp.status == 200
    assert (await resp.json()) == {"predictions": [2, 2, 2]}  # iris v2 answers 2
    assert resp.headers["X-Model-Name"] == "iris"
    assert resp.headers["X-Model-Version"] == "2"
    assert resp.headers["X-Model-Route"] == "iris"


async def test_probes_version_and_model_listing(iris):
    for method in ("GET", "HEAD"):
        resp = await iris.request(method, "/ping")
        assert resp.status == 200
    assert (await iris.get("/health")).status == 200
    import mlflow.version

    assert await (await iris.get("/version")).text() == mlflow.version.VERSION
    listing = await (await iris.get("/models")).json()
    names = {m["name"]: m for m in listing["models"]}
    assert set(names) == {"iris", "real"}
    iris_status = names["iris"]
    assert iris_status["version"] == 2 and iris_status["stage"] == "Production"
    assert iris_status["state"] == "loaded" and iris_status["dependency_report"]["ok"]
    for key in ("ref", "aliases", "run_id", "source", "loaded_at", "cache_path"):
        assert key in iris_status
    one = await (await iris.get("/models/iris")).json()
    assert one["name"] == "iris"
    missing = await iris.get("/models/nope")
    assert missing.status == 404
    body = await missing.json()
    assert "iris" in body["message"] and "real" in body["message"]


async def test_nan_and_infinity_are_valid_json(aiohttp_client, registry, cache_dir, tmp_path):
    import mlflow.pyfunc

    class Odd(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return np.array([np.nan, np.inf, -np.inf, 1.5])[: len(model_input)]

    path = tmp_path / "odd"
    mlflow.pyfunc.save_model(str(path), python_model=Odd(), pip_requirements=[])
    client = await start(aiohttp_client, make_config(registry, cache_dir, f"odd={path}"))
    resp = await client.post("/invocations", json={"inputs": [[1], [2], [3], [4]]})
    assert resp.status == 200
    assert json.loads(await resp.text()) == {"predictions": [None, None, None, 1.5]}


BAD_INPUTS = [
    # (description, path, body bytes, content type or None, expected status)
    ("malformed json", "/invocations", b'{"dataframe_split": ', "application/json", 400),
    ("json list", "/invocations", b"[1, 2]", "application/json", 400),
    ("json string", "/invocations", b'"x"', "application/json", 400),
    ("json number", "/invocations", b"3", "application/json", 400),
    ("json null", "/invocations", b"null", "application/json", 400),
    ("empty body", "/invocations", b"", "application/json", 400),
    ("whitespace body", "/invocations", b"   \n", "application/json", 400),
    ("no format key", "/invocations", b'{"data": [[1,2,3,4]]}', "application/json", 400),
    (
        "two format keys",
        "/invocations",
        b'{"inputs": [[1,2,3,4]], "instances": [[1,2,3,4]]}',
        "application/json",
        400,
    ),
    (
        "params not object",
        "/invocations",
        b'{"inputs": [[1,2,3,4]], "params": [1]}',
        "application/json",
        400,
    ),
    (
        "missing columns",
        "/invocations",
        b'{"dataframe_split": {"columns": ["sepal length (cm)"], "data": [[1.0]]}}',
        "application/json",
        400,
    ),
    (
        "wrong types",
        "/invocations",
        json.dumps({"dataframe_records": [dict.fromkeys(IRIS_COLUMNS, "abc")]}).encode(),
        "application/json",
        400,
    ),
    (
        "split without data",
        "/invocations",
        b'{"dataframe_split": {"columns": ["a"]}}',
        "application/json",
        400,
    ),
    ("records not a list", "/invocations", b'{"dataframe_records": 5}', "application/json", 400),
    (
        "ragged instances",
        "/invocations",
        b'{"instances": [[1,2],[1,2,3]]}',
        "application/json",
        400,
    ),
    (
        "deep nesting",
        "/invocations",
        b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        "application/json",
        400,
    ),
    ("invalid utf-8 json", "/invocations", b'{"inputs": "\xff\xfe"}', "application/json", 400),
    ("invalid utf-8 csv", "/invocations", b"a,b\n\xff,\xfe\n", "text/csv", 400),
    ("empty csv", "/invocations", b"", "text/csv", 400),
    ("csv wrong columns", "/invocations", b"x,y\n1,2\n", "text/csv", 400),
    ("csv garbage", "/invocations", b'"unterminated\n1,2', "text/csv", 400),
    ("no content type", "/invocations", b'{"inputs": [[1,2,3,4]]}', None, 415),
    ("text/plain", "/invocations", b"hello", "text/plain", 415),
    ("form", "/invocations", b"a=1", "application/x-www-form-urlencoded", 415),
    ("bad charset", "/invocations", b"{}", "application/json; charset=latin-1", 415),
    ("old protocol param", "/invocations", b"{}", "application/json; format=pandas-split", 415),
    ("malformed content type", "/invocations", b"{}", "json", 415),
    (
        "unknown model",
        "/models/nope/invocations",
        b'{"inputs": [[1,2,3,4]]}',
        "application/json",
        404,
    ),
    ("traversal model name", "/models/..%2F..%2Fetc/invocations", b"{}", "application/json", 404),
    ("unknown path", "/no/such/path", b"{}", "application/json", 404),
    ("GET invocations", "/invocations", None, None, 405),
    (
        "oversized body",
        "/invocations",
        b'{"inputs": "' + b"x" * 3_000_000 + b'"}',
        "application/json",
        413,
    ),
    ("nan literal", "/invocations", b'{"inputs": [[NaN, 1, 2, 3]]}', "application/json", 400),
    ("huge number", "/invocations", b'{"inputs": [[1e999999, 1, 2, 3]]}', "application/json", 400),
]


async def test_bad_inputs_get_4xx_json_and_server_keeps_serving(
    aiohttp_client, registry, cache_dir
):
    config = make_config(
        registry, cache_dir, "models:/iris/Production", server__max_body_bytes=2_000_000
    )
    client = await start(aiohttp_client, config)
    good = split_payload(iris_frame(1))
    for description, path, body, ctype, status in BAD_INPUTS:
        headers = {"Content-Type": ctype} if ctype else {}
        if body is None:
            resp = await client.get(path)
        else:
            resp = await client.post(
                path, data=body, headers=headers, skip_auto_headers=["Content-Type"]
            )
        text = await resp.text()
        assert resp.status == status, (description, resp.status, text[:300])
        payload = json.loads(text)
        assert set(payload) == {"error_code", "message"}, (description, payload)
        assert payload["message"], description
        assert len(text) < 2000, (description, len(text))  # never echoes the request
        after = await client.post("/invocations", json=good)
        assert after.status == 200, (description, await after.text())
    assert len(BAD_INPUTS) >= 30


@pytest.mark.slow
async def test_request_timeout_is_504(aiohttp_client, registry, cache_dir, tmp_path):
    path = save_slow_model(tmp_path / "slow", answer=1)
    config = make_config(registry, cache_dir, f"slow={path}", server__request_timeout_s=0.5)
    client = await start(aiohttp_client, config)
    resp = await client.post("/invocations", json={"inputs": [[2.0]]})
    assert resp.status == 504
    assert (await resp.json())["error_code"] == "DEADLINE_EXCEEDED"
    await asyncio.sleep(2.0)  # one predict per model at a time: let the slow one finish
    ok = await client.post("/invocations", json={"inputs": [[0.0]]})
    assert ok.status == 200


@pytest.mark.slow
async def test_predict_threads_run_a_model_that_waits_concurrently(
    aiohttp_client, registry, cache_dir, tmp_path
):
    """A model that waits (here: sleeps 0.5 s per call) with 4 predict threads answers 8
    unbatched requests in two rounds, not eight."""
    path = save_slow_model(tmp_path / "slow", answer=1)
    config = make_config(
        registry, cache_dir, f"slow={path}", server__predict_threads=4, server__max_batch_size=1
    )
    client = await start(aiohttp_client, config)
    started = time.monotonic()
    answers = await asyncio.gather(
        *(client.post("/invocations", json={"inputs": [[0.5]]}) for _ in range(8))
    )
    elapsed = time.monotonic() - started
    assert [a.status for a in answers] == [200] * 8
    assert 1.0 <= elapsed < 3.0, elapsed  # at most 4 at once; one thread would take 4 s
    assert client.server.app[DAEMON].workers["slow"].threads == 4


async def test_health_is_503_until_models_load(aiohttp_client, registry, cache_dir):
    config = make_config(
        registry, cache_dir, "models:/iris/Production", "nobody=models:/iris@nobody"
    )
    client = await aiohttp_client(create_app(config))
    for _ in range(200):
        resp = await client.get("/health")
        body = await resp.json()
        pending = body.get("not_ready")
        if isinstance(pending, dict) and "loading" not in pending.values():
            break
        await asyncio.sleep(0.05)
    assert resp.status == 503
    assert "iris" not in body["not_ready"] and "nobody" in body["not_ready"]["nobody"]
    assert (await client.post("/models/nobody/invocations", json={})).status == 503


class GcProbe(mlflow.pyfunc.PythonModel):
    """Records whether the cyclic collector ran while it was being loaded."""

    def load_context(self, context):
        import gc

        self.collector_on_at_load = gc.isenabled()

    def predict(self, context, model_input, params=None):
        return [self.collector_on_at_load] * len(model_input)


async def test_start_loads_with_the_collector_off_then_freezes(
    aiohttp_client, registry, cache_dir, tmp_path
):
    """Starting is mostly imports and loading, whose objects all live on: no collections
    meanwhile, then one freeze (no full collection pausing the first requests), and the
    collector back on."""
    import gc

    path = tmp_path / "probe"
    mlflow.pyfunc.save_model(str(path), python_model=GcProbe(), pip_requirements=[])
    gc.unfreeze()
    assert gc.isenabled() and gc.get_freeze_count() == 0
    client = await start(aiohttp_client, make_config(registry, cache_dir, f"probe={path}"))
    resp = await client.post("/invocations", json={"inputs": [[1.0]]})
    assert (await resp.json()) == {"predictions": [False]}
    assert gc.isenabled()
    assert gc.get_freeze_count() > 10_000


async def test_a_body_that_fails_to_decompress_is_a_400(iris):
    """A corrupt gzip body was a 500 INTERNAL_ERROR."""
    resp = await iris.post(
        "/invocations",
        data=b"\x1f\x8bnot really gzip",
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
    )
    assert resp.status == 400, await resp.text()
    body = await resp.json()
    assert body["error_code"] == "BAD_REQUEST" and "could not be read" in body["message"]


async def test_a_schema_error_keeps_mlflows_words_but_not_the_callers_data(iris):
    frame = iris_frame(1).rename(columns={"sepal length (cm)": "secret-column"})
    frame.iloc[0, 0] = 987654.125
    resp = await iris.post("/invocations", json=split_payload(frame))
    assert resp.status == 400
    message = (await resp.json())["message"]
    assert "Failed to enforce schema of data with schema" in message
    assert "987654" not in message, message


async def test_a_405_says_which_methods_are_allowed(iris):
    for path in ("/invocations", "/models/iris/invocations", "/v2/models/iris/infer"):
        resp = await iris.get(path)
        assert resp.status == 405 and resp.headers["Allow"] == "POST", path
        assert set(await resp.json()) in ({"error_code", "message"}, {"error"})


async def test_an_inflated_body_is_bounded_by_max_body_bytes(aiohttp_client, registry, cache_dir):
    """A small gzip body that inflates past server.max_body_bytes is a 413, like a large one."""
    import gzip

    config = make_config(registry, cache_dir, "models:/iris/2", server__max_body_bytes=100_000)
    client = await start(aiohttp_client, config)
    bomb = gzip.compress(b'{"inputs": [' + b"0, " * 1_000_000 + b"0]}")
    assert len(bomb) < 100_000
    resp = await client.post(
        "/invocations",
        data=bomb,
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
    )
    assert resp.status == 413 and (await resp.json())["error_code"] == "REQUEST_LIMIT_EXCEEDED"


async def test_compressed_bodies_are_decoded_and_unknown_encodings_refused(iris):
    """gzip, deflate (zlib and raw) and stacked encodings are decoded by modeld; an encoding
    it cannot decode is a 415 naming those it can (aiohttp passed it through as if plain)."""
    import gzip
    import zlib

    JSON = {"Content-Type": "application/json"}  # noqa: N806

    body = json.dumps(split_payload(iris_frame(2))).encode()
    raw = zlib.compressobj(9, zlib.DEFLATED, -15)
    encoded = {
        "gzip": gzip.compress(body),
        "deflate": zlib.compress(body),
        "DEFLATE": raw.compress(body) + raw.flush(),
        "deflate, gzip": gzip.compress(zlib.compress(body)),
        "identity": body,
    }
    plain = await (await iris.post("/models/real/invocations", data=body, headers=JSON)).json()
    for encoding, data in encoded.items():
        headers = {**JSON, "Content-Encoding": encoding}
        resp = await iris.post("/models/real/invocations", data=data, headers=headers)
        assert resp.status == 200, (encoding, await resp.text())
        assert await resp.json() == plain
    resp = await iris.post(
        "/models/real/invocations", data=body, headers={**JSON, "Content-Encoding": "compress"}
    )
    assert resp.status == 415
    message = (await resp.json())["message"]
    assert "'compress'" in message and "gzip" in message
    truncated = gzip.compress(body)[:-12]
    resp = await iris.post(
        "/models/real/invocations", data=truncated, headers={**JSON, "Content-Encoding": "gzip"}
    )
    assert resp.status == 400 and "could not be read" in (await resp.json())["message"]
