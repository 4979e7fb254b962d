"""`modeld pull | resolve | check | cache` as operators run them (subprocesses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loader.cache import SNAPSHOT_FILE

ROOT = Path(__file__).resolve().parent.parent


def modeld(registry, cache_dir, *args, env=None):
    proc = subprocess.run(
        [sys.executable, "-m", "serving", *args, "--cache-dir", str(cache_dir)],
        cwd=ROOT,
        env={**os.environ, "MLFLOW_TRACKING_URI": registry.uri, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.slow
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

    for n in (1, 2):  # the older one first: least recently used
        assert modeld(registry, cache_dir, "pull", f"models:/iris/{n}", "--no-load")[0] == 0
    code, _, err = modeld(registry, cache_dir, "cache", "gc", "--keep-versions", "0")
    assert code == 2 and "--keep-versions 0: expected >= 1" in err
    code, out, _ = modeld(registry, cache_dir, "cache", "gc", "--keep-versions", "1")
    assert code == 0 and "1 evicted" in out
    code, out, _ = modeld(registry, cache_dir, "cache", "ls", "--json")
    assert [e["version"]["version"] for e in json.loads(out)] == [2]


@pytest.mark.slow
def test_one_pull_keeps_every_version_it_fetches(registry, cache_dir):
    """An init container pulling more versions of one model than cache.keep_versions (here
    three refs, limit 2) must leave all of them; the limit applies again afterwards."""
    keep2 = {"MODELD_CACHE__KEEP_VERSIONS": "2"}
    refs = ("models:/iris@champion", "models:/iris/Production", "models:/iris/latest")
    code, _, err = modeld(registry, cache_dir, "pull", "--no-load", *refs, env=keep2)
    assert code == 0, err
    code, out, _ = modeld(registry, cache_dir, "cache", "ls", "--json", env=keep2)
    assert sorted(e["version"]["version"] for e in json.loads(out)) == [1, 2, 3]
    code, out, _ = modeld(registry, cache_dir, "cache", "gc", env=keep2)
    assert code == 0 and "1 evicted" in out


@pytest.mark.slow
def test_pull_honours_cache_verify(registry, cache_dir):
    """`modeld pull` builds its pipeline from the same settings as the daemon: with
    cache.verify = "full" a same-size corruption of a cached version is caught and fetched
    again, not reported as already cached."""
    full = {"MODELD_CACHE__VERIFY": "full"}
    assert modeld(registry, cache_dir, "pull", "models:/iris/2", "--no-load")[0] == 0
    weights = next((cache_dir / "models").rglob("model.skops"))
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    code, out, err = modeld(registry, cache_dir, "pull", "models:/iris/2", "--no-load", env=full)
    assert code == 0 and "iris@2 downloaded" in out, out + err


@pytest.mark.slow
def test_pull_progress_line_for_a_large_download(tmp_path, capsys):
    """The progress line reads the download landing in the cache's tmp/ (total from the MLmodel
    in it), and the download being renamed into place under it raises nothing."""
    import threading
    import time

    from serving.cli.ops import _Progress

    tmp = tmp_path / "tmp"
    download = tmp / f"big__3-abc.{os.getpid()}.1f2e3d4c" / "artifacts"
    errors = []
    hook, threading.excepthook = threading.excepthook, errors.append
    try:
        with _Progress(tmp, "big@3"):
            download.mkdir(parents=True)
            (download / "MLmodel").write_text(f"model_size_bytes: {8 * 2**20}\n")
            with open(download / "model.skops", "wb") as fh:
                for _ in range(8):  # 8 MB over ~1.6 s: the line shows at least twice
                    fh.write(os.urandom(2**20))
                    fh.flush()
                    time.sleep(0.2)
            time.sleep(0.7)  # a tick sees all of it
            download.parent.rename(tmp_path / "done")  # as the cache publishes an entry
            time.sleep(0.7)  # a tick sees nothing left
    finally:
        threading.excepthook = hook
    assert errors == []
    err = capsys.readouterr().err
    lines = err.split("\r")
    assert any(line.startswith("big@3: [#") and "% " in line for line in lines), err
    assert lines[-1] == "big@3: [##############################] 100% 8.4 MB\n", err


def test_cache_and_env_commands_read_the_disk_alone(tmp_path):
    """`modeld cache ...` and `modeld env ...` touch only the cache directory: no MLflow import
    (seconds of start for an operator's `cache ls`), no registry asked."""
    script = (
        "import sys\n"
        "from serving.cli.main import main\n"
        f"codes = [main([*cmd, '--cache-dir', {str(tmp_path)!r}]) for cmd in "
        "(['cache', 'ls'], ['cache', 'verify'], ['env', 'ls'], ['env', 'gc'])]\n"
        "print(codes, 'mlflow' in sys.modules)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[0, 0, 0, 0] False", done.stdout
