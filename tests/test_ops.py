"""`modeld pull | resolve | check | cache` as operators run them (subprocesses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from loader.cache import SNAPSHOT_FILE

ROOT = Path(__file__).resolve().parent.parent


def modeld(registry, cache_dir, *args):
    proc = subprocess.run(
        [sys.executable, "-m", "serving", *args, "--cache-dir", str(cache_dir)],
        cwd=ROOT,
        env={**os.environ, "MLFLOW_TRACKING_URI": registry.uri},
        capture_output=True,
        text=True,
        timeout=120,
    )
    return proc.returncode, proc.stdout, proc.stderr


def test_pull_resolve_check_and_cache(registry, cache_dir):
    code, out, err = modeld(
        registry, cache_dir, "pull", "models:/iris/Production", "models:/iris@champion"
    )
    assert code == 0, err
    assert "iris@2 downloaded, loads in" in out and "iris@1 downloaded, loads in" in out
    # Each version was loaded once, leaving the snapshot the daemon will start from.
    assert len(list((cache_dir / "models").rglob(SNAPSHOT_FILE))) == 2
    code, out, _ = modeld(registry, cache_dir, "pull", "models:/iris/2")
    assert code == 0 and "already cached" in out
    code, out, err = modeld(registry, cache_dir, "pull", "models:/iris/3", "--no-load", "--json")
    assert code == 0, err
    assert json.loads(out)["load_s"] is None and json.loads(out)["downloaded"]
    assert len(list((cache_dir / "models").rglob(SNAPSHOT_FILE))) == 2

    code, out, err = modeld(registry, cache_dir, "pull", "models:/iris/Prod", "models:/nope/1")
    assert code == 1 and "Accepted forms" in err and "nope" in err

    code, out, _ = modeld(registry, cache_dir, "resolve", "models:/iris@champion", "--json")
    assert code == 0 and json.loads(out)["version"] == 1
    code, out, _ = modeld(registry, cache_dir, "resolve", "models:/iris/latest")
    assert code == 0 and "iris@3" in out

    code, out, _ = modeld(registry, cache_dir, "check", "models:/bad-deps/Production")
    assert code == 1 and "modeld-no-such-package: not installed, model needs ==1.0" in out
    code, out, _ = modeld(registry, cache_dir, "check", "models:/iris/2")
    assert code == 0 and "all satisfied" in out

    code, out, _ = modeld(registry, cache_dir, "cache", "ls")
    assert code == 0 and "3 entries" in out and "iris@1" in out and "iris@2" in out
    assert modeld(registry, cache_dir, "cache", "verify")[0] == 0
    weights = next((cache_dir / "models").rglob("model.skops"))
    data = bytearray(weights.read_bytes())
    data[0] ^= 0xFF
    weights.write_bytes(bytes(data))
    code, out, _ = modeld(registry, cache_dir, "cache", "verify")
    assert code == 1 and "1 damaged" in out
    code, out, _ = modeld(registry, cache_dir, "cache", "gc", "--max-bytes", "0")
    assert code == 0 and "2 evicted" in out
    code, out, _ = modeld(registry, cache_dir, "cache", "ls", "--json")
    assert code == 0 and json.loads(out) == []
