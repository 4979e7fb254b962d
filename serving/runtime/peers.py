"""With ``--workers``: what each worker serves, published for the others, merged into one view.

Every worker writes its state (the manager's status and a compact form for ``/metrics``) beside
prometheus-client's multiprocess files at every poll and swap, atomically. Whichever worker
answers ``GET /models``, the status page or a scrape reads the others' and reports them all:
each route lists every worker's version, so a swap half done across workers shows both.
"""

from __future__ import annotations

import copy
import glob
import itertools
import os
import sys
from typing import TYPE_CHECKING, Any

import orjson

from loader.cache import pid_alive

if TYPE_CHECKING:
    from loader.manager import ModelManager

#: The directory the supervisor gives its workers (prometheus-client's multiprocess directory).
PEERS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
STATE_FILE_PREFIX = "modeld-state-"
MODULES_FILE_PREFIX = "modeld-modules-"


def peers_dir() -> str | None:
    """The shared directory when this process is one of several workers, else None."""
    return os.environ.get(PEERS_DIR_ENV) or None


def worker_state(manager: ModelManager, *, started: bool = True) -> dict[str, Any]:
    """What this process serves: ``models`` (compact, for the scrape), ``reachable``, and the
    full ``status`` (for ``GET /models`` and the status page)."""
    status = manager.status()
    models = [
        [
            route.name,
            route.ref,
            str(route.version.version),
            str(route.stale).lower(),
            len(route.dependency_report.mismatches) if route.dependency_report else 0,
        ]
        for route in status.models
        if route.version is not None
    ]
    return {
        "pid": os.getpid(),
        "models": models,
        "started": started,
        "loads": in_process_loads(manager),
        "reachable": status.registry.reachable,
        "status": status.to_dict(),
    }


def in_process_loads(manager: ModelManager) -> list[list[Any]]:
    """``[path, model_config]`` of every version this process answers with in-process: what
    the ``--workers`` parent loads once, to fork workers that share it."""
    loads = []
    for route in manager.routes():
        handle = route.handle
        info = getattr(handle.model, "modeld", None) if handle is not None else None
        if handle is None or getattr(info, "environment", None) is not None:
            continue
        loads.append([str(handle.prepared.path), route.spec.model_config])
    return loads


def publish_state(manager: ModelManager, directory: str, *, started: bool = True) -> None:
    """Write this worker's state for whichever worker answers next and for the supervisor,
    which reads ``started`` and ``loads`` (atomically)."""
    state = worker_state(manager, started=started)
    path = os.path.join(directory, f"{STATE_FILE_PREFIX}{os.getpid()}.json")
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as fh:
        fh.write(orjson.dumps(state, default=str))
    os.replace(tmp, path)


#: ``len(sys.modules)`` when this worker was forked (:func:`forked`), else None.
_modules_at_fork: int | None = None


def forked() -> None:
    """In a just-forked worker: note how many modules it inherited."""
    global _modules_at_fork
    _modules_at_fork = len(sys.modules)


def publish_modules(directory: str) -> None:
    """Write the modules this worker imported since its fork, once, before it says it has
    started: the supervisor imports them before it forks the next generation, so their pages
    are shared too.

    Read from the end of ``sys.modules`` (which keeps import order): walking all ~3,000
    entries would touch every inherited module's name, and each object touched in a forked
    process copies its page out of the memory it shares with the others (~6 MB a worker).
    """
    new = len(sys.modules) - (_modules_at_fork or 0)
    recent = itertools.islice(reversed(sys.modules), max(new, 0))
    names = sorted(name for name in recent if sys.modules.get(name) is not None)
    path = os.path.join(directory, f"{MODULES_FILE_PREFIX}{os.getpid()}.json")
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as fh:
        fh.write(orjson.dumps(names))
    os.replace(tmp, path)


def peer_states(directory: str) -> list[dict[str, Any]]:
    """The published states of the other live workers."""
    states = []
    for path in glob.glob(os.path.join(directory, f"{STATE_FILE_PREFIX}*.json")):
        tag = os.path.basename(path)[len(STATE_FILE_PREFIX) : -len(".json")]
        if not tag.isdigit() or int(tag) == os.getpid() or not pid_alive(int(tag)):
            continue
        try:
            with open(path, "rb") as fh:
                states.append(orjson.loads(fh.read()))
        except (OSError, ValueError):  # replaced or removed meanwhile: the next read has it
            continue
    return states


def merged_status(own: dict[str, Any], peers: list[dict[str, Any]]) -> dict[str, Any]:
    """``own`` status (``ManagerStatus.to_dict()``) with every worker's view of each route:
    ``workers`` lists each worker's pid, version, state and stale flag, ``consistent`` says
    whether they all serve the same version, and the registry counts as reachable only when
    every worker reaches it. Peers' states are those :func:`worker_state` published."""
    merged = copy.deepcopy(own)
    views = [(os.getpid(), own)] + [
        (peer.get("pid"), peer["status"]) for peer in peers if isinstance(peer.get("status"), dict)
    ]
    for model in merged["models"]:
        workers = []
        for pid, status in views:
            theirs = next((m for m in status["models"] if m["name"] == model["name"]), None)
            if theirs is not None:
                workers.append(
                    {
                        "pid": pid,
                        "version": theirs["version"],
                        "state": theirs["state"],
                        "stale": theirs["stale"],
                        "loaded_by": theirs.get("loaded_by"),
                    }
                )
        model["workers"] = sorted(workers, key=lambda w: w["pid"] or 0)
        model["consistent"] = len({(w["version"], w["state"]) for w in workers}) == 1
    merged["registry"]["reachable"] = all(s["registry"]["reachable"] for _, s in views)
    merged["workers"] = len(views)
    return merged
