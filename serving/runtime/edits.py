"""Runtime edits made through one worker, applied by every worker of a ``--workers`` server.

An operator's edit (``/admin`` pin and unpin, arm weights, a refresh or a webhook's poll, the
Open Inference Protocol's repository load and unload) reaches whichever worker accepted the
connection. That worker applies it as one server does, then records it in the *ledger* beside
the workers' state files and signals the supervisor (:data:`RELAY_SIGNAL`), which passes the
signal to every worker: each applies the entries it has not applied yet. A worker forked later
(a restart, the supervisor's next generation) applies the ledger before it serves, so a pin made
during an incident holds in every worker, the ones to come included.

An entry lasts as long as the edit would on one server: weights and repository edits until a
config reload (an entry keeps the digest of the config it was made under, and the supervisor
records a reload mark when it passes SIGHUP on), a pin until its route's ref changes (an entry
keeps the ref). Later edits of the same kind and route replace earlier ones, so the ledger stays
as small as the set of routes. No aiohttp and no event loop here: the file work is blocking.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import signal
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import orjson

from loader.manager import ModelManager, RouteSpec

LEDGER_FILE = "modeld-edits.json"
_LOCK_FILE = "modeld-edits.lock"
#: A worker tells the supervisor (which tells every worker) that the ledger has a new entry.
RELAY_SIGNAL = signal.SIGUSR1

PIN, UNPIN, WEIGHTS, LOAD, UNLOAD, POLL, RELOAD = (
    "pin", "unpin", "weights", "load", "unload", "poll", "reload"
)  # fmt: skip
#: The kinds that a config reload ends (the config is the truth; these edit it at run time).
UNTIL_RELOAD = frozenset({WEIGHTS, LOAD, UNLOAD})
#: Kinds whose latest entry per route replaces the earlier ones of its group.
_GROUPS = {PIN: "pin", UNPIN: "pin", WEIGHTS: "weights", LOAD: "repo", UNLOAD: "repo"}


@dataclass(frozen=True, slots=True)
class Edit:
    """One entry: ``kind`` of ``name`` with ``value`` (a version, weights, a ref or None);
    ``config``: the digest of the config it was made under; ``ref``: the route's ref (pins)."""

    seq: int
    kind: str
    name: str
    value: Any = None
    config: str | None = None
    ref: str | None = None


def config_digest(path: str | None, models: Any) -> str:
    """What identifies a config for :data:`UNTIL_RELOAD` edits: its file's bytes, else the
    models it names."""
    if path:
        with contextlib.suppress(OSError), open(path, "rb") as fh:
            return hashlib.sha256(fh.read()).hexdigest()
    return hashlib.sha256(repr(models).encode()).hexdigest()


def record(directory: str, kind: str, name: str, value: Any = None, *, config: str | None = None,
           ref: str | None = None) -> int:  # fmt: skip
    """Add an entry (replacing the earlier ones it supersedes); its sequence number."""
    with _locked(directory):
        entries = read(directory)
        seq = max((e.seq for e in entries), default=0) + 1
        entry = Edit(seq, kind, name, value, config, ref)
        entries = [e for e in entries if not _superseded(e, entry)] + [entry]
        path = os.path.join(directory, LEDGER_FILE)
        tmp = f"{path}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(orjson.dumps([asdict(e) for e in entries]))
        os.replace(tmp, path)
    return seq


def read(directory: str) -> list[Edit]:
    """Every entry, oldest first (none when there is no ledger yet)."""
    try:
        with open(os.path.join(directory, LEDGER_FILE), "rb") as fh:
            raw = orjson.loads(fh.read())
    except FileNotFoundError:
        return []
    return [Edit(**e) for e in raw]


def pending(entries: list[Edit], after: int, config: str) -> list[Edit]:
    """The entries after sequence ``after`` that still hold under ``config``: an
    :data:`UNTIL_RELOAD` entry made under another config, or before a reload mark, does not."""
    reloaded = max((e.seq for e in entries if e.kind == RELOAD), default=0)
    return [
        e
        for e in entries
        if e.seq > after
        and e.kind != RELOAD
        and not (e.kind in UNTIL_RELOAD and (e.config != config or e.seq < reloaded))
    ]


def apply_to_manager(manager: ModelManager, edit: Edit, spec: RouteSpec | None) -> None:
    """Apply a pin, unpin, load or unload another worker made (blocking: a refresh).
    ``spec``: the route's configured spec (a load without a ref serves it)."""
    name = edit.name
    if edit.kind == PIN:
        if manager.serves(name) and manager.route(name).ref.uri == edit.ref:
            manager.pin(name, int(edit.value))
            manager.refresh([name], force=True)
    elif edit.kind == UNPIN:
        if manager.serves(name):
            manager.unpin(name)
            manager.refresh([name])
    elif edit.kind == LOAD:
        serve_route(manager, name, edit.value, spec)
    elif edit.kind == UNLOAD and manager.serves(name):
        manager.remove(name)


def serve_route(manager: ModelManager, name: str, uri: str | None, spec: RouteSpec | None) -> None:
    """Serve ``name`` from ``uri`` (else its configured ref), keeping a served route's own
    options (else the configured ones), and resolve it now (blocking)."""
    target = uri or (spec.uri if spec is not None else "")
    if manager.serves(name):
        manager.update(name, target, **manager.route(name).spec.options())
    else:
        manager.add(name, target, **(spec.options() if spec is not None else {}))
    manager.refresh([name], force=True)


def relay() -> None:
    """Tell the supervisor that the ledger has a new entry (it tells every worker)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(os.getppid(), RELAY_SIGNAL)


def _superseded(old: Edit, new: Edit) -> bool:
    if new.kind == POLL:
        return old.kind == POLL
    if new.kind == RELOAD:  # what a reload ends goes, and the earlier marks
        return old.kind == RELOAD or old.kind in UNTIL_RELOAD
    group = _GROUPS.get(new.kind)
    return group is not None and _GROUPS.get(old.kind) == group and old.name == new.name


@contextlib.contextmanager
def _locked(directory: str) -> Iterator[None]:
    with open(os.path.join(directory, _LOCK_FILE), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
