"""The Open Inference Protocol over gRPC, with a real client (tritonclient.grpc) against the
daemon's grpc.aio server on the test server's loop."""

from __future__ import annotations

import asyncio
import os
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


def _status_of(call):
    """The gRPC status a tritonclient call ends with ("OK" when it answers)."""
    from tritonclient.utils import InferenceServerException

    try:
        call()
    except InferenceServerException as exc:
        return exc.status()
    return "OK"


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

    _, url = grpc_server
    auth = {"authorization": "Bearer s3cret"}

    def talk():
        tc = _triton(url)
        good = grpcclient.InferInput("x", [1, 4], "FP64")
        good.set_data_from_numpy(np.array([[5.1, 3.5, 1.4, 0.2]]))
        short = grpcclient.InferInput("x", [2, 4], "FP64")
        short._get_tensor().ClearField("contents")
        short._raw_content = np.zeros(3, dtype="<f8").tobytes()  # 3 elements for a [2, 4]
        codes = {
            "no token": _status_of(lambda: tc.infer("real", [good])),
            "bad shape": _status_of(lambda: tc.infer("real", [short], headers=auth)),
            "no model": _status_of(lambda: tc.infer("nope", [good], headers=auth)),
            "no version": _status_of(
                lambda: tc.infer("iris", [good], model_version="1", headers=auth)
            ),
            "unknown output": _status_of(
                lambda: tc.infer(
                    "real", [good], outputs=[grpcclient.InferRequestedOutput("nah")], headers=auth
                )
            ),
            "metadata of nothing": _status_of(lambda: tc.get_model_metadata("nope")),
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


@pytest.fixture
async def admin_grpc_server(aiohttp_client, registry, cache_dir):
    port = free_port()
    config = make_config(
        registry,
        cache_dir,
        f"real={registry.models['iris']}",
        server__grpc_port=port,
        admin__token="adm1n",
    )
    client = await start(aiohttp_client, config)
    return client, f"127.0.0.1:{port}"


async def test_tritonclient_repository_and_statistics_rpcs(admin_grpc_server, registry):
    """Triton's repository and statistics RPCs, from tritonclient.grpc, agree with REST."""
    import tritonclient.grpc as grpcclient

    http, url = admin_grpc_server
    admin = {"authorization": "Bearer adm1n"}
    x = grpcclient.InferInput("x", [2, 4], "FP64")
    x.set_data_from_numpy(iris_frame(2).to_numpy())

    def talk():
        tc = _triton(url)
        for _ in range(3):
            tc.infer("real", [x])
        out = {
            "stats": tc.get_inference_statistics("real", as_json=True),
            "all stats": tc.get_inference_statistics(as_json=True),
            "stats of nothing": _status_of(lambda: tc.get_inference_statistics("nope")),
            "index without token": _status_of(lambda: tc.get_model_repository_index()),
            "index": tc.get_model_repository_index(headers=admin, as_json=True),
        }
        tc.unload_model("real", headers=admin)
        out["after unload"] = tc.get_model_repository_index(headers=admin, as_json=True)
        out["infer unloaded"] = _status_of(lambda: tc.infer("real", [x]))
        out["unload again"] = _status_of(lambda: tc.unload_model("real", headers=admin))
        tc.load_model("real", headers=admin)  # as configured
        out["ready again"] = tc.is_model_ready("real")
        out["load unknown"] = _status_of(lambda: tc.load_model("nope", headers=admin))
        out["load with config"] = _status_of(
            lambda: tc.load_model("real", headers=admin, config='{"backend": "python"}')
        )
        tc.close()
        return out

    out = await asyncio.to_thread(talk)
    (stats,) = out["stats"]["model_stats"]
    assert stats["name"] == "real" and stats["version"] == "1"
    assert int(stats["inference_count"]) == 3
    assert int(stats["inference_stats"]["success"]["count"]) == 3
    assert int(stats["inference_stats"]["success"]["ns"]) > 0
    assert [m["name"] for m in out["all stats"]["model_stats"]] == ["real"]
    rest = await (await http.get("/v2/models/real/stats")).json()
    assert int(rest["model_stats"][0]["inference_count"]) == 3
    assert out["stats of nothing"] == "StatusCode.NOT_FOUND"
    assert out["index without token"] == "StatusCode.UNAUTHENTICATED"
    assert out["index"]["models"] == [{"name": "real", "version": "1", "state": "READY"}]
    (entry,) = out["after unload"]["models"]
    assert entry["state"] == "UNAVAILABLE" and entry["reason"] == "unloaded"
    assert out["infer unloaded"] == "StatusCode.NOT_FOUND"
    assert out["unload again"] == "StatusCode.UNAVAILABLE"
    assert out["ready again"] is True
    assert out["load unknown"] == "StatusCode.NOT_FOUND"
    assert out["load with config"] == "StatusCode.INVALID_ARGUMENT"


async def test_repository_load_of_a_ref_given_in_the_parameters(admin_grpc_server, registry):
    """A load with the ``uri`` parameter (a raw stub: tritonclient cannot send one) adds a
    route; the ``ready`` index lists only what is ready; a non-string uri is refused."""
    import grpc

    from serving.codecs import messages as pb

    _, url = admin_grpc_server
    admin = (("authorization", "Bearer adm1n"),)
    path = "/inference.GRPCInferenceService/"
    async with grpc.aio.insecure_channel(url) as channel:

        def rpc(name, message, answer):
            return channel.unary_unary(
                path + name,
                request_serializer=message.SerializeToString,
                response_deserializer=answer.FromString,
            )

        load = rpc(
            "RepositoryModelLoad", pb.RepositoryModelLoadRequest, pb.RepositoryModelLoadResponse
        )
        index = rpc("RepositoryIndex", pb.RepositoryIndexRequest, pb.RepositoryIndexResponse)
        request = pb.RepositoryModelLoadRequest(model_name="extra")
        request.parameters["uri"].string_param = "models:/iris/2"
        await load(request, metadata=admin)
        ready = await index(pb.RepositoryIndexRequest(ready=True), metadata=admin)
        bad = pb.RepositoryModelLoadRequest(model_name="other")
        bad.parameters["uri"].int64_param = 3
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await load(bad, metadata=admin)
        bad_ref = pb.RepositoryModelLoadRequest(model_name="other")
        bad_ref.parameters["uri"].string_param = "models:/"
        with pytest.raises(grpc.aio.AioRpcError) as invalid:
            await load(bad_ref, metadata=admin)
    assert {(m.name, m.version, m.state) for m in ready.models} == {
        ("real", "1", "READY"),
        ("extra", "2", "READY"),
    }
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "string_param" in refused.value.details()
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_repository_rpcs_without_an_admin_token_answer_loopback_peers_only():
    from serving.grpc.server import _is_loopback_peer

    assert _is_loopback_peer("ipv4:127.0.0.1:50051") and _is_loopback_peer("ipv6:[::1]:5")
    assert _is_loopback_peer("ipv6:%5B::1%5D:5") and _is_loopback_peer("unix:/run/m.sock")
    assert not _is_loopback_peer("ipv4:10.0.0.7:50051")
    assert not _is_loopback_peer("ipv6:[2001:db8::1]:5") and not _is_loopback_peer("")


_KSERVE_CLIENT = """
import asyncio, json, sys
import numpy as np
import kserve

async def main(url, rows):
    frame = np.array(rows, dtype=np.float64)
    auth = (("authorization", "Bearer s3cret"),)
    out = {}
    async with kserve.InferenceGRPCClient(url, retries=0) as client:
        out["live"] = await client.is_server_live()
        out["ready"] = await client.is_server_ready()
        out["model ready"] = await client.is_model_ready("real")
        x = kserve.InferInput("x", list(frame.shape), "FP64")
        x.set_data_from_numpy(frame, binary_data=True)  # raw_input_contents
        answer = await client.infer(
            kserve.InferRequest(model_name="real", infer_inputs=[x], request_id="k1"),
            headers=auth,
        )
        out["raw"] = [answer.id, answer.model_version, answer.outputs[0].name,
                      answer.outputs[0].as_numpy().tolist()]
        typed = kserve.InferInput("x", list(frame.shape), "FP64", data=frame.ravel().tolist())
        again = await client.infer(
            kserve.InferRequest(model_name="real", infer_inputs=[typed]), headers=auth
        )
        out["typed"] = again.outputs[0].as_numpy().tolist()
        try:
            await client.infer(kserve.InferRequest(model_name="real", infer_inputs=[typed]))
            out["no token"] = "answered"
        except Exception as exc:
            out["no token"] = str(exc)
    print(json.dumps(out))

asyncio.run(main(sys.argv[1], json.loads(sys.argv[2])))
"""


async def test_kserve_grpc_client(grpc_server, registry):
    """KServe's own gRPC client. It runs in a process of its own: kserve's generated messages
    and tritonclient's register the same ``inference.*`` names in protobuf's global pool, so
    the two cannot be imported into one process. kserve pins pandas < 3, so this runs in the
    MLflow 3.15 venv of .ci/matrix; elsewhere it is skipped."""
    import json

    if not os.environ.get("MODELD_KSERVE_REQUIRED"):
        found = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-c", "import kserve"], capture_output=True
        )
        if found.returncode:
            pytest.skip("kserve's client is not installed (it needs pandas < 3)")
    frame = iris_frame(3)
    expected = loader.load_model(str(registry.models["iris"])).predict(frame)
    _, url = grpc_server
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _KSERVE_CLIENT, url, json.dumps(frame.to_numpy().tolist()),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode == 0, stderr.decode()[-2000:]
    out = json.loads(stdout.decode().strip().splitlines()[-1])
    assert out["live"] and out["ready"] and out["model ready"]
    assert out["raw"] == ["k1", "1", "predict", expected.tolist()]
    assert out["typed"] == expected.tolist()
    assert "UNAUTHENTICATED" in out["no token"]


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
