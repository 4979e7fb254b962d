"""Hypothesis-generated requests against a running modeld: never a 5xx, never down."""

from __future__ import annotations

import http.client
import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import IRIS_COLUMNS, serve_modeld, wait_http

CASES = int(os.environ.get("MODELD_FUZZ_CASES", "10000"))

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=20,
)
cells = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.integers(-(10**6), 10**6),
    st.none(),
    st.text(max_size=3),
    st.booleans(),
)
frames = st.builds(
    lambda cols, rows: {"dataframe_split": {"columns": cols, "data": rows}},
    st.one_of(st.just(IRIS_COLUMNS), st.lists(st.sampled_from(IRIS_COLUMNS + ["x"]), max_size=5)),
    st.lists(st.lists(cells, min_size=0, max_size=5), max_size=4),
)
documents = st.one_of(
    frames,
    st.builds(
        lambda rows: {"dataframe_records": rows},
        st.lists(st.dictionaries(st.sampled_from(IRIS_COLUMNS), cells), max_size=3),
    ),
    st.builds(lambda v, p: {"inputs": v, "params": p}, json_values, json_values),
    st.builds(lambda v: {"instances": v}, json_values),
    st.builds(
        lambda name, v: {
            "inputs": [{"name": name, "shape": [1, 4], "datatype": "FP64", "data": v}]
        },
        st.text(max_size=5),
        st.lists(cells, max_size=5),
    ),
    st.dictionaries(st.text(max_size=10), json_values, max_size=3),
)
bodies = st.one_of(
    documents.map(lambda d: json.dumps(d).encode()),
    st.binary(max_size=300),
    st.text(max_size=100).map(str.encode),
)
content_types = st.one_of(
    st.sampled_from(
        [
            "application/json",
            "text/csv",
            "application/json; charset=utf-8",
            'APPLICATION/JSON; charset="UTF-8"',
            "application/vnd.apache.parquet",
            "text/plain",
            "",
            "application/json; format=pandas-split",
            "multipart/form-data; boundary=x",
        ]
    ),
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40),
)
paths = st.one_of(
    st.sampled_from(
        [
            "/invocations",
            "/models/iris/invocations",
            "/models/nope/invocations",
            "/v2/models/iris/infer",
            "/v2/models/iris/versions/2/infer",
            "/v2/models/iris/versions/9/infer",
            "/admin/refresh",
            "/models/iris",
            "/ping",
            "/health",
            "/version",
            "/metrics",
            "/",
            "/v2/models/iris",
        ]
    ),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz/%._-0123456789", max_size=30).map(
        lambda p: "/" + p
    ),
)


@pytest.fixture(scope="module")
def server(registry, tmp_path_factory):
    proc, url = serve_modeld(
        registry,
        tmp_path_factory.mktemp("fuzz-cache"),
        "-m",
        "models:/iris/2",
        "--log-level",
        "ERROR",
    )
    port = int(url.rsplit(":", 1)[1])
    wait_http(f"http://127.0.0.1:{port}/health", timeout_s=120, proc=proc)
    yield port, proc
    proc.terminate()
    proc.wait(timeout=30)


@pytest.mark.slow
def test_fuzzed_requests_never_get_a_5xx(server):
    port, proc = server
    conn = [http.client.HTTPConnection("127.0.0.1", port, timeout=30)]
    seen = {"count": 0, "statuses": set()}

    @settings(
        max_examples=CASES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(
        method=st.sampled_from(["POST", "POST", "POST", "GET", "PUT", "DELETE"]),
        path=paths,
        body=bodies,
        content_type=content_types,
        extra=st.dictionaries(
            st.sampled_from(
                [
                    "Content-Encoding",
                    "Authorization",
                    "Accept",
                    "Transfer-Encoding-X",
                    "X-Forwarded-For",
                ]
            ),
            st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=20),
            max_size=2,
        ),
    )
    def one(method, path, body, content_type, extra):
        headers = {**extra}
        if content_type:
            headers["Content-Type"] = content_type
        try:
            conn[0].request(method, path, body=body, headers=headers)
            resp = conn[0].getresponse()
            payload = resp.read()
        except (http.client.HTTPException, OSError):
            conn[0].close()  # the server may close a connection it refuses; never crash
            conn[0] = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            assert proc.poll() is None
            return
        seen["count"] += 1
        seen["statuses"].add(resp.status)
        assert resp.status < 500, (method, path, content_type, body[:200], payload[:300])

    one()
    assert proc.poll() is None
    assert seen["count"] >= CASES * 0.95
    assert {200, 400, 404} <= seen["statuses"]
    check = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    check.request(
        "POST",
        "/invocations",
        body=json.dumps(
            {"dataframe_split": {"columns": IRIS_COLUMNS, "data": [[5.1, 3.5, 1.4, 0.2]]}}
        ),
        headers={"Content-Type": "application/json"},
    )
    resp = check.getresponse()
    assert resp.status == 200 and json.loads(resp.read()) == {"predictions": [2]}
