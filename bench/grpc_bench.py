"""gRPC against REST on the same model and load: one `modeld serve` with `--grpc-port`, iris
(1 row and 100 rows), closed loop at 1 and 32 clients, REST as `/v2` JSON and as
`/invocations` JSON, gRPC with `raw_input_contents`. Goal: gRPC at least 1.3x REST JSON at 32
clients.

    .venv/bin/python bench/grpc_bench.py [--count 3000]
    .venv/bin/python bench/grpc_bench.py --c-clients [--seconds 8]

The default clients are Python (aiohttp, grpcio's asyncio channel) in this process: on two
cores they take CPU from the server, and grpcio's client costs more per call than aiohttp's.
``--c-clients`` loads both protocols with C clients from Debian's packages instead (`wrk` for
REST, `h2load` for gRPC: HTTP/2 with the gRPC framing), and adds the ceilings each protocol
has here: the bare aiohttp server and grpcio's own servers answering a fixed response
(``bench/refservers.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import closed_loop, free_port, modeld_serve, start, stop, wait_http  # noqa: E402
from bench.env_bench import save_model  # noqa: E402
from bench.serve_bench import payload, v2_payload  # noqa: E402


def grpc_request(rows: int) -> bytes:
    import numpy as np

    from serving.codecs import messages as pb

    request = pb.ModelInferRequest(model_name="iris")
    request.inputs.add(name="x", datatype="FP64", shape=[rows, 4])
    frame = np.tile([5.1, 3.5, 1.4, 0.2], (rows, 1)).astype("<f8")
    request.raw_input_contents.append(frame.tobytes())
    return request.SerializeToString()


async def _grpc_loop(target: str, body: bytes, concurrency: int, count: int) -> float:
    import grpc

    async with grpc.aio.insecure_channel(target) as channel:
        infer = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=None,
            response_deserializer=None,
        )

        async def worker(n: int) -> None:
            for _ in range(n):
                await infer(body)

        await asyncio.gather(*(worker(20) for _ in range(concurrency)))  # warm-up
        per = max(1, count // concurrency)
        started = time.perf_counter()
        await asyncio.gather(*(worker(per) for _ in range(concurrency)))
        return per * concurrency / (time.perf_counter() - started)


def _wrk(url: str, body: bytes, clients: int, seconds: float, root: Path) -> float:
    """Requests/s of ``wrk`` POSTing ``body`` (JSON) with ``clients`` connections; every
    answer must be a 200."""
    import re
    import subprocess

    data = root / f"wrk-{len(body)}.json"
    data.write_bytes(body)
    script = root / f"wrk-{len(body)}.lua"
    script.write_text(
        'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
        f'local f = io.open("{data}", "rb")\nwrk.body = f:read("*all")\nf:close()\n'
    )
    out = subprocess.run(
        ["wrk", "-t1", f"-c{clients}", f"-d{int(seconds)}s", "-s", str(script), url],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "Non-2xx" not in out, out
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]


def _h2load(target: str, message: bytes, clients: int, seconds: float, root: Path) -> float:
    """Requests/s of ``h2load`` calling ModelInfer with ``message`` on ``clients``
    connections, one call in flight each (a closed loop, as the Python clients)."""
    import re
    import struct
    import subprocess

    framed = root / f"grpc-{len(message)}.bin"
    framed.write_bytes(b"\0" + struct.pack(">I", len(message)) + message)  # gRPC's framing
    out = subprocess.run(
        ["h2load", "-D", str(int(seconds)), "-c", str(clients), "-m", "1", "-t", "1",
         "-d", str(framed), "-H", "content-type: application/grpc", "-H", "te: trailers",
         f"http://{target}/inference.GRPCInferenceService/ModelInfer"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    done = re.search(r"(\d+) succeeded, (\d+) failed, (\d+) errored", out)
    assert done and done.group(2) == "0" and done.group(3) == "0", out
    return float(re.search(r"finished in [\d.]+s, ([\d.]+) req/s", out).group(1))  # type: ignore[union-attr]


def _grpc_answers(target: str, message: bytes) -> None:
    """One real call first: h2load counts HTTP statuses, and a gRPC error is an HTTP 200."""
    import grpc

    from serving.codecs import messages as pb

    with grpc.insecure_channel(target) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        answer = pb.ModelInferResponse.FromString(infer(message, timeout=30))
        assert answer.outputs and answer.outputs[0].name == "predict", answer


def c_clients(args: argparse.Namespace, root: Path) -> None:
    import shutil

    missing = [tool for tool in ("wrk", "h2load") if shutil.which(tool) is None]
    if missing:
        raise SystemExit(
            f"--c-clients needs {' and '.join(missing)} (apt install wrk nghttp2-client)"
        )
    refs = Path(__file__).resolve().parent / "refservers.py"
    model = save_model(root / "iris")
    port, grpc_port = free_port(), free_port()
    bare, grpc_aio, grpc_sync = free_port(), free_port(), free_port()
    cmd = modeld_serve("-m", f"iris={model}", "--port", str(port), "--grpc-port", str(grpc_port))
    procs = [
        start(cmd + ["--cache-dir", str(root / "cache")], root / "modeld.log"),
        start([sys.executable, str(refs), "bare", "--port", str(bare)], root / "bare.log"),
        start([sys.executable, str(refs), "grpc-aio", "--port", str(grpc_aio)], root / "g1.log"),
        start([sys.executable, str(refs), "grpc-sync", "--port", str(grpc_sync)], root / "g2.log"),
    ]
    print("| rows | clients | REST /invocations | REST /v2 | gRPC raw | gRPC / best REST | "
          "bare aiohttp | bare grpcio aio | bare grpcio sync |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout_s=300, proc=procs[0])
        wait_http(f"http://127.0.0.1:{bare}/ping", timeout_s=60, proc=procs[1])
        for rows in args.rows:
            message = grpc_request(rows)
            for target in (
                f"127.0.0.1:{grpc_port}",
                f"127.0.0.1:{grpc_aio}",
                f"127.0.0.1:{grpc_sync}",
            ):
                _grpc_answers(target, message)
            for clients in (1, 32):
                secs = args.seconds
                inv = _wrk(
                    f"http://127.0.0.1:{port}/invocations", payload(rows), clients, secs, root
                )
                v2 = _wrk(f"http://127.0.0.1:{port}/v2/models/iris/infer", v2_payload(rows),
                          clients, secs, root)  # fmt: skip
                g = _h2load(f"127.0.0.1:{grpc_port}", message, clients, secs, root)
                ceiling = _wrk(f"http://127.0.0.1:{bare}/invocations", payload(rows), clients,
                               secs, root)  # fmt: skip
                g_aio = _h2load(f"127.0.0.1:{grpc_aio}", message, clients, secs, root)
                g_sync = _h2load(f"127.0.0.1:{grpc_sync}", message, clients, secs, root)
                print(
                    f"| {rows} | {clients} | {inv:.0f} | {v2:.0f} | {g:.0f} | "
                    f"{g / max(inv, v2):.2f}x | {ceiling:.0f} | {g_aio:.0f} | {g_sync:.0f} |",
                    flush=True,
                )
    finally:
        for proc in procs:
            stop(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 100, 1000])
    parser.add_argument("--c-clients", action="store_true", help="wrk and h2load as clients")
    parser.add_argument("--seconds", type=float, default=8.0, help="per cell, with --c-clients")
    args = parser.parse_args()
    if args.c_clients:
        c_clients(args, Path(tempfile.mkdtemp(prefix="modeld-grpc-bench-")))
        return
    root = Path(tempfile.mkdtemp(prefix="modeld-grpc-bench-"))
    model = save_model(root / "iris")
    port, grpc_port = free_port(), free_port()
    cmd = modeld_serve("-m", f"iris={model}", "--port", str(port), "--grpc-port", str(grpc_port))
    proc = start(cmd + ["--cache-dir", str(root / "cache")], root / "modeld.log")
    base = f"http://127.0.0.1:{port}"
    print(
        "| rows | clients | REST /invocations JSON | REST /v2 JSON | gRPC raw | gRPC / best REST |"
    )
    print("|---|---|---|---|---|---|")
    try:
        wait_http(f"{base}/health", timeout_s=300, proc=proc)
        for rows in args.rows:
            for clients in (1, 32):
                count = args.count if clients > 1 else args.count // 3
                if rows >= 1000:
                    count //= 3
                inv = closed_loop(
                    f"{base}/invocations", payload(rows), concurrency=clients, count=count
                )
                v2 = closed_loop(
                    f"{base}/v2/models/iris/infer",
                    v2_payload(rows),
                    concurrency=clients,
                    count=count,
                )
                g = asyncio.run(
                    _grpc_loop(f"127.0.0.1:{grpc_port}", grpc_request(rows), clients, count)
                )
                assert inv.errors == 0 and v2.errors == 0
                best = max(inv.rps, v2.rps)
                print(
                    f"| {rows} | {clients} | {inv.rps:.0f} | {v2.rps:.0f} | {g:.0f} | "
                    f"{g / best:.2f}x |"
                )
    finally:
        stop(proc)


if __name__ == "__main__":
    main()
