"""gRPC against REST on the same model and load: one `modeld serve` with `--grpc-port`, iris
(1 row and 100 rows), closed loop at 1 and 32 clients, REST as `/v2` JSON and as
`/invocations` JSON, gRPC with `raw_input_contents`. Goal: gRPC at least 1.3x REST JSON at 32
clients.

    .venv/bin/python bench/grpc_bench.py [--count 3000]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 100, 1000])
    args = parser.parse_args()
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
