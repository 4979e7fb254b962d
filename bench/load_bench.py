"""Issue 2 benchmark: `loader` cache hit vs `mlflow.pyfunc.load_model`, same models:/ URI.

Both run against a local `mlflow server --serve-artifacts` on 127.0.0.1, so MLflow really
downloads the artifacts over HTTP on every load. Run:

    .venv/bin/python bench/load_bench.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import MlflowServer, log_models  # noqa: E402


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="modeld-bench-"))
    try:
        with MlflowServer(root / "server") as server:
            uris = log_models(server.url)
            import mlflow.pyfunc

            from loader import make_source, parse_uri

            source = make_source(cache_dir=root / "cache", tracking_uri=server.url)
            rows = []
            for name, uri in uris.items():
                ref = parse_uri(uri)
                # Warm the cache (and MLflow's imports) once, outside the timings.
                first = source.prepare(source.resolve(ref).version)
                mlflow.pyfunc.load_model(uri)
                size = dir_bytes(first.path)
                ours, theirs, ours_bytes = [], [], 0
                for _ in range(args.repeat):
                    t0 = time.perf_counter()
                    mlflow.pyfunc.load_model(uri)
                    theirs.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    prepared = source.prepare(source.resolve(ref).version)
                    source.load(prepared, uri=uri)
                    ours.append(time.perf_counter() - t0)
                    ours_bytes += 0 if not prepared.downloaded else size
                rows.append(
                    (name, size, statistics.median(theirs), statistics.median(ours), ours_bytes)
                )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(
        "| model | size | mlflow.pyfunc.load_model | loader cache hit | speed-up | "
        "bytes downloaded (mlflow / modeld) |"
    )
    print("|---|---|---|---|---|---|")
    for name, size, theirs, ours, ours_bytes in rows:
        print(
            f"| {name} | {size / 1e6:.2f} MB | {theirs * 1000:.0f} ms | {ours * 1000:.0f} ms | "
            f"{theirs / ours:.1f}x | {size * args.repeat / 1e6:.2f} MB / {ours_bytes} B |"
        )
    print(f"(median of {args.repeat} loads each, same process, registry over HTTP)")


if __name__ == "__main__":
    main()
