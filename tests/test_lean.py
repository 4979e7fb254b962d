"""The lean model call (issue 18): a scikit-learn estimator's own method on the conformant
matrix, taken only where it is proven to answer as the pyfunc path does."""

from __future__ import annotations

import asyncio
import json
import warnings

import mlflow.pyfunc
import mlflow.sklearn
import numpy as np
import pandas as pd
import pytest
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.compose import ColumnTransformer
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from loader import lean
from serving.app import DAEMON
from tests.helpers import IRIS_COLUMNS, make_config, start

X, Y = load_iris(return_X_y=True, as_frame=True)


class ArrayOnlyDiffers(ClassifierMixin, BaseEstimator):
    """Answers differently for an array than for a DataFrame: the lean call must not be taken."""

    def fit(self, X, y):
        self.feature_names_in_ = np.array(list(X.columns), dtype=object)
        self.classes_ = np.unique(y)
        return self

    def predict(self, X):
        offset = 0 if hasattr(X, "columns") else 1
        return np.full(len(X), offset, dtype=np.int64)


class WarnsOnArrays(ArrayOnlyDiffers):
    """Same answer either way, but a warning of its own on arrays."""

    def predict(self, X):
        if not hasattr(X, "columns"):
            warnings.warn("arrays are deprecated here", UserWarning, stacklevel=2)
        return np.zeros(len(X), dtype=np.int64)


