"""The real floor (issue 18): modeld against the bare-aiohttp and naive-handler ceilings
(``bench/refservers.py``), side by side in one run, reported as ratios; and ``--workers``
memory: total RSS of ``--workers 4`` against ``--workers 1`` serving the forest, before and
after swaps, with requests/s at 32 clients.

    .venv/bin/python bench/floor_bench.py [--count 2000] [--models iris,forest] [--workers-check]
        [--registry sqlite|server]

One process each, one worker each (the floor), 1-row ``dataframe_split``, closed loop, the
endpoints interleaved per cell. The registry is a local sqlite one (no server in the way), or
with ``--registry server`` an ``mlflow server`` over HTTP, as a sidecar in a cluster follows.
"""

from __future__ import annotations

import argparse
import contextlib
import os
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
    tree_pss_mb,
    tree_rss_mb,
    wait_http,
)
from bench.serve_bench import payload  # noqa: E402

REFS = Path(__file__).resolve().parent / "refservers.py"
KINDS = ("bare", "naive", "modeld")


def launch(kind: str, uri: str, tracking: str, root: Path, *extra: str) -> dict:
    port = free_port()
    if kind == "modeld":
        cmd = modeld_serve("-m", uri, "--port", str(port), "--cache-dir", str(root / "cache"))
        cmd += list(extra)
    else:
        cmd = [sys.executable, str(REFS), kind, "--port", str(port), "--model-uri", uri]
    log = root / f"{kind}-{port}.log"
    proc = start(cmd, log, env={"MLFLOW_TRACKING_URI": tracking})
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", proc=proc)
    except Exception:
        print(log.read_text(errors="replace")[-3000:], file=sys.stderr)
        raise
    return {"proc": proc, "url": f"http://127.0.0.1:{port}/invocations", "port": port}


