"""Adaptive batching through the real HTTP server: exact rows back, per-request failures."""

from __future__ import annotations

import asyncio

import mlflow.pyfunc
import pandas as pd
import pytest
from mlflow.models import infer_signature

from serving.app import DAEMON
from tests.helpers import make_config, start


class Echo(mlflow.pyfunc.PythonModel):
    """x * scale for each row, after a pause so that requests pile up behind a busy model."""

    def __init__(self, aligned: bool = True):
        self.aligned = aligned

    def predict(self, context, model_input, params=None):
        import time

        if (model_input["x"] < 0).any():
            raise ValueError("negative x")
        time.sleep(0.2)
        scale = (params or {}).get("scale", 1.0)
        out = model_input["x"] * scale
        return out if self.aligned else [float(out.sum())]


def save_echo(path, aligned=True):
    frame = pd.DataFrame({"x": [1.0, 2.0]})
    signature = infer_signature(frame, frame["x"], params={"scale": 1.0})
    mlflow.pyfunc.save_model(
        str(path), python_model=Echo(aligned), signature=signature, pip_requirements=[]
    )
    return path


@pytest.fixture
async def echo(aiohttp_client, registry, cache_dir, tmp_path):
    config = make_config(
        registry,
        cache_dir,
        f"echo={save_echo(tmp_path / 'echo')}",
        f"lump={save_echo(tmp_path / 'lump', aligned=False)}",
    )
    return await start(aiohttp_client, config)


def body(xs, scale=None):
    payload = {"dataframe_split": {"columns": ["x"], "data": [[x] for x in xs]}}
    if scale is not None:
        payload["params"] = {"scale": scale}
    return payload


def values(payload):
    """The model's output column, as MLflow renders it (records of the signature's column)."""
    if "predictions" not in payload:
        return payload
    return [r["x"] if isinstance(r, dict) else r for r in payload["predictions"]]


async def post_all(client, route, bodies):
    async def one(b):
        resp = await client.post(f"/models/{route}/invocations", json=b)
        return resp.status, values(await resp.json())

    first = asyncio.ensure_future(one(bodies[0]))
    await asyncio.sleep(0.05)  # the first request occupies the model...
    rest = await asyncio.gather(*(one(b) for b in bodies[1:]))  # ...the others queue up
    return [await first, *rest]


@pytest.mark.slow
async def test_concurrent_requests_are_batched_and_get_their_own_rows(echo):
    bodies = [body([float(i)] * (i % 3 + 1)) for i in range(1, 11)]
    answers = await post_all(echo, "echo", bodies)
    for i, (status, payload) in enumerate(answers, start=1):
        assert status == 200, payload
        assert payload == [float(i)] * (i % 3 + 1)
    stats = echo.server.app[DAEMON].workers["echo"].stats
    assert stats.requests == 10
    assert stats.calls <= 3 and stats.largest >= 5, stats


async def test_bad_request_does_not_fail_the_batch(echo):
    bodies = [
        body([1.0]),
        body([2.0]),
        {"dataframe_split": {"columns": ["y"], "data": [[1]]}},
        body([-1.0]),
        body([3.0]),
    ]
    answers = await post_all(echo, "echo", bodies)
    assert answers[0] == (200, [1.0])
    assert answers[1] == (200, [2.0])
    assert answers[2][0] == 400 and "x" in answers[2][1]["message"]
    assert answers[3][0] == 400 and "negative" in answers[3][1]["message"]
    assert answers[4] == (200, [3.0])


async def test_different_params_are_not_mixed(echo):
    bodies = [body([1.0]), body([1.0], scale=10.0), body([2.0], scale=10.0), body([2.0])]
    answers = await post_all(echo, "echo", bodies)
    assert [a[1] for a in answers] == [[1.0], [10.0], [20.0], [2.0]]


@pytest.mark.slow
async def test_output_not_row_aligned_falls_back_to_one_call_per_request(echo, caplog):
    bodies = [body([1.0, 2.0]), body([3.0]), body([4.0, 5.0])]
    answers = await post_all(echo, "lump", bodies)
    assert [a[1] for a in answers] == [[3.0], [3.0], [9.0]]
    assert "not row-aligned" in caplog.text
    again = await post_all(echo, "lump", bodies)
    assert [a[1] for a in again] == [[3.0], [3.0], [9.0]]
    assert caplog.text.count("not row-aligned") == 1


