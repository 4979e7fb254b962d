"""The fast paths of the scoring protocol give exactly what MLflow's own path gives."""

from __future__ import annotations

import json

import numpy as np
import orjson
import pytest

import loader
from serving import protocol
from tests.helpers import IRIS_COLUMNS


@pytest.fixture(scope="module")
def iris_model(registry):
    return loader.load_model(str(registry.models["iris"]))


def test_fast_frame_and_direct_predict_equal_mlflow(iris_model):
    from mlflow.pyfunc.scoring_server import _parse_json_data

    rng = np.random.default_rng(0)
    schema = iris_model.metadata.get_input_schema()
    for rows in (1, 2, 7, 100):
        values = rng.uniform(-5, 10, size=(rows, 4)).round(3).tolist()
        values[0][0] = int(values[0][0])  # JSON integers in a double column
        body = orjson.dumps({"dataframe_split": {"columns": IRIS_COLUMNS, "data": values}})
        ours = protocol.decode(body, protocol.JSON, iris_model)
        theirs = _parse_json_data(json.loads(body), iris_model.metadata, schema).data
        assert ours.conformant and ours.rows == rows
        frame = ours.model_input()
        assert frame.equals(theirs)
        assert list(frame.dtypes) == list(theirs.dtypes)
        assert frame.index.equals(theirs.index)
        direct = protocol.predict(iris_model, frame, None, conformant=True)
        assert direct.tolist() == iris_model.predict(theirs).tolist()


@pytest.mark.parametrize(
    "split",
    [
        {"columns": list(reversed(IRIS_COLUMNS)), "data": [[1, 2, 3, 4]]},
        {"columns": IRIS_COLUMNS, "data": [[1, 2, 3, None]]},
        {"columns": IRIS_COLUMNS, "data": [[1, 2, 3, True]]},
        {"columns": IRIS_COLUMNS, "data": [[1, 2, 3, "4"]]},
        {"columns": IRIS_COLUMNS, "data": [[1, 2, 3]]},
        {"columns": IRIS_COLUMNS, "index": [5], "data": [[1, 2, 3, 4]]},
    ],
)
def test_anything_unusual_takes_mlflows_path(iris_model, split):
    body = orjson.dumps({"dataframe_split": split})
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
