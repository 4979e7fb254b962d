"""Isolated environments: the same iris model served in-process and from its own environment
(``--env-manager uv``), side by side in one run, alternating, closed loop, one worker each.

    .venv/bin/python bench/env_bench.py [--count 2000] [--rounds 2]

Reports the mean per-request time at one client (the isolated one may cost at most 0.5 ms
more) and requests/s at 32 clients (at least 0.8x), plus each server's memory (the isolated
one's includes its worker process).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    closed_loop,
    free_port,
    modeld_serve,
    pins,
    start,
    stop,
    tree_rss_mb,
    wait_http,
)
from bench.serve_bench import payload  # noqa: E402


def save_model(path: Path) -> Path:
    import mlflow.sklearn
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    X, y = load_iris(return_X_y=True, as_frame=True)
    model = LogisticRegression(max_iter=500).fit(X, y)
    mlflow.sklearn.save_model(model, str(path), input_example=X.head(2), pip_requirements=pins())
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=2000, help="requests per measurement")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="modeld-env-bench-"))
    model = save_model(root / "iris")
    servers = {}
    kinds = {"in-process": ["--dependency-policy", "warn"], "isolated": ["--env-manager", "uv"]}
    for kind, flags in kinds.items():
        port = free_port()
        cmd = modeld_serve("-m", f"iris={model}", "--port", str(port), *flags)
        cmd += ["--cache-dir", str(root / f"cache-{kind}")]
        proc = start(cmd, root / f"{kind}.log")
        wait_http(f"http://127.0.0.1:{port}/health", timeout_s=900, proc=proc)
        servers[kind] = (proc, f"http://127.0.0.1:{port}/invocations")
    body = payload(1)
    one: dict[str, list[float]] = {k: [] for k in servers}
    many: dict[str, list[float]] = {k: [] for k in servers}
    rss: dict[str, float] = {}
    try:
        for r in range(args.rounds):
            order = list(servers) if r % 2 == 0 else list(reversed(servers))
            for kind in order:
                url = servers[kind][1]
                single = closed_loop(url, body, concurrency=1, count=args.count // 2, warmup=200)
                assert single.errors == 0, (kind, single.errors)
                one[kind].append(statistics.fmean(single.latencies_ms))
                loaded = closed_loop(url, body, concurrency=32, count=args.count * 2, warmup=200)
                assert loaded.errors == 0, (kind, loaded.errors)
                many[kind].append(loaded.rps)
        for kind, (proc, _) in servers.items():
            rss[kind] = tree_rss_mb(proc.pid)
    finally:
        for proc, _ in servers.values():
            stop(proc)
    base, iso = "in-process", "isolated"
    ms = {k: statistics.median(v) for k, v in one.items()}
    rps = {k: statistics.median(v) for k, v in many.items()}
    print("| | in-process | isolated (--env-manager uv) | isolated - in-process | ratio |")
    print("|---|---|---|---|---|")
    print(
        f"| per request, 1 client | {ms[base]:.3f} ms | {ms[iso]:.3f} ms | "
        f"{ms[iso] - ms[base]:+.3f} ms | {ms[iso] / ms[base]:.2f}x |"
    )
    print(
        f"| requests/s, 32 clients | {rps[base]:.0f} | {rps[iso]:.0f} | "
        f"{rps[iso] - rps[base]:+.0f} | {rps[iso] / rps[base]:.2f}x |"
    )
    print(
        f"| memory (with the worker) | {rss[base]:.0f} MB | {rss[iso]:.0f} MB | "
        f"{rss[iso] - rss[base]:+.0f} MB | {rss[iso] / rss[base]:.2f}x |"
    )
    print(f"(median of {args.rounds} alternating rounds; each: {args.count // 2} requests at 1 "
          f"client, {args.count * 2} at 32)")  # fmt: skip


if __name__ == "__main__":
    main()