@pytest.mark.slow
async def test_closed_loop_clients_land_in_one_batch(echo, monkeypatch):
    """Clients answered by one batch come back at different times (here spread over 50 ms):
    the worker waits for as many as the last batch held (within half a predict, its cap
    raised here past the spread) instead of starting a batch with whoever came first."""
    from serving.runtime import batching

    monkeypatch.setattr(batching, "ADAPTIVE_WAIT_CAP_S", 0.3)
    clients, rounds = 6, 4

    async def client(i):
        got = []
        for r in range(rounds):
            await asyncio.sleep(0.01 * i)  # each client's own turnaround
            resp = await echo.post("/models/echo/invocations", json=body([float(10 * i + r)]))
            got.append(values(await resp.json()))
        return got

    answers = await asyncio.gather(*(client(i) for i in range(clients)))
    for i, got in enumerate(answers):
        assert got == [[float(10 * i + r)] for r in range(rounds)]
    stats = echo.server.app[DAEMON].workers["echo"].stats
    assert stats.requests == clients * rounds
    assert stats.largest == clients
    # The first round may start alone and split once; every later round is one batch.
    assert stats.calls <= rounds + 2, stats


async def test_a_lone_request_is_not_held_for_company(echo):
    """Sequential requests never wait: each is predicted as soon as it arrives."""
    import time

    t0 = time.perf_counter()
    for x in (1.0, 2.0, 3.0):
        resp = await echo.post("/models/echo/invocations", json=body([x]))
        assert values(await resp.json()) == [x]
    stats = echo.server.app[DAEMON].workers["echo"].stats
    assert stats.calls == 3 and stats.largest == 1
    assert time.perf_counter() - t0 < 3 * 0.2 + 0.15


@pytest.mark.slow
async def test_batched_answers_equal_unbatched_predict(
    aiohttp_client, registry, cache_dir, tmp_path
):
    """Many concurrent clients, each with its own rows (1 to 100, both the fast conformant path
    and MLflow's records path): every response holds exactly its request's rows, in order,
    equal to an unbatched in-process ``predict`` (floats within 1e-9 relative), and batches
    really formed."""
    import mlflow.sklearn
    import numpy as np
    from sklearn.ensemble import RandomForestRegressor

    from tests.helpers import IRIS_COLUMNS

    rng = np.random.default_rng(7)
    train = pd.DataFrame(rng.uniform(0, 8, size=(300, 4)), columns=IRIS_COLUMNS)
    forest = RandomForestRegressor(n_estimators=60, random_state=0)
    forest.fit(train, train.sum(axis=1) * 1.37 + rng.normal(size=300))
    path = tmp_path / "forest"
    mlflow.sklearn.save_model(
        forest,
        str(path),
        signature=infer_signature(train, forest.predict(train)),
        pip_requirements=[],
        skops_trusted_types=["sklearn.tree._tree.Tree"],
    )
    local = mlflow.pyfunc.load_model(str(path))
    client = await start(aiohttp_client, make_config(registry, cache_dir, f"forest={path}"))

    async def one(i):
        rows = 100 if i % 17 == 0 else int(rng.integers(1, 6))
        frame = pd.DataFrame(rng.uniform(0, 8, size=(rows, 4)).round(6), columns=IRIS_COLUMNS)
        if i % 3 == 0:
            payload = {"dataframe_records": frame.to_dict(orient="records")}
        else:
            payload = {"dataframe_split": {"columns": IRIS_COLUMNS, "data": frame.values.tolist()}}
        resp = await client.post("/models/forest/invocations", json=payload)
        assert resp.status == 200, await resp.text()
        return frame, (await resp.json())["predictions"]

    async def closed_loop(k):
        return [await one(32 * r + k) for r in range(8)]

    results = [
        pair
        for client_results in await asyncio.gather(*(closed_loop(k) for k in range(32)))
        for pair in client_results
    ]
    assert len(results) == 256
    for frame, predictions in results:
        expected = local.predict(frame)
        assert len(predictions) == len(frame)
        np.testing.assert_allclose(predictions, expected, rtol=1e-9, atol=0)
    stats = client.server.app[DAEMON].workers["forest"].stats
    assert stats.requests == 256
    assert stats.largest >= 8 and stats.calls < 256 / 2, stats