def floor(args: argparse.Namespace, uris: dict[str, str], tracking: str, root: Path) -> None:
    levels = [int(c) for c in args.concurrency.split(",")]
    body = payload(1)
    rows = []
    for model in args.models.split(","):
        servers = {kind: launch(kind, uris[model], tracking, root) for kind in KINDS}
        try:
            for c in levels:
                count = args.count if model == "iris" else max(args.count // 8, 8 * c)
                runs: dict[str, list[float]] = {kind: [] for kind in KINDS}
                p50: dict[str, list[float]] = {kind: [] for kind in KINDS}
                errors = 0
                for _ in range(args.rounds):  # interleaved: the machine's drift hits all
                    for kind in KINDS:
                        result = closed_loop(servers[kind]["url"], body, concurrency=c, count=count)
                        runs[kind].append(result.rps)
                        p50[kind].append(result.p50)
                        errors += result.errors
                rps = {kind: statistics.median(v) for kind, v in runs.items()}
                lat = {kind: statistics.median(v) for kind, v in p50.items()}
                rows.append((model, c, rps, lat, errors))
                print(_row(*rows[-1]), flush=True)
        finally:
            for srv in servers.values():
                stop(srv["proc"])
    print()
    print(HEADER)
    for row in rows:
        print(_row(*row))


HEADER = (
    "| model | clients | bare aiohttp req/s | naive handler | modeld | modeld / bare | "
    "modeld / naive | p50 bare / naive / modeld ms | errors |\n|" + "---|" * 9
)


def _row(model: str, c: int, rps: dict, lat: dict, errors: int) -> str:
    b, n, m = rps["bare"], rps["naive"], rps["modeld"]
    return (
        f"| {model} | {c} | {b:.0f} | {n:.0f} | {m:.0f} | {m / b:.2f} | {m / n:.2f} | "
        f"{lat['bare']:.2f} / {lat['naive']:.2f} / {lat['modeld']:.2f} | {errors} |"
    )


def workers_check(args: argparse.Namespace, tracking: str, root: Path) -> None:
    """``--workers 1`` and ``--workers 4`` serving ``models:/forest@live``: total memory when
    ready (PSS: shared pages once; RSS: in every process), requests/s at 32 clients, then
    ``--swaps`` alias moves between two versions (each waited for until every worker serves
    it, from the supervisor's shared generation), memory again."""
    import urllib.request

    from mlflow import MlflowClient

    client = MlflowClient(tracking)
    versions = sorted(int(v.version) for v in client.search_model_versions("name='forest'"))
    if len(versions) < 2:  # a second version of the same forest to swap to
        first = client.get_model_version("forest", "1")
        # MLflow 3: a server wants the logged model's id with its models:/m-... source (and
        # its get_model_version may not say it)
        model_id = getattr(first, "model_id", None) or (
            first.source.removeprefix("models:/") if first.source.startswith("models:/m-") else None
        )
        client.create_model_version(
            "forest",
            first.source,
            run_id=first.run_id,
            **({"model_id": model_id} if model_id else {}),
        )
        versions = [1, 2]
    client.set_registered_model_alias("forest", "live", "1")
    body = payload(1)
    table = []
    for workers in (1, 4):
        cache = root / f"workers-{workers}"
        cache.mkdir(parents=True, exist_ok=True)
        srv = launch(
            "modeld", "models:/forest@live", tracking, cache,
            "--workers", str(workers), "--poll-interval", "1",
        )  # fmt: skip
        try:
            _wait_all_on(srv["url"], "1", workers)
            time.sleep(2.0)
            ready = tree_pss_mb(srv["proc"].pid), tree_rss_mb(srv["proc"].pid)
            rps = closed_loop(srv["url"], body, concurrency=32, count=args.count // 4).rps
            for i in range(args.swaps):
                target = str(versions[(i + 1) % 2])
                client.set_registered_model_alias("forest", "live", target)
                deadline = time.monotonic() + 60
                seen: set[str] = set()
                while time.monotonic() < deadline:  # every worker: enough answers in a row
                    request = urllib.request.Request(
                        srv["url"], data=body, headers={"Content-Type": "application/json"}
                    )
                    with urllib.request.urlopen(request, timeout=10) as resp:
                        seen.add(resp.headers["X-Model-Version"])
                        got = resp.headers["X-Model-Version"]
                    seen = {got} if got == target else set()
                    if seen == {target} and _all_workers_on(srv["url"], target, workers):
                        break
                    time.sleep(0.05)
                else:
                    raise TimeoutError(f"swap {i + 1} to version {target} did not finish")
            time.sleep(2.0)
            swapped = tree_pss_mb(srv["proc"].pid), tree_rss_mb(srv["proc"].pid)
            table.append((workers, ready, swapped, rps))
            print(table[-1], flush=True)
        finally:
            stop(srv["proc"])
    one = table[0]
    print()
    print("| workers | memory ready (PSS / RSS sum) | after swaps (PSS / RSS sum) | "
          "PSS ratio to 1 worker (ready / after) | req/s at 32 clients |")  # fmt: skip
    print("|---|---|---|---|---|")
    for workers, ready, swapped, rps in table:
        print(
            f"| {workers} | {ready[0]:.0f} / {ready[1]:.0f} MB | "
            f"{swapped[0]:.0f} / {swapped[1]:.0f} MB | "
            f"{ready[0] / one[1][0]:.2f}x / {swapped[0] / one[2][0]:.2f}x | {rps:.0f} |"
        )


def _wait_all_on(url: str, version: str, workers: int, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not _all_workers_on(url, version, workers):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the workers did not all serve version {version}")
        time.sleep(0.2)


def _all_workers_on(url: str, version: str, workers: int) -> bool:
    """Whether every worker serves ``version`` (``GET /models/forest``'s per-worker view)."""
    import json
    import urllib.request

    base = url.rsplit("/", 1)[0]
    with urllib.request.urlopen(f"{base}/models/forest", timeout=10) as resp:
        view = json.loads(resp.read())
    if workers == 1:
        return str(view.get("version")) == version
    seen = view.get("workers", [])  # each from the supervisor's shared generation
    return len(seen) == workers and all(
        str(w.get("version")) == version and w.get("loaded_by") == "inherited" for w in seen
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=2000, help="requests per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per cell")
    parser.add_argument("--models", default="iris,forest")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--workers-check", action="store_true", help="--workers 4 memory")
    parser.add_argument("--no-floor", action="store_true", help="only the --workers check")
    parser.add_argument("--swaps", type=int, default=10)
    parser.add_argument(
        "--registry",
        choices=("sqlite", "server"),
        default="sqlite",
        help="the registry modeld follows: a local sqlite file, or `mlflow server` over HTTP",
    )
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="modeld-floor-bench-"))
    try:
        os.chdir(root)  # MLflow's default artifact root (./mlruns) lands in the run's tmp
        with contextlib.ExitStack() as stack:
            tracking = f"sqlite:///{root / 'mlflow.db'}"
            if args.registry == "server":
                tracking = stack.enter_context(MlflowServer(root / "server")).url
            import mlflow

            mlflow.set_registry_uri(tracking)
            uris = log_models(tracking)
            if not args.no_floor:
                floor(args, uris, tracking, root)
            if args.workers_check:
                workers_check(args, tracking, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
