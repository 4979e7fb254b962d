"""Serving benchmark: `mlflow models serve` vs `modeld serve`, side by side in one run.

Builds a registry behind a local `mlflow server --serve-artifacts`, serves the same models with
both (one worker each, `--env-manager local`), drives both with the same closed-loop load
(1-row and 100-row payloads; concurrency 1, 8, 32; a fixed count after warm-up; endpoints
interleaved) and prints requests/s, p50, p99, the in-process floor (one ``pyfunc.predict`` call
on the same rows), start-to-ready (the median of ``--starts`` cold starts each, and of as many
modeld restarts on a warm cache), idle and peak RSS with ratios. Beside them, the two ceilings
of ``bench/refservers.py`` (issue 18): a bare aiohttp server answering a constant and a naive
ten-line handler (orjson, the estimator on a NumPy array, no checks), with modeld's ratio to each.

    .venv/bin/python bench/serve_bench.py [--count 400] [--models iris,forest] [--mlserver]

With ``--mlserver`` it also runs MLServer + mlserver-mlflow, without and with adaptive batching
(32 requests / 5 ms), driven through its V2 endpoint with the same rows (its batching does not
apply to its /invocations), from its own venv (``.venv-mlserver``, created on first use with
the same mlflow, scikit-learn and skops versions: MLServer pins an older FastAPI than mlflow's).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
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
    modeld_serve,
    start,
    stop,
    tree_rss_mb,
    wait_http,
)

REFS = Path(__file__).resolve().parent / "refservers.py"
#: What no server on aiohttp beats (bare) and what anyone writes for one model (naive).
CEILINGS = ("bare", "naive")
COLUMNS = ["sepal length (cm)", "sepal width (cm)", "petal length (cm)", "petal width (cm)"]


def v2_payload(rows: int) -> bytes:
    """The same rows as an Open Inference Protocol request (a tensor per column, decoded as a
    DataFrame): MLServer's adaptive batching only applies to its V2 endpoint."""
    data = [[5.1 + i % 7 * 0.1, 3.5, 1.4 + i % 5 * 0.3, 0.2] for i in range(rows)]
    inputs = [
        {"name": col, "shape": [rows], "datatype": "FP64", "data": [r[j] for r in data]}
        for j, col in enumerate(COLUMNS)
    ]
    return json.dumps({"parameters": {"content_type": "pd"}, "inputs": inputs}).encode()


def payload(rows: int) -> bytes:
    data = [[5.1 + i % 7 * 0.1, 3.5, 1.4 + i % 5 * 0.3, 0.2] for i in range(rows)]
    return json.dumps({"dataframe_split": {"columns": COLUMNS, "data": data}}).encode()


MLSERVER_VENV = Path(__file__).resolve().parent.parent / ".venv-mlserver"


def mlserver_python() -> Path:
    """MLServer's own venv, created on first use."""
    import importlib.metadata as md
    import subprocess

    python = MLSERVER_VENV / "bin" / "python"
    if not (MLSERVER_VENV / "bin" / "mlserver").exists():
        subprocess.run([sys.executable, "-m", "venv", str(MLSERVER_VENV)], check=True)
        pins = [f"{n}=={md.version(n)}" for n in ("mlflow", "scikit-learn", "skops")]
        # MLServer 1.7 breaks with uvloop >= 0.22 ("no current event loop"): pin it below.
        packages = ["mlserver", "mlserver-mlflow", "uvloop<0.22", *pins]
        subprocess.run([str(python), "-m", "pip", "install", "-q", *packages], check=True)
    return python


def mlserver_settings(root: Path, name: str, uri: str, tracking: str, batching: bool) -> Path:
    """A model repository for MLServer: settings.json + model-settings.json."""
    import mlflow.artifacts

    folder = root / f"mlserver-{name}-{'batch' if batching else 'plain'}"
    folder.mkdir(parents=True, exist_ok=True)
    local = mlflow.artifacts.download_artifacts(
        uri, tracking_uri=tracking, dst_path=str(folder / "model")
    )
    model = {
        "name": name,
        "implementation": "mlserver_mlflow.MLflowRuntime",
        "parameters": {"uri": local},
    }
    if batching:
        model.update(max_batch_size=32, max_batch_time=0.005)
    (folder / "model-settings.json").write_text(json.dumps(model))
    return folder


