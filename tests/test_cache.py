"""The disk cache against a real registry: atomic entries, one download, verification, eviction."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loader import CacheError, ConfigError, ModelCache, make_source, parse_uri

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def source(registry, cache_dir):
    return make_source(cache_dir=cache_dir, tracking_uri=registry.uri, registry_uri=registry.uri)


def version_of(source, uri):
    return source.resolve(parse_uri(uri)).version


def test_second_prepare_downloads_nothing(source):
    version = version_of(source, "models:/iris/Production")
    first = source.prepare(version)
    second = source.prepare(version)
    assert first.downloaded and not second.downloaded
    assert first.path == second.path
    assert (second.path / "MLmodel").is_file()
    assert oct(source.cache.root.stat().st_mode & 0o777) == "0o700"


def test_key_separates_registries_and_sources(source):
    version = version_of(source, "models:/iris/1")
    from dataclasses import replace

    other_registry = replace(version, registry="http://elsewhere:5000")
    recreated = replace(version, source=version.source + "-recreated")
    keys = {ModelCache.key(v) for v in (version, other_registry, recreated)}
    assert len(keys) == 3


def spawn(registry, cache_dir, marker, mode, uri="models:/iris/2"):
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.fetch_worker",
            str(cache_dir),
            registry.uri,
            uri,
            str(marker),
            mode,
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_two_processes_download_once(registry, cache_dir, tmp_path):
    marker = tmp_path / "downloads"
    procs = [spawn(registry, cache_dir, marker, "sleep") for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    assert len(marker.read_text().split()) == 1
    assert outs[0][0].strip() == outs[1][0].strip()


@pytest.mark.slow
def test_sigkill_mid_download_leaves_no_entry(registry, cache_dir, tmp_path, source):
    marker = tmp_path / "downloads"
    proc = spawn(registry, cache_dir, marker, "hang")
    deadline = time.monotonic() + 120
    while not Path(str(marker) + ".ready").exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert any((cache_dir / "tmp").iterdir())  # the download is under way in tmp/
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    version = version_of(source, "models:/iris/2")
    key = ModelCache.key(version)
    assert source.cache.lookup(key) is None
    assert not source.cache.path(key).exists()
    # A new cache instance reaps the dead download and the next fetch succeeds.
    fresh = make_source(cache_dir=cache_dir, tracking_uri=registry.uri, registry_uri=registry.uri)
    assert not any((cache_dir / "tmp").iterdir())
    prepared = fresh.prepare(version)
    assert prepared.downloaded and (prepared.path / "MLmodel").is_file()


def test_flipped_byte_is_detected_and_repaired(source, caplog):
    version = version_of(source, "models:/iris/1")
    prepared = source.prepare(version)
    weights = next(p for p in prepared.path.iterdir() if p.name.startswith("model."))
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    key = prepared.cache_key
    assert source.cache.lookup(key, verify="size") is not None  # same size: not caught cheaply
    entry = source.cache.fetch(
        version, lambda dst: source.registry.download(version, dst), verify="full"
    )
    assert entry.downloaded
    assert "damaged" in caplog.text
    assert source.cache.verify(full=True)[key] is None


def test_truncated_file_is_caught_by_size_check(source):
    version = version_of(source, "models:/iris/3")
    prepared = source.prepare(version)
    (prepared.path / "MLmodel").write_text("flavors: {}\n")
    again = source.prepare(version)
    assert again.downloaded


def test_eviction_keeps_limit_and_spares_pinned_and_leased(source):
    cache = source.cache
    keys = []
    for n in (1, 2, 3):
        prepared = source.prepare(version_of(source, f"models:/iris/{n}"))
        keys.append(prepared.cache_key)
        time.sleep(0.01)
    sizes = {e["key"]: e["bytes"] for e in cache.entries()}
    cache.pin(keys[0])
    with cache.lease(keys[1]):
        evicted = cache.evict(max_bytes=1)
    assert evicted == [keys[2]]
    assert cache.lookup(keys[0]) and cache.lookup(keys[1]) and not cache.lookup(keys[2])
    cache.pin(keys[0], False)
    evicted = cache.evict(max_bytes=sizes[keys[1]])
    assert evicted == [keys[0]]
    assert cache.total_bytes() <= sizes[keys[1]]


def test_keep_versions_per_model_spares_leased_and_other_models(registry, cache_dir):
    source = make_source(
        cache_dir=cache_dir, tracking_uri=registry.uri, registry_uri=registry.uri, keep_versions=2
    )
    cache = source.cache
    other = source.prepare(version_of(source, "models:/bad-deps/Production")).cache_key
    keys = []
    for n in (1, 2):
        time.sleep(0.01)
        keys.append(source.prepare(version_of(source, f"models:/iris/{n}")).cache_key)
    time.sleep(0.01)
    with cache.lease(keys[0]):  # loaded somewhere: beyond the limit, but kept
        keys.append(source.prepare(version_of(source, "models:/iris/3")).cache_key)
        assert {e["key"] for e in cache.entries()} == {other, *keys}
    assert cache.evict() == [keys[0]]  # free now: the least recently used iris goes
    assert {e["key"] for e in cache.entries()} == {other, keys[1], keys[2]}
    assert source.prepare(version_of(source, "models:/iris/1")).downloaded  # fetched again...
    assert {e["key"] for e in cache.entries()} == {other, keys[0], keys[2]}  # ...evicting iris@2
    with pytest.raises(ConfigError, match="keep_versions.*0"):
        ModelCache(cache_dir, keep_versions=0)


def test_download_without_mlmodel_is_refused_and_leaves_nothing(source):
    version = version_of(source, "models:/iris/1")
    from dataclasses import replace

    odd = replace(version, source=version.source + "-odd")
    with pytest.raises(CacheError, match="no MLmodel"):
        source.cache.fetch(odd, lambda dst: (dst / "x.txt").write_text("x"))
    assert source.cache.lookup(ModelCache.key(odd)) is None
    assert not any((source.cache.root / "tmp").iterdir())


def test_load_snapshot_is_used_verified_and_bound_to_the_environment(source, caplog):
    import logging

    from loader.cache import SNAPSHOT_FILE
    from tests.helpers import iris_frame

    caplog.set_level(logging.INFO, logger="loader")
    version = version_of(source, "models:/iris/2")
    prepared = source.prepare(version)
    first = source.load(prepared, uri="models:/iris/2")
    assert (prepared.path / SNAPSHOT_FILE).is_file()
    caplog.clear()
    second = source.load(prepared, uri="models:/iris/2")
    assert "(snapshot)" in caplog.text
    assert second is not first
    frame = iris_frame(4)
    assert list(second.predict(frame)) == list(first.predict(frame))
    # Another environment (fingerprint) never reads it.
    assert source.cache.read_snapshot(prepared.cache_key, "other-env") is None
    # A tampered snapshot is ignored, the model loads normally and the snapshot is rewritten.
    snap = prepared.path / SNAPSHOT_FILE
    snap.write_bytes(snap.read_bytes()[:-1] + b"\x00")
    caplog.clear()
    third = source.load(prepared, uri="models:/iris/2")
    assert "does not match" in caplog.text and "(snapshot)" not in caplog.text
    assert list(third.predict(frame)) == list(first.predict(frame))
    caplog.clear()
    source.load(prepared, uri="models:/iris/2")
    assert "(snapshot)" in caplog.text


class _Planted:
    """What an attacker's snapshot does when unpickled: leave a mark."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("how", ["other owner", "world-writable"])
