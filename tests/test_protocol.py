"""The fast paths of the scoring protocol give exactly what MLflow's own path gives."""

from __future__ import annotations

import json

import numpy as np
import orjson
import pytest

import loader
from serving.codecs import mlflow as protocol
from serving.runtime.predict import predict
from tests.helpers import IRIS_COLUMNS


@pytest.fixture(scope="module")
def iris_model(registry):
    return loader.load_model(str(registry.models["iris"]))


def forms(values: list[list[float]]) -> dict[str, dict]:
    """The same rows in every JSON form the fast path reads (records in a shuffled key order)."""
    shuffled = list(reversed(IRIS_COLUMNS))
    records = [{c: row[IRIS_COLUMNS.index(c)] for c in shuffled} for row in values]
    return {
        "split": {"dataframe_split": {"columns": IRIS_COLUMNS, "data": values}},
        "records": {"dataframe_records": records},
        "instances": {"instances": records},
        "inputs-records": {"inputs": records},
        "inputs-columns": {
            "inputs": {c: [row[j] for row in values] for j, c in enumerate(IRIS_COLUMNS)}
        },
    }


@pytest.mark.parametrize(
    "form", ["split", "records", "instances", "inputs-records", "inputs-columns"]
)
def test_fast_frame_and_direct_predict_equal_mlflow(iris_model, form):
    """What the fast path hands the model is exactly what MLflow's parser and schema
    enforcement would hand it, and the direct predict answers the same."""
    from mlflow.models.utils import _enforce_schema
    from mlflow.pyfunc.scoring_server import _parse_json_data

    rng = np.random.default_rng(0)
    schema = iris_model.metadata.get_input_schema()
    for rows in (1, 2, 7, 100):
        values = rng.uniform(-5, 10, size=(rows, 4)).round(3).tolist()
        values[0][0] = int(values[0][0])  # JSON integers in a double column
        body = orjson.dumps(forms(values)[form])
        ours = protocol.decode(body, protocol.JSON, iris_model)
        parsed = _parse_json_data(json.loads(body), iris_model.metadata, schema).data
        theirs = _enforce_schema(parsed, schema)
        assert ours.conformant and ours.rows == rows
        frame = ours.model_input()
        assert frame.equals(theirs)
        assert list(frame.columns) == list(theirs.columns) == IRIS_COLUMNS
        assert list(frame.dtypes) == list(theirs.dtypes)
        assert frame.index.equals(theirs.index)
        direct = predict(iris_model, frame, None, conformant=True)
        assert direct.tolist() == iris_model.predict(parsed).tolist()


RECORD = dict(zip(IRIS_COLUMNS, [1.0, 2.0, 3.0, 4.0], strict=True))


@pytest.mark.parametrize(
    "document",
    [
        {"dataframe_split": {"columns": list(reversed(IRIS_COLUMNS)), "data": [[1, 2, 3, 4]]}},
        {"dataframe_split": {"columns": IRIS_COLUMNS, "data": [[1, 2, 3, None]]}},
        {"dataframe_split": {"columns": IRIS_COLUMNS, "data": [[1, 2, 3, True]]}},
        {"dataframe_split": {"columns": IRIS_COLUMNS, "data": [[1, 2, 3, "4"]]}},
        {"dataframe_split": {"columns": IRIS_COLUMNS, "data": [[1, 2, 3]]}},
        {"dataframe_split": {"columns": IRIS_COLUMNS, "index": [5], "data": [[1, 2, 3, 4]]}},
        {"dataframe_split": {"columns": IRIS_COLUMNS, "data": [[1, 2, 3, 4]]}, "other": 1},
        {"dataframe_records": [{**RECORD, "extra": 1.0}]},
        {"dataframe_records": [{k: v for k, v in RECORD.items() if k != IRIS_COLUMNS[0]}]},
        {"dataframe_records": [RECORD, {**RECORD, IRIS_COLUMNS[1]: [1.0]}]},
        {"dataframe_records": [RECORD, [1.0, 2.0, 3.0, 4.0]]},
        {"dataframe_records": RECORD},
        {"instances": [{**RECORD, IRIS_COLUMNS[2]: False}]},
        {"instances": [RECORD], "inputs": [RECORD]},
        {"inputs": [[1.0, 2.0, 3.0, 4.0]]},
        {"inputs": {**{c: [1.0] for c in IRIS_COLUMNS}, IRIS_COLUMNS[3]: [1.0, 2.0]}},
        {"inputs": {c: 1.0 for c in IRIS_COLUMNS}},
        {"inputs": {c: [] for c in IRIS_COLUMNS}},
        {"inputs": {c: [1.0] for c in IRIS_COLUMNS[:3]}},
    ],
)
def test_anything_unusual_takes_mlflows_path(iris_model, document):
    body = orjson.dumps(document)
    try:
        decoded = protocol.decode(body, protocol.JSON, iris_model)
    except protocol.ProtocolError:
        return  # MLflow's own parser refused it: fine, it was not taken by the fast path
    assert not decoded.conformant