def launch(kind: str, uri: str, tracking: str, root: Path) -> dict:
    port = free_port()
    env = {"MLFLOW_TRACKING_URI": tracking}
    if kind in CEILINGS:
        cmd = [sys.executable, str(REFS), kind, "--port", str(port), "--model-uri", uri]
    elif kind.startswith("mlserver"):
        folder = mlserver_settings(root, uri.split("/")[1], uri, tracking, kind.endswith("batch"))
        settings = {
            "http_port": port,
            "grpc_port": free_port(),
            "metrics_port": free_port(),
            "host": "127.0.0.1",
        }
        (folder / "settings.json").write_text(json.dumps(settings))
        cmd = [str(mlserver_python().parent / "mlserver"), "start", str(folder)]
    elif kind == "mlflow":
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
        cmd = modeld_serve(
            "-m", uri, "--port", str(port), "--cache-dir", str(root / "modeld-cache")
        )
    t0 = time.monotonic()
    ready = "/v2/health/ready" if kind.startswith("mlserver") else "/ping"
    log = root / f"{kind}-{port}.log"
    proc = start(cmd, log, env=env)
    try:
        wait_http(f"http://127.0.0.1:{port}{ready}", proc=proc)
    except Exception:
        print(log.read_text(errors="replace")[-3000:], file=sys.stderr)
        raise
    ready_s = time.monotonic() - t0
    if kind.startswith("mlserver"):
        name = uri.split("/")[1]
        url = f"http://127.0.0.1:{port}/v2/models/{name}/infer"
    else:
        url = f"http://127.0.0.1:{port}/invocations"
    return {"proc": proc, "url": url, "ready_s": ready_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=400, help="requests per measurement")
    parser.add_argument("--models", default="iris,forest")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--rows", default="1,100")
    parser.add_argument("--mlserver", action="store_true", help="also run MLServer (own venv)")
    parser.add_argument(
        "--starts", type=int, default=5, help="cold starts of mlflow and modeld (median kept)"
    )
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="modeld-serve-bench-"))
    levels = [int(c) for c in args.concurrency.split(",")]
    row_counts = [int(r) for r in args.rows.split(",")]
    results = []
    servers_info = []
    floors: list[tuple[str, int, float]] = []
    try:
        with MlflowServer(root / "registry") as registry:
            uris = log_models(registry.url)
            for model in args.models.split(","):
                floors.extend(
                    (model, rows, in_process_floor(uris[model], registry.url, rows))
                    for rows in row_counts
                )
                servers = {}
                kinds = [*CEILINGS, "mlflow", "modeld"]
                if args.mlserver:
                    kinds[-1:-1] = ["mlserver", "mlserver-batch"]
                for kind in kinds:
                    servers[kind] = launch(kind, uris[model], registry.url, root)
                    time.sleep(1.0)
                    servers[kind]["idle_mb"] = tree_rss_mb(servers[kind]["proc"].pid)
                servers_info.append((model, servers))
                try:
                    for rows in row_counts:
                        body, body_v2 = payload(rows), v2_payload(rows)
                        for c in levels:
                            count = max(args.count // (4 if rows > 1 else 1), 4 * c)
                            pair = {}
                            for kind in kinds:  # interleaved per cell
                                pair[kind] = closed_loop(
                                    servers[kind]["url"],
                                    body_v2 if kind.startswith("mlserver") else body,
                                    concurrency=c,
                                    count=count,
                                )
                            results.append((model, rows, c, pair))
                            print(_row(model, rows, c, pair), flush=True)
                    for kind in servers:
                        servers[kind]["peak_mb"] = tree_rss_mb(servers[kind]["proc"].pid)
                finally:
                    for kind in servers:
                        stop(servers[kind]["proc"])
                measure_starts(servers, uris[model], registry.url, root, args.starts)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print()
    print(header(list(results[0][3]) if results else ["mlflow", "modeld"]))
    for model, rows, c, pair in results:
        print(_row(model, rows, c, pair))
    print()
    print("| model | rows | in-process `pyfunc.predict` | modeld p50 at 1 client | overhead |")
    print("|---|---|---|---|---|")
    for model, rows, floor_ms in floors:
        cell = next((p for m, r, c, p in results if (m, r, c) == (model, rows, 1)), None)
        p50 = cell["modeld"].p50 if cell else float("nan")
        print(f"| {model} | {rows} | {floor_ms:.2f} ms | {p50:.2f} ms | {p50 - floor_ms:+.2f} ms |")
    print()
    print("| model | server | start-to-ready (median) | starts | idle RSS | RSS after load |")
    print("|---|---|---|---|---|---|")
    for model, servers in servers_info:
        for kind, srv in servers.items():
            if kind in CEILINGS:
                continue
            starts = srv["starts"]
            print(
                f"| {model} | {kind} | {statistics.median(starts):.1f} s | "
                f"{' '.join(f'{t:.1f}' for t in starts)} | {srv['idle_mb']:.0f} MB | "
                f"{srv.get('peak_mb', float('nan')):.0f} MB |"
            )
        m, d = servers["mlflow"], servers["modeld"]
        mlflow_s = statistics.median(m["starts"])
        print(
            f"| {model} | ratio modeld/mlflow | {statistics.median(d['starts']) / mlflow_s:.2f}x "
            f"| | {d['idle_mb'] / m['idle_mb']:.2f}x | |"
        )
        warm = d["restarts"]
        print(
            f"| {model} | modeld restart (cache warm) | {statistics.median(warm):.1f} s "
            f"({statistics.median(warm) / mlflow_s:.2f}x mlflow) | "
            f"{' '.join(f'{t:.1f}' for t in warm)} | | |"
        )


def in_process_floor(uri: str, tracking: str, rows: int, calls: int = 300) -> float:
    """Milliseconds per ``pyfunc.predict`` call in this process on the payload's rows (as
    MLflow's parser builds them): what no server can beat at one client."""
    import mlflow.pyfunc
    from mlflow.pyfunc.scoring_server import _parse_json_data

    mlflow.set_tracking_uri(tracking)
    model = mlflow.pyfunc.load_model(uri)
    schema = model.metadata.get_input_schema()
    frame = _parse_json_data(json.loads(payload(rows)), model.metadata, schema).data
    for _ in range(20):
        model.predict(frame)
    started = time.perf_counter()
    for _ in range(calls):
        model.predict(frame)
    return (time.perf_counter() - started) / calls * 1000


def measure_starts(servers: dict, uri: str, tracking: str, root: Path, count: int) -> None:
    """Start-to-ready, interleaved: ``count`` cold starts of mlflow and of modeld (an empty
    cache each time: both download), then as many modeld restarts on the warm cache. The
    first start of each server (the one the load ran against) counts as one."""
    for srv in servers.values():
        srv["starts"] = [srv["ready_s"]]
    for i in range(1, count):
        for kind in ("mlflow", "modeld"):
            cold = root / f"cold-{kind}-{i}"
            cold.mkdir(parents=True, exist_ok=True)
            run = launch(kind, uri, tracking, cold)
            stop(run["proc"])
            servers[kind]["starts"].append(run["ready_s"])
    restarts = servers["modeld"]["restarts"] = []
    for _ in range(count):
        warm = launch("modeld", uri, tracking, root)  # the first start's cache, warm now
        stop(warm["proc"])
        restarts.append(warm["ready_s"])


def header(kinds: list[str]) -> str:
    others = [k for k in kinds if k.startswith("mlserver")]
    cols = ["model", "rows", "clients", *(f"{k} req/s" for k in kinds), "modeld / mlflow"]
    if others:
        cols.append("modeld / best MLServer")
    cols += [f"modeld / {k}" for k in CEILINGS if k in kinds]
    cols += ["p50 mlflow / modeld ms", "p99 mlflow / modeld ms", "p99 ratio", "errors"]
    return "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols)


def _row(model, rows, c, pair) -> str:
    m, d = pair["mlflow"], pair["modeld"]
    cells = [model, str(rows), str(c), *(f"{r.rps:.0f}" for r in pair.values())]
    cells.append(f"{d.rps / max(m.rps, 1e-9):.2f}x")
    others = [r for k, r in pair.items() if k.startswith("mlserver")]
    if others:
        cells.append(f"{d.rps / max(max(r.rps for r in others), 1e-9):.2f}x")
    cells += [f"{d.rps / max(pair[k].rps, 1e-9):.2f}x" for k in CEILINGS if k in pair]
    cells += [
        f"{m.p50:.1f} / {d.p50:.1f}",
        f"{m.pct(0.99):.1f} / {d.pct(0.99):.1f}",
        f"{d.pct(0.99) / max(m.pct(0.99), 1e-9):.2f}x",
        "/".join(str(r.errors) for r in pair.values()),
    ]
    return "| " + " | ".join(cells) + " |"


if __name__ == "__main__":
    main()
