"""The disk cache: a verified local copy of every model version, shared by processes.

Layout under the root (created 0700)::

    models/<name>/<version>-<hash>/   the model files, visible only once complete
    meta/<name>/<version>-<hash>/     MLmodel, requirements.txt... fetched before the weights
    tmp/                              downloads in progress (<key>.<pid>.<random>)
    locks/                            one lock file per key (download) and per key (in use)
    index/                            diskcache: manifests, sizes, last use, pins, ref resolutions

A download lands in ``tmp/``; every file's size and sha256 go into the index; then one
``os.replace`` makes the entry visible. An entry is served only when the index has its manifest
and the files match it, so a crash at any moment never leaves a half-written entry in use.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import diskcache

from loader.errors import CacheError, CacheFull, ConfigError
from loader.files import flock, remove_tree
from loader.registry import ModelVersion

log = logging.getLogger(__name__)

Verify = Literal["size", "full", "none"]
VERIFY_MODES = ("size", "full", "none")
LOCK_TIMEOUT_S = 600.0
_HASH_CHUNK = 1 << 20
#: How long an index operation waits for another process's sqlite lock.
INDEX_TIMEOUT_S = 10.0
#: A pickle of the loaded pyfunc model, written by modeld itself after a successful load.
SNAPSHOT_FILE = ".modeld-snapshot.pkl"


@dataclass(slots=True)
class CacheStats:
    """What this process's cache did: read by metrics and status."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    discarded: int = 0


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """A complete, verified cache entry."""

    key: str
    path: Path
    bytes: int
    downloaded: bool