def test_encode_handles_numpy_nan_and_pandas():
    import pandas as pd

    frame = pd.DataFrame({"a": [1.0, np.nan], "b": ["x", "y"]})
    assert orjson.loads(protocol.encode(frame)) == {
        "predictions": [{"a": 1.0, "b": "x"}, {"a": None, "b": "y"}]
    }
    assert orjson.loads(protocol.encode(np.array([np.inf, 2.0]))) == {"predictions": [None, 2.0]}


@pytest.mark.parametrize(
    ("header", "mime", "params"),
    [
        ("application/json", "application/json", {}),
        ("Application/JSON; Charset=UTF-8", "application/json", {"charset": "UTF-8"}),
        ('text/csv; charset="utf-8"', "text/csv", {"charset": "utf-8"}),
        ('application/json; x="a;b"', "application/json", {"x": "a;b"}),
    ],
)
def test_content_type_parsing(header, mime, params):
    assert protocol.parse_content_type(header) == (mime, params)


def test_float32_signature_reads_the_same_as_mlflow(tmp_path):
    """An all-float (float32) signature: every JSON form gives MLflow's enforced frame."""
    import mlflow.pyfunc
    import mlflow.sklearn
    import pandas as pd
    from mlflow.models import infer_signature
    from mlflow.models.utils import _enforce_schema
    from mlflow.pyfunc.scoring_server import _parse_json_data
    from sklearn.linear_model import LinearRegression

    columns = ["a", "b"]
    train = pd.DataFrame(
        np.random.default_rng(3).random((20, 2), dtype=np.float32), columns=columns
    )
    fitted = LinearRegression().fit(train, train.a + 2 * train.b)
    path = tmp_path / "f32"
    signature = infer_signature(train, fitted.predict(train))
    mlflow.sklearn.save_model(fitted, str(path), signature=signature, pip_requirements=[])
    model = mlflow.pyfunc.load_model(str(path))
    schema = model.metadata.get_input_schema()
    rows = [[0.1, 3], [1e-8, 2.5], [16777217, -0.3]]
    records = [dict(zip(columns, row, strict=True)) for row in rows]
    documents = [
        {"dataframe_split": {"columns": columns, "data": rows}},
        {"dataframe_records": records},
        {"instances": records},
        {"inputs": {c: [row[i] for row in rows] for i, c in enumerate(columns)}},
    ]
    for document in documents:
        body = orjson.dumps(document)
        ours = protocol.decode(body, protocol.JSON, model)
        parsed = _parse_json_data(json.loads(body), model.metadata, schema).data
        frame = ours.model_input()
        assert ours.conformant
        assert frame.equals(_enforce_schema(parsed, schema))
        assert list(frame.dtypes) == [np.float32, np.float32]
        direct = predict(model, frame, None, conformant=True)
        assert direct.tolist() == model.predict(parsed).tolist()
