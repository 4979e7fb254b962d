"""Serving benchmark: `mlflow models serve` vs `modeld serve`, side by side in one run.

Builds a registry behind a local `mlflow server --serve-artifacts`, serves the same models with
both (one worker each, `--env-manager local`), drives both with the same closed-loop load
(1-row and 100-row payloads; concurrency 1, 8, 32; a fixed count after warm-up; endpoints
interleaved) and prints requests/s, p50, p99, start-to-ready, idle and peak RSS with ratios.

    .venv/bin/python bench/serve_bench.py [--count 400] [--models iris,forest]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    MlflowServer,
    closed_loop,
    free_port,
    log_models,
    start,
    stop,
    tree_rss_mb,
    wait_http,
)

COLUMNS = ["sepal length (cm)", "sepal width (cm)", "petal length (cm)", "petal width (cm)"]


def payload(rows: int) -> bytes:
    data = [[5.1 + i % 7 * 0.1, 3.5, 1.4 + i % 5 * 0.3, 0.2] for i in range(rows)]
    return json.dumps({"dataframe_split": {"columns": COLUMNS, "data": data}}).encode()


def launch(kind: str, uri: str, tracking: str, root: Path) -> dict:
    port = free_port()
    env = {"MLFLOW_TRACKING_URI": tracking}
    if kind == "mlflow":
        cmd = [
            sys.executable,
            "-m",
            "mlflow",
            "models",
            "serve",
            "-m",
            uri,
            "--env-manager",
            "local",
            "--host",
            "127.0.0.1",
            "-p",
            str(port),
            "--workers",
            "1",
        ]
    else:
        cmd = [
            sys.executable,
            "-m",
            "serving",
            "serve",
            "-m",
            uri,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--cache-dir",
            str(root / "modeld-cache"),
            "--log-level",
            "WARNING",
        ]
    t0 = time.monotonic()
    log = root / f"{kind}-{port}.log"
    proc = start(cmd, log, env=env)
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", proc=proc)
    except Exception:
        print(log.read_text(errors="replace")[-3000:], file=sys.stderr)
        raise
    ready_s = time.monotonic() - t0
    return {"proc": proc, "url": f"http://127.0.0.1:{port}/invocations", "ready_s": ready_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=400, help="requests per measurement")
    parser.add_argument("--models", default="iris,forest")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--rows", default="1,100")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="modeld-serve-bench-"))
    levels = [int(c) for c in args.concurrency.split(",")]
    row_counts = [int(r) for r in args.rows.split(",")]
    results = []
    servers_info = []
    try:
        with MlflowServer(root / "registry") as registry:
            uris = log_models(registry.url)
            for model in args.models.split(","):
                servers = {}
                for kind in ("mlflow", "modeld"):
                    servers[kind] = launch(kind, uris[model], registry.url, root)
                    time.sleep(1.0)
                    servers[kind]["idle_mb"] = tree_rss_mb(servers[kind]["proc"].pid)
                servers_info.append((model, servers))
                try:
                    for rows in row_counts:
                        body = payload(rows)
                        for c in levels:
                            count = max(args.count // (4 if rows > 1 else 1), 4 * c)
                            pair = {}
                            for kind in ("mlflow", "modeld"):  # interleaved per cell
                                pair[kind] = closed_loop(
                                    servers[kind]["url"], body, concurrency=c, count=count
                                )
                            results.append((model, rows, c, pair))
                            print(_row(model, rows, c, pair), flush=True)
                    for kind in servers:
                        servers[kind]["peak_mb"] = tree_rss_mb(servers[kind]["proc"].pid)
                finally:
                    for kind in servers:
                        stop(servers[kind]["proc"])
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print()
    print(HEADER)
    for model, rows, c, pair in results:
        print(_row(model, rows, c, pair))
    print()
    print("| model | server | start-to-ready | idle RSS | RSS after load |")
    print("|---|---|---|---|---|")
    for model, servers in servers_info:
        for kind, s in servers.items():
            print(
                f"| {model} | {kind} | {s['ready_s']:.1f} s | {s['idle_mb']:.0f} MB | "
                f"{s.get('peak_mb', float('nan')):.0f} MB |"
            )
        m, d = servers["mlflow"], servers["modeld"]
        print(
            f"| {model} | ratio modeld/mlflow | {d['ready_s'] / m['ready_s']:.2f}x | "
            f"{d['idle_mb'] / m['idle_mb']:.2f}x | |"
        )


HEADER = (
    "| model | rows | clients | mlflow req/s | modeld req/s | ratio | mlflow p50/p99 ms | "
    "modeld p50/p99 ms | p99 ratio | errors (mlflow/modeld) |\n"
    "|---|---|---|---|---|---|---|---|---|---|"
)


def _row(model, rows, c, pair) -> str:
    m, d = pair["mlflow"], pair["modeld"]
    return (
        f"| {model} | {rows} | {c} | {m.rps:.0f} | {d.rps:.0f} | {d.rps / max(m.rps, 1e-9):.2f}x"
        f" | {m.p50:.1f} / {m.pct(0.99):.1f} | {d.p50:.1f} / {d.pct(0.99):.1f} | "
        f"{d.pct(0.99) / max(m.pct(0.99), 1e-9):.2f}x | {m.errors}/{d.errors} |"
    )


if __name__ == "__main__":
    main()
