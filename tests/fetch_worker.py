"""Run in a subprocess by the cache tests: fetch one version into a shared cache.

Usage: python -m tests.fetch_worker CACHE_DIR TRACKING_URI URI MARKER_FILE MODE
MODE is ``sleep`` (hold the download open a second) or ``hang`` (write half, then wait forever).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from loader import make_source, parse_uri


def main() -> None:
    cache_dir, tracking_uri, uri, marker, mode = sys.argv[1:6]
    source = make_source(cache_dir=cache_dir, tracking_uri=tracking_uri, registry_uri=tracking_uri)
    version = source.resolve(parse_uri(uri)).version

    def download(dst: Path) -> None:
        with open(marker, "a") as fh:
            fh.write(f"{os.getpid()}\n")
        source.registry.download(version, dst)
        if mode == "hang":
            Path(marker + ".ready").write_text("1")
            time.sleep(600)
        time.sleep(1.0)

    entry = source.cache.fetch(version, download)
    print(entry.path, flush=True)


if __name__ == "__main__":
    main()