class Constant(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return np.zeros(len(model_input))


def _save(path, model, **kwargs):
    if isinstance(model, mlflow.pyfunc.PythonModel):
        mlflow.pyfunc.save_model(str(path), python_model=model, input_example=X.head(2), **kwargs)
    else:
        kwargs.setdefault("serialization_format", "cloudpickle")
        mlflow.sklearn.save_model(model, str(path), input_example=X.head(2), **kwargs)
    example = json.loads((path / "serving_input_example.json").read_text())
    return mlflow.pyfunc.load_model(str(path)), example


CASES = {
    "plain": (lambda: LogisticRegression(max_iter=500).fit(X, Y), {}, "lean"),
    "proba": (
        lambda: LogisticRegression(max_iter=500).fit(X, Y),
        {"pyfunc_predict_fn": "predict_proba"},
        "lean",
    ),
    "pipeline": (
        lambda: make_pipeline(StandardScaler(), LogisticRegression()).fit(X, Y),
        {},
        "lean",
    ),
    "by-column-name": (
        lambda: make_pipeline(
            ColumnTransformer([("s", StandardScaler(), [IRIS_COLUMNS[0], IRIS_COLUMNS[3]])]),
            LogisticRegression(),
        ).fit(X, Y),
        {},
        "pyfunc",
    ),
    "fitted-without-names": (
        lambda: LogisticRegression(max_iter=500).fit(X.to_numpy(), Y),
        {"signature": mlflow.models.infer_signature(X, Y)},
        "pyfunc",
    ),
    "answers-differ": (lambda: ArrayOnlyDiffers().fit(X, Y), {}, "pyfunc"),
    "warnings-differ": (lambda: WarnsOnArrays().fit(X, Y), {}, "pyfunc"),
    "custom-pyfunc": (lambda: Constant(), {}, "pyfunc"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_decide_takes_the_lean_call_only_where_it_answers_the_same(case, tmp_path):
    build, kwargs, expected = CASES[case]
    model, example = _save(tmp_path / case, build(), **kwargs)
    decision = lean.decide(model, example)
    assert decision.name == expected, decision.reason
    if expected == "lean":
        rows = X.sample(9, random_state=1).to_numpy()
        frame = pd.DataFrame(rows, columns=IRIS_COLUMNS)
        np.testing.assert_array_equal(decision.lean(rows), model.predict(frame))


def test_decide_without_an_example_checks_rows_made_from_the_signature(tmp_path):
    model, _ = _save(tmp_path / "m", LogisticRegression(max_iter=500).fit(X, Y))
    assert lean.decide(model, None).name == "lean"
    odd, _ = _save(tmp_path / "odd", ArrayOnlyDiffers().fit(X, Y))
    assert lean.decide(odd, None).name == "pyfunc"


def test_decide_refuses_a_signature_that_is_not_all_double(tmp_path):
    ints = X.round().astype("int64")
    model, example = _save(
        tmp_path / "ints",
        LogisticRegression(max_iter=500).fit(ints, Y),
        signature=mlflow.models.infer_signature(ints, Y),
    )
    decision = lean.decide(model, example)
    assert decision.name == "pyfunc" and "double" in decision.reason


def _forms(frame: pd.DataFrame) -> list[dict]:
    """Every request form the conformant fast path reads as one matrix."""
    records = frame.to_dict(orient="records")
    return [
        {"dataframe_split": {"columns": IRIS_COLUMNS, "data": frame.values.tolist()}},
        {"dataframe_records": records},
        {"instances": records},
        {"inputs": records},
        {"inputs": {c: frame[c].tolist() for c in IRIS_COLUMNS}},
    ]


async def test_lean_answers_equal_pyfunc_for_every_form_singly_and_batched(
    aiohttp_client, registry, cache_dir, tmp_path
):
    """Through the real server: every form, 1 to 40 rows, 32 concurrent clients (so requests
    batch), each answer its own rows and equal to the pyfunc path in process (to 1e-9), for
    predict and predict_proba; status says which call each version takes; no warning is
    issued on the way."""
    plain, _ = _save(tmp_path / "plain", LogisticRegression(max_iter=500).fit(X, Y))
    proba, _ = _save(
        tmp_path / "proba",
        LogisticRegression(max_iter=500).fit(X, Y),
        pyfunc_predict_fn="predict_proba",
    )
    named, _ = _save(tmp_path / "named", CASES["by-column-name"][0]())
    config = make_config(
        registry,
        cache_dir,
        f"plain={tmp_path / 'plain'}",
        f"proba={tmp_path / 'proba'}",
        f"named={tmp_path / 'named'}",
    )
    client = await start(aiohttp_client, config)
    view = {m["name"]: m for m in (await (await client.get("/models")).json())["models"]}
    assert view["plain"]["predict_call"]["path"] == "lean"
    assert view["proba"]["predict_call"]["path"] == "lean"
    assert view["proba"]["predict_call"]["reason"].startswith("LogisticRegression.predict_proba")
    assert view["named"]["predict_call"]["path"] == "pyfunc"
    rng = np.random.default_rng(3)
    local = {"plain": plain, "proba": proba, "named": named}

    async def one(i: int):
        route = ("plain", "proba", "named")[i % 3]
        rows = 40 if i % 11 == 0 else int(rng.integers(1, 5))
        frame = pd.DataFrame(rng.uniform(0, 8, size=(rows, 4)), columns=IRIS_COLUMNS)
        payload = _forms(frame)[i % 5]
        resp = await client.post(f"/models/{route}/invocations", json=payload)
        assert resp.status == 200, await resp.text()
        return route, frame, (await resp.json())["predictions"]

    async def closed_loop(k: int):
        return [await one(32 * r + k) for r in range(6)]

    with warnings.catch_warnings(record=True) as caught:
        # Only the filters modeld installed, then every warning recorded (not pytest's).
        warnings.filters[:] = [f for f in warnings.filters if f[1] is not None]
        warnings.simplefilter("always", append=True)
        batches = await asyncio.gather(*(closed_loop(k) for k in range(32)))
    for route, frame, predictions in (r for batch in batches for r in batch):
        np.testing.assert_allclose(predictions, local[route].predict(frame), rtol=0, atol=1e-9)
    assert not [w for w in caught if "feature names" in str(w.message)], caught
    workers = client.server.app[DAEMON].dataplane.workers
    assert workers["plain"].stats.largest > 1  # batches formed on the lean path too

    # The Open Inference Protocol's tensors take the same call.
    frame = X.head(3)
    inputs = [
        {"name": c, "shape": [3], "datatype": "FP64", "data": frame[c].tolist()}
        for c in IRIS_COLUMNS
    ]
    resp = await client.post("/v2/models/proba/infer", json={"inputs": inputs})
    assert resp.status == 200, await resp.text()
    (output,) = (await resp.json())["outputs"]
    np.testing.assert_allclose(
        np.array(output["data"]).reshape(output["shape"]), proba.predict(frame), atol=1e-9
    )


class RefusesLargeValues(ArrayOnlyDiffers):
    """Same answers either way; raises on cells over 100, as a model's own check would."""

    def predict(self, X):
        if (np.asarray(X) > 100).any():
            raise ValueError("a cell is over 100")
        return np.zeros(len(X), dtype=np.int64)


async def test_a_model_error_on_the_lean_path_is_the_pyfunc_paths_400(
    aiohttp_client, registry, cache_dir, tmp_path
):
    model, example = _save(tmp_path / "m", RefusesLargeValues().fit(X, Y))
    assert lean.decide(model, example).name == "lean"
    config = make_config(registry, cache_dir, f"m={tmp_path / 'm'}")
    client = await start(aiohttp_client, config)
    data = {"columns": IRIS_COLUMNS, "data": [[1.0, 2.0, 1000.0, 4.0]]}
    resp = await client.post("/invocations", json={"dataframe_split": data})
    assert resp.status == 400
    body = await resp.json()
    assert body["error_code"] == "BAD_REQUEST"
    assert "ValueError: a cell is over 100" in body["message"]
    assert "1000" not in body["message"]  # the caller's data is not echoed
    ok = await client.post("/invocations", json={"dataframe_split": {**data, "data": [[1] * 4]}})
    assert ok.status == 200 and (await ok.json())["predictions"] == [0]
