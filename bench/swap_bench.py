"""Swap benchmark: registry change -> first response from the new version, under load.

A real `mlflow server --serve-artifacts`, `modeld serve` following `models:/iris@live`, 8 clients
in a closed loop the whole time; the alias moves between two versions and the script measures
how long until a response carries the new version, at poll intervals 1 s and 10 s and via push
(`POST /admin/models/iris/refresh` right after the move). Also failed requests (must be 0) and
modeld's RSS after 1 and after 50 swaps.

    .venv/bin/python bench/swap_bench.py [--swaps 5]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    MlflowServer,
    free_port,
    modeld_serve,
    pins,
    start,
    stop,
    tree_rss_mb,
    wait_http,
)
from bench.serve_bench import payload  # noqa: E402


def log_versions(url: str, n: int) -> None:
    import mlflow
    import mlflow.sklearn
    from mlflow import MlflowClient
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    mlflow.set_tracking_uri(url)
    mlflow.set_experiment("swap-bench")
    X, y = load_iris(return_X_y=True, as_frame=True)
    for i in range(n):
        model = LogisticRegression(C=0.1 * (i + 1), max_iter=500).fit(X, y)
        with mlflow.start_run():
            mlflow.sklearn.log_model(
                model,
                name="model",
                registered_model_name="iris",
                input_example=X.head(2),
                pip_requirements=pins(),
            )
    MlflowClient(url).set_registered_model_alias("iris", "live", "1")


async def measure(url: str, registry_url: str, *, swaps: int, push: bool, clients: int = 8):
    import aiohttp
    from mlflow import MlflowClient

    client = MlflowClient(registry_url)
    body = payload(1)
    seen: list[tuple[float, str | None, int]] = []
    stop_event = asyncio.Event()

    async with aiohttp.ClientSession() as session:

        async def load() -> None:
            for _ in range(1_000_000):  # bounded
                if stop_event.is_set():
                    return
                headers = {"Content-Type": "application/json"}
                async with session.post(f"{url}/invocations", data=body, headers=headers) as resp:
                    await resp.read()
                    seen.append(
                        (time.monotonic(), resp.headers.get("X-Model-Version"), resp.status)
                    )

        tasks = [asyncio.ensure_future(load()) for _ in range(clients)]
        latencies = []
        # Where the alias is now: an odd number of swaps in the run before left it on 2, and
        # "moving" it to 2 again timed nothing (the one 1 ms swap once reported).
        live = await asyncio.to_thread(client.get_model_version_by_alias, "iris", "live")
        current = int(live.version)
        try:
            await asyncio.sleep(1.0)
            for _ in range(swaps):
                target = 2 if current == 1 else 1
                t0 = time.monotonic()
                await asyncio.to_thread(
                    client.set_registered_model_alias, "iris", "live", str(target)
                )
                if push:
                    async with session.post(f"{url}/admin/models/iris/refresh") as resp:
                        await resp.read()
                for _ in range(60_000):  # bounded wait for the first new-version answer
                    hits = [t for t, v, _ in seen if t >= t0 and v == str(target)]
                    if hits:
                        latencies.append(hits[0] - t0)
                        break
                    await asyncio.sleep(0.005)
                current = target
                await asyncio.sleep(0.2)
        finally:
            stop_event.set()
            await asyncio.gather(*tasks)
    failed = sum(1 for _, _, status in seen if status != 200)
    return latencies, failed, len(seen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--swaps", type=int, default=5)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="modeld-swap-bench-"))
    rows = []
    try:
        with MlflowServer(root / "registry") as registry:
            log_versions(registry.url, 2)
            for label, interval, push, swaps in (
                ("poll 1 s", 1.0, False, args.swaps),
                ("poll 10 s", 10.0, False, max(2, args.swaps // 2)),
                ("push (admin refresh)", 10.0, True, 50),
            ):
                port = free_port()
                cmd = modeld_serve(
                    "-m",
                    "iris=models:/iris@live",
                    "--port",
                    str(port),
                    "--cache-dir",
                    str(root / "cache"),
                    "--poll-interval",
                    str(interval),
                )
                proc = start(
                    cmd, root / f"modeld-{port}.log", env={"MLFLOW_TRACKING_URI": registry.url}
                )
                url = f"http://127.0.0.1:{port}"
                try:
                    wait_http(f"{url}/health", proc=proc)
                    rss_first = None
                    if push:  # RSS after the first swap, then after 50
                        lat1, failed1, n1 = asyncio.run(
                            measure(url, registry.url, swaps=1, push=True)
                        )
                        rss_first = tree_rss_mb(proc.pid)
                        swaps -= 1
                    lat, failed, n = asyncio.run(measure(url, registry.url, swaps=swaps, push=push))
                    if push:
                        lat, failed, n = lat1 + lat, failed + failed1, n + n1
                    rss = tree_rss_mb(proc.pid)
                    rows.append((label, lat, failed, n, rss_first, rss))
                    print(rows[-1][:4], flush=True)
                finally:
                    stop(proc)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(
        "| trigger | swaps | swap latency p50 / max | requests during swaps | failed | RSS "
        "after 1 swap | RSS after all |"
    )
    print("|---|---|---|---|---|---|---|")
    for label, lat, failed, n, rss_first, rss in rows:
        first = f"{rss_first:.0f} MB" if rss_first else ""
        print(
            f"| {label} | {len(lat)} | {statistics.median(lat) * 1000:.0f} ms / "
            f"{max(lat) * 1000:.0f} ms | {n} | {failed} | {first} | {rss:.0f} MB |"
        )


if __name__ == "__main__":
    main()
