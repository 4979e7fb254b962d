"""Payload logging ([logging.payloads]): a real HTTP sink, real files, a dead and a stuck sink."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from serving.config import ConfigProblems
from tests.helpers import free_port, iris_frame, make_config, split_payload, start, until


class Sink:
    """A CloudEvents sink on 127.0.0.1: keeps every batch POSTed to it."""

    def __init__(self) -> None:
        self.batches: list[tuple[str, list]] = []
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                sink.batches.append((self.headers["Content-Type"], json.loads(body)))
                self.send_response(202)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/events"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def events(self) -> list[dict]:
        return [event for _, batch in self.batches for event in batch]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def sink():
    s = Sink()
    yield s
    s.close()


def body(rows: int = 1) -> dict:
    document = split_payload(iris_frame(rows))
    document["params"] = {}
    return document


async def predict_many(client, n: int, **headers: str) -> None:
    async def one(i: int) -> None:
        resp = await client.post("/invocations", json=body(), headers=headers)
        assert resp.status == 200, await resp.text()

    await asyncio.gather(*(one(i) for i in range(n)))


def scraped(text: str, name: str) -> dict[str, float]:
    return {
        next(iter(s.labels.values()), ""): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == name
    }


async def test_every_sampled_request_and_response_reach_both_sinks_with_matching_ids(
    aiohttp_client, registry, cache_dir, sink, tmp_path
):
    log_file = tmp_path / "payloads" / "events.jsonl"
    config = make_config(
        registry, cache_dir, "models:/iris/Production",
        logging__payloads__enabled=True, logging__payloads__url=sink.url,
        logging__payloads__file=str(log_file), logging__payloads__flush_interval_s=0.1,
        logging__payloads__redact_fields=["params"],
        logging__payloads__redact_headers=["X-User-Id"],
    )  # fmt: skip
    client = await start(aiohttp_client, config)
    await predict_many(client, 20, Authorization="Bearer s3cret", **{"X-User-Id": "u-7"})
    bad = await client.post(
        "/invocations", data=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert bad.status == 400
    events = await until(lambda: _at_least(sink, 42), timeout_s=20)
    assert len(events) == 42, len(events)
    assert {ctype for ctype, _ in sink.batches} == {"application/cloudevents-batch+json"}
    by_id: dict[str, dict[str, dict]] = {}
    for event in events:
        assert event["specversion"] == "1.0" and event["source"] == "modeld"
        kind = event["type"].rsplit(".", 1)[1]
        by_id.setdefault(event["id"], {})[kind] = event
        assert event["inferenceservicename"] == "iris" and event["modelname"] == "iris"
        assert event["modelversion"] == "2" and event["endpoint"] == "/invocations"
    assert all(set(pair) == {"request", "response"} for pair in by_id.values())
    answered = [p for p in by_id.values() if p["response"].get("status") == "200"]
    assert len(answered) == 20
    for pair in answered:
        request = pair["request"]["data"]
        assert request["dataframe_split"] == split_payload(iris_frame(1))["dataframe_split"]
        assert request["params"] == "<redacted>"
        assert pair["response"]["data"] == {"predictions": [2]}
    (failed,) = [p for p in by_id.values() if p["response"].get("status") != "200"]
    assert "error" in failed["response"]["data"]
    assert "not json" not in json.dumps(failed["response"])  # errors never echo the body

    # the file: the same events, one JSON document per line; secrets never written
    text = log_file.read_text()
    lines = [json.loads(line) for line in text.splitlines()]
    assert sorted((e["id"], e["type"]) for e in lines) == sorted(
        (e["id"], e["type"].rsplit(".", 1)[1]) for e in events
    )
    assert "s3cret" not in text and "u-7" not in text
    answered_ids = {p["request"]["id"] for p in answered}
    request_lines = [e for e in lines if e["type"] == "request" and e["id"] in answered_ids]
    assert len(request_lines) == 20
    assert {e["headers"]["Authorization"] for e in request_lines} == {"<redacted>"}
    assert {e["headers"]["X-User-Id"] for e in request_lines} == {"<redacted>"}
    metrics = await (await client.get("/metrics")).text()
    logged = scraped(metrics, "modeld_payload_events_logged_total")
    assert logged == {"http": 42.0, "file": 42.0}, logged


async def _at_least(sink: Sink, n: int) -> list[dict] | None:
    events = sink.events
    return events if len(events) >= n else None


async def test_a_dead_or_stuck_sink_drops_and_counts_without_failing_a_prediction(
    aiohttp_client, registry, cache_dir
):
    dead = f"http://127.0.0.1:{free_port()}/events"  # nothing listens
    config = make_config(
        registry, cache_dir, "models:/iris/Production",
        logging__payloads__enabled=True, logging__payloads__url=dead,
        logging__payloads__flush_interval_s=0.05, logging__payloads__batch_size=8,
    )  # fmt: skip
    client = await start(aiohttp_client, config)
    await predict_many(client, 30)

    async def dropped() -> float:
        metrics = await (await client.get("/metrics")).text()
        return scraped(metrics, "modeld_payload_events_dropped_total").get("sink_error", 0)

    assert await until(lambda: _equals(dropped, 60.0), timeout_s=20) == 60.0


async def _equals(read, value: float) -> float | None:
    got = await read()
    return got if got == value else None


async def test_a_stuck_sink_fills_the_queue_and_predictions_do_not_wait(
    aiohttp_client, registry, cache_dir
):
    hole = socket.socket()  # accepts connections, never answers: the sink thread waits
    hole.bind(("127.0.0.1", 0))
    hole.listen(16)
    try:
        config = make_config(
            registry, cache_dir, "models:/iris/Production",
            logging__payloads__enabled=True,
            logging__payloads__url=f"http://127.0.0.1:{hole.getsockname()[1]}/events",
            logging__payloads__queue_size=4, logging__payloads__batch_size=1,
            logging__payloads__timeout_s=30.0,
        )  # fmt: skip
        client = await start(aiohttp_client, config)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await predict_many(client, 40)
        assert loop.time() - started < 10  # nobody waited on the stuck sink's 30 s timeout
        metrics = await (await client.get("/metrics")).text()
        dropped = scraped(metrics, "modeld_payload_events_dropped_total")
        assert dropped.get("queue_full", 0) >= 80 - 4 - 2, dropped
    finally:
        hole.close()


async def test_rotation_keeps_every_line_whole(aiohttp_client, registry, cache_dir, tmp_path):
    log_file = tmp_path / "events.jsonl"
    config = make_config(
        registry, cache_dir, "models:/iris/Production",
        logging__payloads__enabled=True, logging__payloads__file=str(log_file),
        logging__payloads__file_max_bytes=2000, logging__payloads__file_backups=100,
        logging__payloads__flush_interval_s=0.05, logging__payloads__mode="request",
    )  # fmt: skip
    client = await start(aiohttp_client, config)
    await predict_many(client, 40)

    def lines() -> list[dict]:
        files = [log_file, *sorted(tmp_path.glob("events.jsonl.*"))]
        out = []
        for path in files:
            text = Path(path).read_text()
            assert len(text.encode()) <= 2000, path
            out.extend(json.loads(line) for line in text.splitlines())
        return out

    async def all_written() -> list[dict] | None:
        try:
            got = lines()
        except FileNotFoundError:  # read while the writer rotated: read again
            return None
        return got if len(got) >= 40 else None

    written = await until(all_written, timeout_s=20)
    assert len(written) == 40 and len({e["id"] for e in written}) == 40
    assert {e["type"] for e in written} == {"request"}  # mode = request
    assert len(list(tmp_path.glob("events.jsonl.*"))) >= 2


async def test_sample_zero_logs_nothing(aiohttp_client, registry, cache_dir, tmp_path):
    log_file = tmp_path / "events.jsonl"
    config = make_config(
        registry, cache_dir, "models:/iris/Production",
        logging__payloads__enabled=True, logging__payloads__file=str(log_file),
        logging__payloads__sample=0.0,
    )  # fmt: skip
    client = await start(aiohttp_client, config)
    await predict_many(client, 20)
    await client.close()  # the daemon stops: whatever was queued is written
    assert log_file.read_text() == ""


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"logging__payloads__enabled": True}, "needs a sink"),
        ({"logging__payloads__sample": 1.5}, "sample = 1.5: expected 0..1"),
        ({"logging__payloads__mode": "both"}, "expected one of all, request, response"),
        ({"logging__payloads__url": "ftp://x"}, "expected an http:// or https:// URL"),
        ({"logging__payloads__queue_size": 0}, "queue_size = 0: expected >= 1"),
    ],
)
def test_bad_payload_settings_are_named(registry, cache_dir, overrides, expected):
    with pytest.raises(ConfigProblems, match=expected):
        make_config(registry, cache_dir, "models:/iris/Production", **overrides)


def test_the_toml_table_and_the_environment_set_it(tmp_path):
    from serving.config import load_config

    path = tmp_path / "modeld.toml"
    path.write_text(
        '[logging.payloads]\nenabled = true\nfile = "/tmp/p.jsonl"\nredact_fields = ["ssn"]\n'
        '[[models]]\nuri = "models:/iris/1"\n'
    )
    config = load_config(path, env={"MODELD_LOGGING_PAYLOADS__SAMPLE": "0.25"})
    payloads = config.logging_payloads
    assert payloads.enabled and payloads.file == "/tmp/p.jsonl"
    assert payloads.redact_fields == ("ssn",) and payloads.sample == 0.25
    path.write_text('[logging.requests]\nenabled = true\n[[models]]\nuri = "models:/iris/1"\n')
    with pytest.raises(ConfigProblems, match="logging.requests: unknown section"):
        load_config(path, env={})


async def test_grpc_and_v2_predictions_are_logged_too(
    aiohttp_client, registry, cache_dir, tmp_path
):
    import base64

    import numpy as np
    import tritonclient.grpc as grpcclient

    log_file = tmp_path / "events.jsonl"
    port = free_port()
    config = make_config(
        registry, cache_dir, f"real={registry.models['iris']}", server__grpc_port=port,
        logging__payloads__enabled=True, logging__payloads__file=str(log_file),
        logging__payloads__flush_interval_s=0.05,
    )  # fmt: skip
    client = await start(aiohttp_client, config)
    frame = iris_frame(2)
    v2 = {"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP64",
                      "data": frame.to_numpy().ravel().tolist()}]}  # fmt: skip
    resp = await client.post("/v2/models/real/infer", json=v2)
    assert resp.status == 200, await resp.text()

    def call() -> None:
        tc = grpcclient.InferenceServerClient(url=f"127.0.0.1:{port}")
        x = grpcclient.InferInput("x", [2, 4], "FP64")
        x.set_data_from_numpy(frame.to_numpy())
        tc.infer("real", [x], request_id="g1")
        tc.close()

    await asyncio.to_thread(call)

    async def four() -> list[dict] | None:
        lines = [json.loads(line) for line in log_file.read_text().splitlines()]
        return lines if len(lines) >= 4 else None

    lines = await until(four, timeout_s=20)
    by_endpoint = {(e["endpoint"], e["type"]): e for e in lines}
    assert by_endpoint[("/v2/models/real/infer", "request")]["body"] == v2
    assert "outputs" in by_endpoint[("/v2/models/real/infer", "response")]["body"]
    grpc_request = by_endpoint[("grpc:ModelInfer", "request")]
    from serving.codecs.messages import ModelInferRequest

    parsed = ModelInferRequest.FromString(base64.b64decode(grpc_request["body_base64"]))
    assert parsed.id == "g1" and parsed.model_name == "real"
    assert np.frombuffer(parsed.raw_input_contents[0], np.float64).tolist() == (
        frame.to_numpy().ravel().tolist()
    )
    assert by_endpoint[("grpc:ModelInfer", "response")]["status"] == 200
