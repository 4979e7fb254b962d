"""Streaming: time to the first chunk and per-chunk cost through `modeld serve`, against
calling the same model's ``predict_stream`` in process (the floor). Run:

    .venv/bin/python bench/stream_bench.py [--requests 100] [--chunks 50]

The model is a pyfunc whose ``predict_stream`` yields ``--chunks`` small dicts at once, so
the figures are modeld's own cost: the request, the stream thread's hand-off to the event
loop, the encoding and the socket.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import free_port, modeld_serve, start, stop, wait_http  # noqa: E402


def save_model(path: Path) -> Path:
    import mlflow.pyfunc

    class Chunks(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return ["whole"]

        def predict_stream(self, context, model_input, params=None):
            for i in range(int(model_input["n"])):
                yield {"index": i, "delta": "word"}

    mlflow.pyfunc.save_model(str(path), python_model=Chunks(), pip_requirements=[])
    return path


def in_process(path: Path, requests: int, chunks: int) -> tuple[list[float], list[float]]:
    import mlflow.pyfunc

    model = mlflow.pyfunc.load_model(str(path))
    first, per_chunk = [], []
    for _ in range(requests):
        started = time.perf_counter()
        stream = model.predict_stream({"messages": [{"role": "user", "content": "x"}], "n": chunks})
        next(stream)
        first.append(time.perf_counter() - started)
        rest = time.perf_counter()
        count = 1 + sum(1 for _ in stream)
        per_chunk.append((time.perf_counter() - rest) / max(1, count - 1))
    return first, per_chunk


def over_http(port: int, requests: int, chunks: int) -> tuple[list[float], list[float]]:
    body = json.dumps(
        {"messages": [{"role": "user", "content": "x"}], "n": chunks, "stream": True}
    ).encode()
    first, per_chunk = [], []
    conn = http.client.HTTPConnection("127.0.0.1", port)
    for _ in range(requests):
        started = time.perf_counter()
        conn.request("POST", "/invocations", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()
        line = resp.readline()
        while not line.startswith(b"data:"):
            line = resp.readline()
        first.append(time.perf_counter() - started)
        rest = time.perf_counter()
        count = 1
        while True:
            line = resp.readline()
            if line.startswith(b"data: [DONE]"):
                break
            count += line.startswith(b"data:")
        per_chunk.append((time.perf_counter() - rest) / max(1, count - 1))
        resp.read()
    conn.close()
    return first, per_chunk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--chunks", type=int, default=50)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="modeld-stream-bench-"))
    path = save_model(root / "chunks")
    port = free_port()
    proc = start(modeld_serve("-m", str(path), "--port", str(port), "--cache-dir",
                              str(root / "cache")), root / "modeld.log")  # fmt: skip
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc=proc)
        over_http(port, 10, args.chunks)  # warm up
        http_first, http_chunk = over_http(port, args.requests, args.chunks)
    finally:
        stop(proc)
    local_first, local_chunk = in_process(path, args.requests, args.chunks)

    def ms(values: list[float]) -> float:
        return statistics.median(values) * 1000

    print("| path | first chunk p50 | per later chunk p50 |")
    print("|---|---|---|")
    print(f"| in-process `predict_stream` | {ms(local_first):.3f} ms | {ms(local_chunk):.4f} ms |")
    print(f"| modeld over HTTP (SSE) | {ms(http_first):.3f} ms | {ms(http_chunk):.4f} ms |")
    print(
        f"| added by modeld | {ms(http_first) - ms(local_first):+.3f} ms | "
        f"{ms(http_chunk) - ms(local_chunk):+.4f} ms |"
    )


if __name__ == "__main__":
    main()
