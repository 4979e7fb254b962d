"""Traffic between refs (issue 20): a split route and a mirrored route against a plain one.

    .venv/bin/python bench/arms_bench.py [--count 4000] [--rounds 3]

One modeld serving iris three ways, same model and load, interleaved per round (closed loop, 32
clients, 1-row ``dataframe_split``, the order reversed every other round): ``plain`` (one ref,
measured twice: first and last), ``split`` (two arms, 50/50, sticky on a header the load does
not send, so each request draws at random) and ``mirror`` (one answering arm and a shadow arm
getting a copy of every request). Reported against the mean of the two plain measurements:
the split's requests/s and the mirrored route's p99; plain2 / plain is the noise floor.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import closed_loop, free_port, log_models, start, stop, wait_http  # noqa: E402
from bench.serve_bench import payload  # noqa: E402


def config(root: Path, tracking: str, uri: str, port: int) -> Path:
    path = root / "arms.toml"
    path.write_text(
        f"[server]\nport = {port}\n"
        f"[registry]\ntracking_uri = {json.dumps(tracking)}\n"
        f"[cache]\ndir = {json.dumps(str(root / 'cache'))}\n"
        f'[[models]]\nname = "plain"\nuri = "{uri}"\n'
        f'[[models]]\nname = "plain2"\nuri = "{uri}"\n'
        f'[[models]]\nname = "split"\nsticky = "header:X-User-Id"\narms = ['
        f'{{name = "a", uri = "{uri}", weight = 50}}, {{name = "b", uri = "{uri}", weight = 50}}]\n'
        f'[[models]]\nname = "mirror"\narms = [{{name = "live", uri = "{uri}"}}, '
        f'{{name = "shadow", uri = "{uri}", shadow = true}}]\n'
    )
    return path


def _quiet(base: str) -> None:
    """Wait until the mirrored route's shadow copies are done (they run after answers, so
    the previous cell's could run into the next one)."""
    import time
    import urllib.request

    for _ in range(200):  # bounded
        with urllib.request.urlopen(f"{base}/models/mirror", timeout=10) as resp:
            view = json.loads(resp.read())
        if not view["mirror_pending"] and not view["mirror_in_flight"]:
            return
        time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="modeld-arms-bench-"))
    tracking = f"sqlite:///{root / 'mlflow.db'}"
    import os

    os.chdir(root)
    uri = log_models(tracking)["iris"]
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "serving",
        "serve",
        "--config",
        str(config(root, tracking, uri, port)),
    ]
    proc = start(cmd, root / "modeld.log", env={"MLFLOW_TRACKING_URI": tracking})
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/health", proc=proc)
        body = payload(1)
        routes = ("plain", "split", "mirror", "plain2")
        rps: dict[str, list[float]] = {route: [] for route in routes}
        p99: dict[str, list[float]] = {route: [] for route in routes}
        for n in range(args.rounds):
            for route in list(rps) if n % 2 == 0 else list(rps)[::-1]:  # interleaved
                _quiet(base)
                result = closed_loop(
                    f"{base}/models/{route}/invocations", body,
                    concurrency=args.concurrency, count=args.count,
                )  # fmt: skip
                assert result.errors == 0, (route, result.errors)
                rps[route].append(result.rps)
                p99[route].append(result.pct(0.99))
        med = {k: statistics.median(v) for k, v in rps.items()}
        tail = {k: statistics.median(v) for k, v in p99.items()}
        # Two plain routes, first and last in each round: their mean is the baseline, and
        # plain2 against plain is the noise of the measurement itself.
        med["plain"] = base_rps = (med["plain"] + med.pop("plain2")) / 2
        tail["plain"] = base_p99 = (tail["plain"] + tail.pop("plain2")) / 2
        noise = statistics.median(b / a for a, b in zip(rps["plain"], rps["plain2"], strict=True))
        print(
            f"| route | req/s at {args.concurrency} clients | p99 ms | req/s / plain | "
            "p99 / plain |"
        )
        print("|---|---|---|---|---|")
        for route in med:
            print(
                f"| {route} | {med[route]:.0f} | {tail[route]:.1f} | "
                f"{med[route] / base_rps:.2f}x | {tail[route] / base_p99:.2f}x |"
            )
        print(f"\nplain2 / plain req/s per round (the noise): {noise:.2f}x")
    finally:
        stop(proc)


if __name__ == "__main__":
    main()