class ModelCache:
    """Verified local copies of model versions, keyed by registry + name + version + source.

    Args:
        root: cache directory (created 0700).
        max_bytes: size limit; least-recently-used entries are evicted past it, never one that
            is pinned or held by :meth:`lease` in any process.
        keep_versions: per registered model (and registry), keep at most this many versions:
            the least recently used beyond it are evicted after each download (same
            exemptions), so following a moving alias for weeks does not fill the disk.
        lock_timeout_s: how long to wait for another process downloading the same key.
        observer: called as ``observer(event)`` for ``"hit"``, ``"miss"`` and ``"eviction"``
            (the daemon counts them in its metrics, across worker processes).

    Raises:
        CacheError: the root cannot be created or the index cannot be opened.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        max_bytes: int | None = None,
        keep_versions: int | None = None,
        lock_timeout_s: float = LOCK_TIMEOUT_S,
        observer: Callable[[str], None] | None = None,
    ) -> None:
        self.observer = observer
        if max_bytes is not None and max_bytes < 0:
            raise ConfigError("cache.max_bytes", max_bytes, "a size in bytes >= 0")
        if keep_versions is not None and keep_versions < 1:
            raise ConfigError("cache.keep_versions", keep_versions, "a count >= 1")
        self.root = Path(root).expanduser().resolve()
        self.max_bytes = max_bytes
        self.keep_versions = keep_versions
        self.lock_timeout_s = lock_timeout_s
        try:
            for sub in ("", "models", "meta", "tmp", "locks"):
                (self.root / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.root, 0o700)
            self._index = _Index(self.root)
        except OSError as exc:
            raise CacheError(f"cannot use cache directory {str(self.root)!r}: {exc}") from exc
        self.stats = CacheStats()
        self._distrust_logged: set[str] = set()
        self._thread_locks: dict[str, threading.Lock] = {}
        self._thread_locks_guard = threading.Lock()
        self._reap_temp_dirs()

    def close(self) -> None:
        self._index.close()

    def _count(self, what: str) -> None:
        setattr(self.stats, what, getattr(self.stats, what) + 1)
        if self.observer is not None:
            try:
                self.observer(what)
            except Exception:  # metrics must never break the cache
                log.exception("cache observer failed on %s", what)

    # -- keys and paths -----------------------------------------------------------------------

    @staticmethod
    def key(version: ModelVersion) -> str:
        return f"{dir_name(version.name)}/{version.cache_key}"

    def path(self, key: str, *, meta: bool = False) -> Path:
        return self.root / ("meta" if meta else "models") / key

    # -- fetch --------------------------------------------------------------------------------

    def fetch(
        self,
        version: ModelVersion,
        download: Callable[[Path], None],
        *,
        verify: Verify = "size",
    ) -> CacheEntry:
        """Return the verified local copy of ``version``, downloading it once if needed.

        ``download(tmp_dir)`` must write the model's files into ``tmp_dir``. Threads and
        processes asking for the same version at once wait for one download.

        Raises:
            CacheError: disk full, lock timeout, or the download left no MLmodel file.
        """
        return self._fetch(self.key(version), version, download, verify=verify, meta=False)

    def fetch_metadata(self, version: ModelVersion, download: Callable[[Path], None]) -> CacheEntry:
        """Like :meth:`fetch` for the small metadata files only (read before the weights)."""
        full = self.lookup(self.key(version), verify="size")
        if full is not None:
            return full
        return self._fetch(self.key(version), version, download, verify="size", meta=True)

    def lookup(self, key: str, *, verify: Verify = "size", meta: bool = False) -> CacheEntry | None:
        """The complete entry for ``key``, or None. A corrupt entry is discarded (logged)."""
        ikey = _ikey(key, meta)
        record = self._index.get(ikey)
        path = self.path(key, meta=meta)
        if record is None:
            return None
        problem = _check(path, record["files"], verify)
        if problem is not None:
            log.warning(
                "cache entry %s is damaged (%s): discarding it, will fetch again", key, problem
            )
            self._discard(key, meta=meta)
            self.stats.discarded += 1
            return None
        record["last_used"] = time.time()
        try:  # bookkeeping for eviction: a full disk must not fail a read
            self._index.set(ikey, record)
        except CacheFull as exc:
            log.debug("cache entry %s: last use not recorded (%s)", key, exc)
        if not meta:
            self._count("hits")
        return CacheEntry(key=key, path=path, bytes=record["bytes"], downloaded=False)

    def _fetch(
        self,
        key: str,
        version: ModelVersion,
        download: Callable[[Path], None],
        *,
        verify: Verify,
        meta: bool,
    ) -> CacheEntry:
        if verify not in VERIFY_MODES:
            raise ConfigError("verify", verify, " | ".join(VERIFY_MODES))
        entry = self.lookup(key, verify=verify, meta=meta)
        if entry is not None:
            return entry
        with self._key_lock(key):
            # Another thread or process may have finished it while we waited.
            entry = self.lookup(key, verify=verify, meta=meta)
            if entry is not None:
                return entry
            entry = self._download(key, version, download, meta=meta)
        if not meta:
            self._count("misses")
            self.evict()
        return entry

    def _download(
        self, key: str, version: ModelVersion, download: Callable[[Path], None], *, meta: bool
    ) -> CacheEntry:
        tmp = self.root / "tmp" / f"{_slug(key)}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        final = self.path(key, meta=meta)
        tmp.mkdir(mode=0o700, parents=True)  # parents: the cache may have been deleted under us
        try:
            download(tmp)
            if not meta and not (tmp / "MLmodel").is_file():
                raise CacheError(
                    f"{version.label}: the downloaded artifacts have no MLmodel file at the top "
                    f"(source {version.source!r}); is this an MLflow model?"
                )
            files = _manifest(tmp)
            total = sum(size for size, _ in files.values())
            record = {
                "files": files,
                "bytes": total,
                "version": version.to_dict(),
                "created": time.time(),
                "last_used": time.time(),
                "pinned": False,
            }
            final.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            if final.exists():
                remove_tree(final)
            # Record first, rename second: a record without a directory is a miss; a directory
            # without a matching record is never served and gets replaced.
            self._index.set(_ikey(key, meta), record)
            os.replace(tmp, final)
        except OSError as exc:
            remove_tree(tmp)
            self._index.delete(_ikey(key, meta))
            if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
                raise CacheError(
                    f"cannot cache {version.label} in {self.root}: disk full ({exc.strerror}); "
                    "free space or lower cache.max_bytes"
                ) from exc
            raise CacheError(f"cannot cache {version.label} in {self.root}: {exc}") from exc
        except BaseException:
            remove_tree(tmp)
            raise
        what = "metadata of " if meta else ""
        log.info("cached %s%s (%d files, %d bytes)", what, version.label, len(files), total)
        return CacheEntry(key=key, path=final, bytes=total, downloaded=True)

    # -- load snapshots -----------------------------------------------------------------------

    def read_snapshot(self, key: str, fingerprint: str) -> bytes | None:
        """The pickled loaded model saved for ``key``, if made in the same environment.

        Verified against the sha256 recorded in the index; anything else is ignored.
        """
        record = self._index.get(_ikey(key, False))
        snap = record.get("snapshot") if record else None
        if not snap or snap["fingerprint"] != fingerprint:
            return None
        entry = self.path(key)
        # Unpickling runs code: only files this user owns, that nobody else could have written.
        reason = _untrusted(
            [self.root, self.root / "index", self.root / "index" / "cache.db", entry,
             entry / SNAPSHOT_FILE]
        )  # fmt: skip
        if reason is not None:
            if reason not in self._distrust_logged:
                self._distrust_logged.add(reason)
                log.warning("load snapshots are not used (%s): models load normally", reason)
            return None
        try:
            data = (entry / SNAPSHOT_FILE).read_bytes()
        except OSError:
            return None
        if len(data) != snap["size"] or hashlib.sha256(data).hexdigest() != snap["sha256"]:
            log.warning("load snapshot of %s does not match the index: ignoring it", key)
            return None
        return data

    def write_snapshot(self, key: str, fingerprint: str, data: bytes) -> None:
        """Save a pickled loaded model beside the entry (atomically), for fast later loads."""
        path = self.path(key)
        tmp = path / f".{SNAPSHOT_FILE}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path / SNAPSHOT_FILE)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            log.warning("could not save a load snapshot of %s: %s", key, exc)
            return
        with self._index.transact():
            record = self._index.get(_ikey(key, False))
            if record is None:
                return
            record["snapshot"] = {
                "fingerprint": fingerprint,
                "sha256": hashlib.sha256(data).hexdigest(),
                "size": len(data),
            }
            self._index.set(_ikey(key, False), record)

    # -- locks, leases, pins ------------------------------------------------------------------

    @contextlib.contextmanager
    def _key_lock(self, key: str) -> Iterator[None]:
        """One holder per key across threads (threading.Lock) and processes (flock)."""
        with self._thread_locks_guard:
            tlock = self._thread_locks.setdefault(key, threading.Lock())
        if not tlock.acquire(timeout=self.lock_timeout_s):
            raise CacheError(f"timed out after {self.lock_timeout_s:.0f}s waiting to fetch {key}")
        try:
            with _flock(
                self.root / "locks" / f"{_slug(key)}.lock", fcntl.LOCK_EX, self.lock_timeout_s, key
            ):
                yield
        finally:
            tlock.release()

    @contextlib.contextmanager
    def lease(self, key: str) -> Iterator[None]:
        """Hold ``key`` in use (a shared lock): eviction in any process skips it meanwhile."""
        with _flock(
            self.root / "locks" / f"{_slug(key)}.use", fcntl.LOCK_SH, self.lock_timeout_s, key
        ):
            yield

    def pin(self, key: str, pinned: bool = True) -> None:
        """Mark an entry as never evictable (or evictable again)."""
        with self._index.transact():
            record = self._index.get(_ikey(key, False))
            if record is None:
                raise CacheError(f"no cache entry {key!r} to pin")
            record["pinned"] = pinned
            self._index.set(_ikey(key, False), record)

    # -- eviction and inspection --------------------------------------------------------------

    def entries(self) -> list[dict[str, Any]]:
        """Every complete model entry: key, path, bytes, last use, pinned, version."""
        out = []
        for ikey in list(self._index.iterkeys()):
            if not (isinstance(ikey, tuple) and ikey[0] == "entry"):
                continue
            record = self._index.get(ikey)
            if record is None:
                continue
            out.append(
                {
                    "key": ikey[1],
                    "path": str(self.path(ikey[1])),
                    "bytes": record["bytes"],
                    "last_used": record["last_used"],
                    "pinned": record["pinned"],
                    "version": record["version"],
                }
            )
        return out

    def total_bytes(self) -> int:
        return sum(e["bytes"] for e in self.entries())

    def evict(self, max_bytes: int | None = None, *, keep_versions: int | None = None) -> list[str]:
        """Evict the least recently used versions of each registered model beyond
        ``keep_versions``, then least-recently-used entries until the cache fits ``max_bytes``
        (each defaults to the cache's own limit; None: no limit).

        Pinned entries and entries leased by any process are never evicted (they still count).
        Returns the evicted keys.
        """
        limit = self.max_bytes if max_bytes is None else max_bytes
        keep = self.keep_versions if keep_versions is None else keep_versions
        newest_first = sorted(self.entries(), key=lambda e: e["last_used"], reverse=True)
        evicted: list[str] = []
        if keep is not None:
            seen: collections.Counter[tuple[str, str]] = collections.Counter()
            for entry in newest_first:
                model = (entry["version"]["registry"], entry["version"]["name"])
                seen[model] += 1
                if seen[model] > keep and self._evict_entry(entry, f"beyond {keep} versions"):
                    evicted.append(entry["key"])
        if limit is not None:
            rest = [e for e in reversed(newest_first) if e["key"] not in evicted]
            total = sum(e["bytes"] for e in rest)
            for entry in rest:
                if total <= limit:
                    break
                if self._evict_entry(entry, f"over {limit} bytes"):
                    total -= entry["bytes"]
                    evicted.append(entry["key"])
        return evicted

    def _evict_entry(self, entry: dict[str, Any], why: str) -> bool:
        if entry["pinned"] or not self._try_evict(entry["key"]):
            return False
        self._count("evictions")
        log.info("evicted %s from the cache (%d bytes, %s)", entry["key"], entry["bytes"], why)
        return True

    def _try_evict(self, key: str) -> bool:
        use = self.root / "locks" / f"{_slug(key)}.use"
        use.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(use, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # loaded somewhere
            self._discard(key, meta=False)
            self._discard(key, meta=True)
            return True
        finally:
            os.close(fd)

    def _discard(self, key: str, *, meta: bool) -> None:
        self._index.delete(_ikey(key, meta))
        remove_tree(self.path(key, meta=meta))

    def verify(self, *, full: bool = True) -> dict[str, str | None]:
        """Check every entry; discard damaged ones. Returns key -> problem (None when fine)."""
        report: dict[str, str | None] = {}
        for entry in self.entries():
            record = self._index.get(_ikey(entry["key"], False))
            if record is None:
                continue
            problem = _check(Path(entry["path"]), record["files"], "full" if full else "size")
            report[entry["key"]] = problem
            if problem is not None:
                log.warning("cache entry %s is damaged (%s): discarded", entry["key"], problem)
                self._discard(entry["key"], meta=False)
        return report

    # -- ref resolutions (offline start) ------------------------------------------------------

    def remember(self, registry: str, uri: str, version: ModelVersion) -> None:
        """Record what ``uri`` resolved to, for a later start with the registry down."""
        self._index.set(("ref", registry, uri), version.to_dict())

    def recall(self, registry: str, uri: str) -> ModelVersion | None:
        data = self._index.get(("ref", registry, uri))
        return None if data is None else ModelVersion.from_dict(data)

    # -- housekeeping -------------------------------------------------------------------------

    def _reap_temp_dirs(self) -> None:
        """Remove downloads left by processes that died mid-way."""
        for tmp in (self.root / "tmp").iterdir():
            try:
                pid = int(tmp.name.rsplit(".", 2)[1])
            except (IndexError, ValueError):
                pid = -1
            if pid == os.getpid() or pid_alive(pid):
                continue
            log.info("removing an interrupted download: %s", tmp.name)
            remove_tree(tmp)


def _ikey(key: str, meta: bool) -> tuple[str, str]:
    return ("meta" if meta else "entry", key)


_SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")


def dir_name(name: str) -> str:
    """A model name as one directory name: as it is when it is plain ASCII of at most 64
    characters; otherwise its plain characters (cut) and a digest of the whole. No ``%``: MLflow
    would decode it out of a path; no long names (ENAMETOOLONG); no ``.`` or ``..``."""
    if _SAFE_NAME.fullmatch(name):
        return name
    plain = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".")[:40] or "model"
    return f"{plain}-{hashlib.sha256(name.encode()).hexdigest()[:12]}"


def _slug(key: str) -> str:
    return key.replace("/", "__")


def _open_index(path: Path) -> Any:
    try:
        return _diskcache(path)
    except sqlite3.OperationalError as exc:
        if _is_locked(exc):  # another process holds it: never wipe a healthy index
            raise CacheError(_LOCKED.format(path=path, exc=exc)) from exc
        if _is_full(exc):  # a write error, not damage: read what is there, write nothing
            return _ReadOnlyIndex(path, exc)
        return _rebuild(path, exc)
    except sqlite3.DatabaseError as exc:  # "file is not a database", "malformed"
        return _rebuild(path, exc)


class _ReadOnlyIndex:
    """The index opened read-only, when the disk is too full for diskcache to open it (it
    writes its settings on open): lookups and the offline start's memory keep working, every
    write is a :class:`CacheError` saying the disk is full. Reads through diskcache's own
    ``Disk`` (its key and value encoding); reopened normally once writes succeed again."""

    def __init__(self, path: Path, exc: Exception) -> None:
        self.path = path
        self.reason = f"the disk holding the cache index at {path} is full ({exc})"
        log.warning("%s: serving from it read-only, nothing new is cached until space returns",
                    self.reason)  # fmt: skip
        self._con = _read_only(path / "cache.db")
        settings = dict(
            self._con.execute("SELECT key, value FROM Settings WHERE key LIKE 'disk_%'")
        )
        self._disk = diskcache.Disk(
            str(path),
            min_file_size=int(settings.get("disk_min_file_size", 0)),
            pickle_protocol=int(settings.get("disk_pickle_protocol", 0)),
        )

    def get(self, key: Any, default: Any = None) -> Any:
        db_key, raw = self._disk.put(key)
        row = self._con.execute(
            "SELECT mode, filename, value FROM Cache WHERE key = ? AND raw = ?", (db_key, raw)
        ).fetchone()
        if row is None:
            return default
        try:
            return self._disk.fetch(row[0], row[1], row[2], False)
        except OSError:
            return default

    def iterkeys(self) -> Iterator[Any]:
        for db_key, raw in self._con.execute("SELECT key, raw FROM Cache ORDER BY rowid"):
            yield self._disk.get(db_key, raw)

    def full(self, *args: Any, **kwargs: Any) -> Any:
        raise CacheFull(f"{self.reason}: free space, then retry")

    set = delete = transact = full

    def close(self) -> None:
        self._con.close()


def _diskcache(path: Path) -> diskcache.Cache:
    return diskcache.Cache(
        str(path), eviction_policy="none", size_limit=2**62, timeout=INDEX_TIMEOUT_S
    )


def _rebuild(path: Path, exc: Exception) -> diskcache.Cache:
    log.warning("cache index at %s is unreadable (%s): rebuilding it empty", path, exc)
    remove_tree(path)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return _diskcache(path)


def _is_locked(exc: Exception) -> bool:
    return "locked" in str(exc) or "busy" in str(exc)


def _read_only(db: Path) -> sqlite3.Connection:
    """``db`` opened for reading on a full disk: read-only with its WAL (the -shm a running or
    crashed process left), else ``immutable`` (no -shm to create, which a full disk cannot;
    then writes still in the WAL are not seen, and their entries are fetched again)."""
    for flags in ("mode=ro", "mode=ro&immutable=1"):
        con = sqlite3.connect(f"file:{db}?{flags}", uri=True, check_same_thread=False)
        try:
            con.execute("SELECT count(*) FROM Cache").fetchone()
        except sqlite3.Error:
            con.close()
            continue
        return con
    raise CacheError(f"the cache index {db} cannot be read on this full disk")


def _is_full(exc: Exception) -> bool:
    """SQLite's "database or disk is full", and the I/O error a write past the end of a full
    disk (or a file-size limit) gives: reasons to report and retry, never damage."""
    text = str(exc)
    return "disk is full" in text or "disk I/O error" in text


_LOCKED = (
    "cache index at {path} is locked by another process ({exc}); nothing was changed, "
    "try again (the old version keeps serving meanwhile)"
)


class _Index:
    """The diskcache index, reopened (empty) if its files vanish or break while running.

    An empty index only costs downloads: entries it no longer vouches for are never served.
    A lock held by another process is reported (CacheError) and never treated as damage.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.path = root / "index"
        self._cache = _open_index(self.path)
        self._lock = threading.Lock()

    def _call(self, op: Callable[[diskcache.Cache], Any]) -> Any:
        if isinstance(self._cache, _ReadOnlyIndex):
            with self._lock:  # space may be back: try to open it for writing again
                try:
                    cache = _diskcache(self.path)
                except sqlite3.Error:
                    cache = None
                if cache is not None:
                    self._cache.close()
                    self._cache = cache
                    log.info("cache index at %s is writable again", self.path)
        try:
            return op(self._cache)
        except diskcache.Timeout as exc:
            raise CacheError(_LOCKED.format(path=self.path, exc="timed out")) from exc
        except sqlite3.Error as exc:
            if _is_locked(exc):
                raise CacheError(_LOCKED.format(path=self.path, exc=exc)) from exc
            if _is_full(exc):  # nothing is damaged: the write is reported, the index stays
                raise CacheFull(
                    f"the disk holding the cache index at {self.path} is full ({exc}): "
                    "free space, then retry"
                ) from exc
            with self._lock:
                log.warning(
                    "cache index failed (%s): reopening it, entries will be re-fetched", exc
                )
                with contextlib.suppress(Exception):
                    self._cache.close()
                for sub in ("", "models", "meta", "tmp", "locks"):
                    (self.root / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
                self._cache = _open_index(self.path)
            return op(self._cache)

    def get(self, key: Any) -> Any:
        return self._call(lambda c: c.get(key))

    def set(self, key: Any, value: Any) -> Any:
        return self._call(lambda c: c.set(key, value))

    def delete(self, key: Any) -> Any:
        return self._call(lambda c: c.delete(key))

    def iterkeys(self) -> list[Any]:
        keys: list[Any] = self._call(lambda c: list(c.iterkeys()))
        return keys

    def transact(self) -> Any:
        return self._cache.transact()

    def close(self) -> None:
        self._cache.close()


def _manifest(root: Path) -> dict[str, tuple[int, str]]:
    files = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            full = Path(dirpath) / name
            files[str(full.relative_to(root))] = (full.stat().st_size, _sha256(full))
    return files


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _check(root: Path, files: dict[str, Any], verify: Verify) -> str | None:
    """None when ``root`` matches its manifest, else what is wrong."""
    if not root.is_dir():
        return "directory missing"
    if verify == "none":
        return None
    for rel, (size, digest) in files.items():
        path = root / rel
        try:
            actual = path.stat().st_size
        except OSError:
            return f"{rel} is missing"
        if actual != size:
            return f"{rel} has {actual} bytes, expected {size}"
        if verify == "full" and _sha256(path) != digest:
            return f"{rel} has the wrong sha256"
    return None


@contextlib.contextmanager
def _flock(path: Path, mode: int, timeout_s: float, key: str) -> Iterator[None]:
    def timed_out() -> Exception:
        return CacheError(
            f"timed out after {timeout_s:.0f}s waiting for the lock on {key}: another "
            "process holds it; raise cache.lock_timeout_s if downloads are slow"
        )

    with flock(path, mode, time.monotonic() + timeout_s, timed_out):
        yield


def _untrusted(paths: list[Path]) -> str | None:
    """Why these files could have been written by someone else (not owned by this user, or
    group/world-writable), or None."""
    uid = os.geteuid()
    for path in paths:
        try:
            st = os.stat(path)
        except OSError as exc:
            return f"{path} cannot be checked ({exc.strerror})"
        if st.st_uid != uid:
            return f"{path} is owned by uid {st.st_uid}, not this process's {uid}"
        if st.st_mode & 0o022:
            return f"{path} is writable by its group or others (mode {st.st_mode & 0o777:o})"
    return None


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (here: a download's or a worker's owner)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