def test_a_planted_snapshot_is_never_unpickled(source, caplog, tmp_path, how):
    """A snapshot someone else could have written (another uid owns it, or anyone may write
    it), with an index that vouches for it, is not unpickled: the model loads normally."""
    import hashlib
    import logging
    import os
    import pickle

    from loader.cache import SNAPSHOT_FILE, _ikey
    from loader.deps import environment_fingerprint
    from tests.helpers import iris_frame

    if how == "other owner" and os.geteuid() != 0:
        pytest.skip("chown to another uid needs root")
    version = version_of(source, "models:/iris/2")
    prepared = source.prepare(version)
    expected = list(source.load(prepared, uri="models:/iris/2").predict(iris_frame(3)))
    marker = tmp_path / "pwned"
    evil = pickle.dumps(_Planted(str(marker)))
    snap = prepared.path / SNAPSHOT_FILE
    snap.write_bytes(evil)
    cache = source.cache
    record = cache._index.get(_ikey(prepared.cache_key, False))
    record["snapshot"] = {
        "fingerprint": environment_fingerprint(prepared.path),
        "sha256": hashlib.sha256(evil).hexdigest(),
        "size": len(evil),
    }
    cache._index.set(_ikey(prepared.cache_key, False), record)
    if how == "other owner":
        os.chown(snap, 65534, 65534)
    else:
        snap.chmod(0o666)
    caplog.set_level(logging.INFO, logger="loader")
    model = source.load(prepared, uri="models:/iris/2")
    assert not marker.exists()
    assert list(model.predict(iris_frame(3))) == expected
    assert "load snapshots are not used" in caplog.text and "(snapshot)" not in caplog.text


@pytest.mark.parametrize(
    "name",
    ["iris model", "modèle-é", "it's", "100%", "字" * 40, "n" * 200, ".hidden"],
)
def test_every_name_mlflow_accepts_is_served(registry, tmp_path, name):
    """Names that need percent-encoding were cached under an encoded path that MLflow then
    decoded ("No such artifact"); long ones hit ENAMETOOLONG."""
    from loader import load_model
    from loader.cache import dir_name
    from tests.helpers import iris_frame, register

    register(registry.client(), name, registry.models["const3"])
    model = load_model(f"models:/{name}/1", cache_dir=tmp_path / "c", tracking_uri=registry.uri)
    assert list(model.predict(iris_frame(2))) == [3, 3]
    folder = dir_name(name)
    assert "%" not in folder and len(folder.encode()) <= 64 and folder not in (".", "..")
    assert (tmp_path / "c" / "models" / folder).is_dir()
