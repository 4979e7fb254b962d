"""The Open Inference Protocol over gRPC, with a real client (tritonclient.grpc) against the
daemon's grpc.aio server on the test server's loop."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import loader
from tests.helpers import (
    IRIS_COLUMNS,
    free_port,
    iris_frame,
    make_config,
    modeld,
    save_slow_model,
    self_signed,
    start,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
async def grpc_server(aiohttp_client, registry, cache_dir):
    port = free_port()
    config = make_config(
        registry,
        cache_dir,
        "models:/iris/Production",
        f"real={registry.models['iris']}",
        server__grpc_port=port,
        server__token="s3cret",
    )
    client = await start(aiohttp_client, config)
    return client, f"127.0.0.1:{port}"


def _triton(url):
    import tritonclient.grpc as grpcclient

    return grpcclient.InferenceServerClient(url=url)


async def test_tritonclient_grpc_health_metadata_and_infer(grpc_server, registry):
    import tritonclient.grpc as grpcclient

    _, url = grpc_server
    frame = iris_frame(5)
    expected = loader.load_model(str(registry.models["iris"])).predict(frame)
    auth = {"authorization": "Bearer s3cret"}

    def talk():
        tc = _triton(url)
        assert tc.is_server_live() and tc.is_server_ready()
        assert tc.is_model_ready("real") and tc.is_model_ready("iris", model_version="2")
        assert not tc.is_model_ready("iris", model_version="1")
        assert not tc.is_model_ready("nope")
        meta = tc.get_model_metadata("real", as_json=True)
        server = tc.get_server_metadata(as_json=True)
        x = grpcclient.InferInput("x", [5, 4], "FP64")
        x.set_data_from_numpy(frame.to_numpy())  # raw_input_contents
        one = tc.infer("real", [x], headers=auth, request_id="r1")
        columns = []
        for name in IRIS_COLUMNS:
            col = grpcclient.InferInput(name, [5], "FP32")
            col.set_data_from_numpy(frame[name].to_numpy(np.float32))
            columns.append(col)
        out = [grpcclient.InferRequestedOutput("predict", class_count=1)]
        classes = tc.infer("real", columns, outputs=out, headers=auth).as_numpy("predict")
        tc.close()
        return meta, server, one, classes

    meta, server, one, classes = await asyncio.to_thread(talk)
    assert meta["name"] == "real" and [i["name"] for i in meta["inputs"]] == IRIS_COLUMNS
    assert [o["name"] for o in meta["outputs"]] == ["predict"]
    assert "binary_tensor_data" in server["extensions"]
    assert one.as_numpy("predict").tolist() == expected.tolist()
    assert one.get_response().id == "r1" and one.get_response().model_version == "1"
    assert [row[0].decode().split(":")[0] for row in classes] == [str(v) for v in expected]


async def test_grpc_errors_are_status_codes_never_unknown(grpc_server):
    import grpc
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    _, url = grpc_server
    auth = {"authorization": "Bearer s3cret"}

    def status_of(call):
        try:
            call()
        except InferenceServerException as exc:
            return exc.status()
        return "OK"

    def talk():
        tc = _triton(url)
        good = grpcclient.InferInput("x", [1, 4], "FP64")
        good.set_data_from_numpy(np.array([[5.1, 3.5, 1.4, 0.2]]))
        short = grpcclient.InferInput("x", [2, 4], "FP64")
        short._get_tensor().ClearField("contents")
        short._raw_content = np.zeros(3, dtype="<f8").tobytes()  # 3 elements for a [2, 4]
        codes = {
            "no token": status_of(lambda: tc.infer("real", [good])),
            "bad shape": status_of(lambda: tc.infer("real", [short], headers=auth)),
            "no model": status_of(lambda: tc.infer("nope", [good], headers=auth)),
            "no version": status_of(
                lambda: tc.infer("iris", [good], model_version="1", headers=auth)
            ),
            "unknown output": status_of(
                lambda: tc.infer(
                    "real", [good], outputs=[grpcclient.InferRequestedOutput("nah")], headers=auth
                )
            ),
            "metadata of nothing": status_of(lambda: tc.get_model_metadata("nope")),
        }
        ok = tc.infer("real", [good], headers=auth).as_numpy("predict").tolist()
        tc.close()
        return codes, ok

    codes, ok = await asyncio.to_thread(talk)
    assert codes == {
        "no token": "StatusCode.UNAUTHENTICATED",
        "bad shape": "StatusCode.INVALID_ARGUMENT",
        "no model": "StatusCode.NOT_FOUND",
        "no version": "StatusCode.NOT_FOUND",
        "unknown output": "StatusCode.INVALID_ARGUMENT",
        "metadata of nothing": "StatusCode.NOT_FOUND",
    }
    assert ok == [0]  # and the server answers as before
    del grpc


async def test_version_headers_come_as_trailing_metadata(grpc_server):
    import grpc

    from serving.codecs import messages as pb

    _, url = grpc_server
    request = pb.ModelInferRequest(model_name="iris")
    x = request.inputs.add(name="x", datatype="FP64", shape=[1, 4])
    x.contents.fp64_contents.extend([5.1, 3.5, 1.4, 0.2])
    async with grpc.aio.insecure_channel(url) as channel:
        infer = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelInferResponse.FromString,
        )
        call = infer(request, metadata=(("authorization", "Bearer s3cret"),))
        answer = await call
        trailing = dict(await call.trailing_metadata())
    assert answer.outputs[0].name == "predict" and answer.model_version == "2"
    assert np.frombuffer(answer.raw_output_contents[0], "<i8").tolist() == [2]  # const2
    assert trailing["x-model-route"] == "iris" and trailing["x-model-version"] == "2"


def test_the_checked_in_descriptor_matches_the_proto(tmp_path):
    """serving/codecs/inference.desc is compiled from inference.proto: compile again and
    compare, so the two never drift."""
    out = tmp_path / "inference.desc"
    proc = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I.", f"--descriptor_set_out={out}",
         "serving/codecs/inference.proto"],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == (ROOT / "serving/codecs/inference.desc").read_bytes()


@pytest.mark.slow
def test_tls_token_and_sigterm_drain_of_an_in_flight_call(registry, tmp_path):
    """`modeld serve --grpc-port` with TLS: a call in flight when SIGTERM comes is answered,
    then modeld exits cleanly."""
    import signal
    import threading

    import tritonclient.grpc as grpcclient

    cert, key = self_signed(tmp_path)
    slow = save_slow_model(tmp_path / "slow", answer=7)
    port, grpc_port = free_port(), free_port()
    proc = modeld(
        "serve", "-m", f"slow={slow}", "--port", str(port), "--grpc-port", str(grpc_port),
        "--ssl-certfile", str(cert), "--ssl-keyfile", str(key), "--cache-dir",
        str(tmp_path / "cache"), env={"MODELD_SERVER__TOKEN": "t"},
    )  # fmt: skip
    try:
        import ssl
        import urllib.request

        context = ssl.create_default_context(cafile=str(cert))
        for _ in range(600):
            try:
                with urllib.request.urlopen(
                    f"https://127.0.0.1:{port}/health", context=context, timeout=2
                ) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.1)
        tc = grpcclient.InferenceServerClient(
            url=f"127.0.0.1:{grpc_port}", ssl=True, root_certificates=str(cert)
        )
        x = grpcclient.InferInput("x", [1], "FP64")
        x.set_data_from_numpy(np.array([2.0]))  # the slow model sleeps 2 s
        result: dict = {}

        def call():
            try:
                result["answer"] = tc.infer("slow", [x], headers={"authorization": "Bearer t"})
            except Exception as exc:  # reported below
                result["error"] = exc

        caller = threading.Thread(target=call)
        caller.start()
        time.sleep(0.7)  # the call is in flight
        proc.send_signal(signal.SIGTERM)
        caller.join(timeout=30)
        assert "error" not in result, result
        assert result["answer"].as_numpy("predict").tolist() == [7]
        assert proc.wait(timeout=30) == 0
        tc.close()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
