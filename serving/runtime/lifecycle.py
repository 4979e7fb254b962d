"""The lifecycle of one running server: start, follow, apply an edited config, stop.

One :class:`Daemon` per app (no globals) holds the bounded *load* executor (MLflow calls,
downloads, ``load_model``), the :class:`~serving.runtime.dataplane.DataPlane` (one predict
worker per route), the :class:`~loader.manager.ModelManager` and the
:class:`~serving.runtime.follower.Follower`. No aiohttp here: a transport starts and stops it
(``serving.http``'s cleanup context) and every blocking call runs off the event loop.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import logging
from collections.abc import Callable, Coroutine, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from loader.api import make_source
from loader.errors import ModelNotReady, redact
from loader.manager import ModelManager
from serving.config import (
    Config,
    ConfigProblems,
    bound_mlflow_http_retries,
    load_config,
    restart_needed,
)
from serving.runtime import edits
from serving.runtime.arms import Split
from serving.runtime.batching import RouteWorker
from serving.runtime.dataplane import DataPlane
from serving.runtime.follower import Follower
from serving.runtime.metrics import Metrics
from serving.runtime.payloads import PayloadLog
from serving.runtime.peers import merged_status, peer_states, peers_dir, publish_modules
from serving.runtime.supervisor import is_worker

log = logging.getLogger(__name__)
T = TypeVar("T")


class Daemon:
    """The state of one running server.

    ``reload`` re-reads the configuration when its file changes (default: the file alone).
    """

    def __init__(self, config: Config, *, reload: Callable[[], Config] | None = None) -> None:
        self.config = config
        self._reload = reload or (lambda: load_config(config.path) if config.path else config)
        self.follower: Follower | None = None
        self.manager: ModelManager | None = None
        self.metrics = Metrics(lambda: self.manager)
        self.dataplane = DataPlane(config, on_batch=self.metrics.batch)
        self.dataplane.on_shadow = self.metrics.shadow
        self.payloads = None
        if config.logging_payloads.enabled:
            self.payloads = PayloadLog(config.logging_payloads, observe=self.metrics.payload)
            self.dataplane.payloads = self.payloads
        self.load_pool = ThreadPoolExecutor(1, thread_name_prefix="modeld-load")
        self.start_error: str | None = None
        self._config_digest = _digest(config.path) if config.path else None
        self._tasks: set[asyncio.Task[Any]] = set()
        # --workers: the other workers' runtime edits this one has applied (serving.runtime.edits)
        self._edits_dir = peers_dir() if is_worker() else None
        self._edits_applied = 0
        self._edits_own: set[int] = set()
        self._edits_lock = asyncio.Lock()
        self._config_id = edits.config_digest(config.path, config.models)

    @property
    def workers(self) -> dict[str, RouteWorker]:
        """The routes' predict workers (the data plane's)."""
        return self.dataplane.workers

    async def in_load_pool(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.load_pool, fn, *args)

    async def start(self) -> None:
        """Build the pipeline and load every model, off the event loop, then follow.

        The cyclic collector is off until then: starting is mostly importing (MLflow, the
        model's flavor) and loading, which allocate a great many objects that all live on, so
        collections would only re-scan them (about a tenth of the start). Then everything is
        frozen out of the collector's reach, so a full collection never pauses requests for
        ~0.2 s, and no collection runs first: the start leaves ~2,000 unreachable objects (a
        few hundred KB), cheaper kept than a 0.2 s pause just as the server turns ready.
        """
        if self.payloads is not None:
            self.payloads.start()
        gc.disable()
        try:
            try:
                manager = await self.in_load_pool(self._build_manager)
            except Exception as exc:  # the server keeps answering probes with the reason
                self.start_error = redact(f"{type(exc).__name__}: {exc}")
                log.exception("modeld could not start its model pipeline")
                return
            self.manager = self.dataplane.manager = manager
            if self._edits_dir is not None:  # before anything is served: the fleet's edits
                await self.apply_edits(at_start=True)
            await self.refresh()
            if (directory := peers_dir()) is not None:  # before "started": the supervisor
                await self.in_load_pool(publish_modules, directory)  # forks from those
            self.metrics.started = True
            await self.in_load_pool(self.metrics.publish)
        finally:
            gc.freeze()
            gc.enable()
        self.follower = Follower(
            manager,
            lambda: self.config,
            on_config_change=lambda: self.spawn(self.reload_config()),
            on_model_change=lambda name: self.spawn(self.refresh([name])),
        )
        self.follower.start()
        # An edit made while the models loaded, before the file was watched, is applied now.
        path = self.config.path
        if path and await self.in_load_pool(_digest, path) != self._config_digest:
            log.info("config: %s changed while starting: reloading it", path)
            self.spawn(self.reload_config())

    def _build_manager(self) -> ModelManager:
        bound_mlflow_http_retries()
        source = make_source(self.config.source_options())
        source.cache.observer = self.metrics.cache_event
        source.envs.observer = self.metrics.observe
        source.start_timeout_s = self.config.server.load_timeout_s
        manager = ModelManager(
            source, observer=self.metrics.observe, load_timeout_s=self.config.server.load_timeout_s
        )
        manager.set_routes(self.config.route_specs())
        return manager

    async def reload_config(self) -> None:
        """Apply an edited config file: add, remove or change models without a restart.

        An invalid edit is logged and ignored; the old configuration keeps serving.
        """
        try:
            new = await self.in_load_pool(self._reload)
            changed = []
            if self.manager is not None:
                changed = await self.in_load_pool(self.manager.set_routes, new.route_specs())
        except ConfigProblems as exc:
            log.error("config reload ignored, still serving the previous config: %s", exc)
            return
        except Exception:
            log.exception("config reload ignored, still serving the previous config")
            return
        config_id = await self.in_load_pool(edits.config_digest, new.path, new.models)
        old, self.config, self._config_id = self.config, new, config_id
        for section in restart_needed(old, new):
            log.warning("config: [%s] changed; it takes effect after a restart", section)
        if old.registry.poll_interval_s != new.registry.poll_interval_s:
            log.info("config: poll interval now %ss", new.registry.poll_interval_s)
        self.dataplane.configure(new)
        self.metrics.history.forget({spec.name for spec in new.route_specs()})
        await self.dataplane.retire_workers()
        if self.follower is not None:
            self.follower.sync_model_watches()
        if changed:
            await self.refresh(changed)
        if self._edits_dir is not None:  # the edits the other workers made under this config
            await self.apply_edits(at_start=True)

    async def refresh(self, names: Iterable[str] | None = None, *, force: bool = False) -> None:
        """Re-resolve ``names`` (default: every route) now, in the load executor."""
        manager = self.manager
        if manager is not None:
            await self.in_load_pool(lambda: manager.refresh(names, force=force))

    async def share(self, kind: str, name: str, value: Any = None) -> None:
        """With ``--workers``: record a runtime edit this worker has just applied, for every
        other worker (and every worker forked later) to apply too; nothing on one server."""
        directory = self._edits_dir
        if directory is None:
            return
        ref = None
        if kind == edits.PIN and self.manager is not None:
            ref = self.manager.route(name).ref.uri
        config = self._config_id if kind in edits.UNTIL_RELOAD else None
        try:
            seq = await self.in_load_pool(
                lambda: edits.record(directory, kind, name, value, config=config, ref=ref)
            )
        except OSError as exc:  # (a full or read-only disk) the edit stands here: say so
            log.error("%s of %s applied by this worker only: the edit ledger: %s", kind, name, exc)
            return
        self._edits_own.add(seq)
        edits.relay()

    async def apply_edits(self, *, at_start: bool = False) -> None:
        """Apply the runtime edits other workers recorded since the last call (``at_start``:
        every one that still holds, its own included, as a worker forked later or one whose
        config was just reloaded does; a past poll request is not repeated). Each is applied
        as on the worker that took it; one that fails here is logged and skipped."""
        directory, manager = self._edits_dir, self.manager
        if directory is None or manager is None:
            return
        async with self._edits_lock:
            try:
                entries = await self.in_load_pool(edits.read, directory)
            except (OSError, ValueError, TypeError) as exc:
                log.error("could not read the workers' runtime edits: %s", exc)
                return
            after = 0 if at_start else self._edits_applied
            for edit in edits.pending(entries, after, self._config_id):
                if edit.kind == edits.POLL if at_start else edit.seq in self._edits_own:
                    continue  # (a reload ends this worker's own edits as it does the others')
                try:
                    await self._apply(manager, edit)
                except Exception as exc:  # the other worker applied it; this one says why not
                    why = redact(f"{type(exc).__name__}: {exc}")
                    log.error("%s of %s, made through another worker, not applied here: %s",
                              edit.kind, edit.name, why)  # fmt: skip
            self._edits_applied = max([self._edits_applied, *(e.seq for e in entries)])

    async def _apply(self, manager: ModelManager, edit: edits.Edit) -> None:
        log.info("applying %s of %s (%s), made through another worker", edit.kind, edit.name,
                 edit.value)  # fmt: skip
        if edit.kind == edits.POLL:
            if self.follower is not None:
                self.follower.poke()
        elif edit.kind == edits.WEIGHTS:
            split = self.dataplane.splits.get(edit.name)
            if split is not None:
                split.set_weights(edit.value)
        else:
            spec = next((m.route_spec() for m in self.config.models if m.name == edit.name), None)
            await self.in_load_pool(edits.apply_to_manager, manager, edit, spec)

    def status_view(self, name: str | None = None) -> dict[str, Any]:
        """The status as JSON-ready data (of route ``name``, or all): with ``--workers``,
        every worker's view merged into it. Blocking (it reads the other workers' files): run
        it off the loop.

        Raises:
            ModelNotReady: the pipeline is not built yet, or no route ``name``.
        """
        manager = self.manager
        if manager is None:
            raise ModelNotReady(name or "any model")
        splits = self.dataplane.splits
        if name is not None and name not in splits:
            manager.route(name)  # ModelNotReady for an unknown route
        status = manager.status().to_dict()
        directory = peers_dir()
        if directory:
            status = merged_status(status, peer_states(directory))
        by_name = {m["name"]: m for m in status["models"]}
        if name is None:
            status["splits"] = [_split_view(split, by_name) for split in splits.values()]
            return status
        if name in splits:
            return _split_view(splits[name], by_name)
        view: dict[str, Any] = by_name[name]
        return view

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def stop(self) -> None:
        if self.follower is not None:
            await asyncio.to_thread(self.follower.stop)  # joins the poll and watchdog threads
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.manager is not None:
            await self.in_load_pool(self.manager.close)
        log.info(
            "stopping after answering %d of the %d prediction requests read",
            self.metrics.answered,
            self.metrics.seen,
        )
        await self.in_load_pool(self.dataplane.close)
        if self.payloads is not None:  # what was queued reaches the sinks (bounded)
            await asyncio.to_thread(self.payloads.close)
        self.load_pool.shutdown(wait=True, cancel_futures=True)


def _split_view(split: Split, routes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A route with arms: each arm's weight, share and counts beside its route's status; the
    route is ready when its primary arm (the first answering one) is."""
    view = split.to_dict()
    for arm in view["arms"]:
        arm["status"] = routes.get(arm["route"])
    primary = next((a for a in view["arms"] if not a["shadow"]), None)
    state = primary["status"] if primary is not None else None
    view["name"] = split.route
    view["ready"] = bool(state and state["state"] == "loaded")
    view["version"] = state["version"] if state else None
    return view


def _digest(path: str) -> str | None:
    """The config file's content hash (None: unreadable), to notice an edit not yet watched."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None
