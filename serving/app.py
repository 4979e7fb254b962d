"""The aiohttp application: ``create_app(config)`` wires the pipeline to HTTP.

One :class:`Daemon` per app (no globals) holds the bounded *load* executor (MLflow calls,
downloads, ``load_model``), one predict worker thread per route (decode, batch, predict,
encode: :mod:`serving.batching`), the shared
:class:`~loader.pipeline.ModelSource` and the :class:`~loader.manager.ModelManager`. Each
resource starts in a ``cleanup_ctx`` and is stopped after its ``yield``.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import gc
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from aiohttp import web

from loader.manager import ModelManager
from serving.batching import RouteWorker
from serving.config import Config, ConfigProblems, ModelConfig, load_config
from serving.errors import error_middleware
from serving.hotswap import Follower
from serving.metrics import Metrics

log = logging.getLogger(__name__)
T = TypeVar("T")

DAEMON: web.AppKey[Daemon] = web.AppKey("daemon")


class Daemon:
    """The state of one running server."""

    def __init__(self, config: Config, *, reload: Callable[[], Config] | None = None) -> None:
        self.config = config
        self._reload = reload or (lambda: load_config(config.path) if config.path else config)
        self.follower: Follower | None = None
        self.metrics = Metrics(self)
        self.load_pool = ThreadPoolExecutor(1, thread_name_prefix="modeld-load")
        self.workers: dict[str, RouteWorker] = {}
        self.manager: ModelManager | None = None
        self.start_error: str | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def in_load_pool(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.load_pool, fn, *args)

    async def start(self) -> None:
        """Build the pipeline and load every model, off the event loop.

        The cyclic collector is off until then: starting is mostly importing (MLflow, the
        model's flavor) and loading, which allocate a great many objects that all live on, so
        collections would only re-scan them (about a tenth of the start). Then everything is
        frozen out of the collector's reach, so a full collection never pauses requests for
        ~0.2 s, and no collection runs first: the start leaves ~2,000 unreachable objects (a
        few hundred KB), cheaper kept than a 0.2 s pause just as the server turns ready.
        """
        gc.disable()
        try:
            try:
                self.manager = await self.in_load_pool(self._build_manager)
            except Exception as exc:  # the server keeps answering probes with the reason
                self.start_error = f"{type(exc).__name__}: {exc}"
                log.exception("modeld could not start its model pipeline")
                return
            await self.refresh()
        finally:
            gc.freeze()
            gc.enable()
        self.follower = Follower(self)
        try:
            self.follower.start_watching()
        except Exception:  # e.g. inotify limits: polling still follows the registry
            log.exception("file watching unavailable; local models reload at each poll")
        self.spawn(self.follower.run())

    def _build_manager(self) -> ModelManager:
        from loader.api import make_source

        c = self.config
        source = make_source(**c.source_options())
        source.cache.observer = self.metrics.cache_event
        manager = ModelManager(
            source, observer=self.metrics.observe, load_timeout_s=c.server.load_timeout_s
        )
        for model in c.models:
            manager.add(model.name, model.uri, **_route_options(model))
        return manager

    async def reload_config(self) -> None:
        """Apply an edited config file: add, remove or change models without a restart.

        An invalid edit is logged and ignored; the old configuration keeps serving.
        """
        try:
            new = await self.in_load_pool(self._reload)
        except ConfigProblems as exc:
            log.error("config reload ignored, still serving the previous config: %s", exc)
            return
        except Exception:
            log.exception("config reload ignored, still serving the previous config")
            return
        old = self.config
        for section in ("server", "registry", "cache", "dependencies", "admin"):
            before_s, after_s = getattr(old, section), getattr(new, section)
            live = {"registry": "poll_interval_s", "server": "predict_threads"}.get(section)
            if live:  # these apply without a restart, the rest does not
                before_s = dataclasses.replace(before_s, **{live: 0})
                after_s = dataclasses.replace(after_s, **{live: 0})
            if before_s != after_s:
                log.warning("config: [%s] changed; it takes effect after a restart", section)
        if old.registry.poll_interval_s != new.registry.poll_interval_s:
            log.info("config: poll interval now %ss", new.registry.poll_interval_s)
        before = {m.name: m for m in old.models}
        after = {m.name: m for m in new.models}
        if self.manager is None:
            self.config = new
            return
        manager = self.manager

        def apply() -> list[str]:
            changed = []
            for name in before.keys() - after.keys():
                manager.remove(name)
                log.info("config: stopped serving %s", name)
            for name, model in after.items():
                if name not in before:
                    manager.add(name, model.uri, **_route_options(model))
                    log.info("config: now serving %s = %s", name, model.uri)
                    changed.append(name)
                elif before[name] != model:
                    manager.update(name, model.uri, **_route_options(model))
                    log.info("config: %s now follows %s", name, model.uri)
                    changed.append(name)
            return changed

        changed = await self.in_load_pool(apply)
        self.config = new
        for name, worker in list(self.workers.items()):
            if name not in after or worker.threads != self.predict_threads(name):
                del self.workers[name]  # the next request starts a new one; this one drains
                await asyncio.to_thread(worker.close)
        if self.follower is not None:
            self.follower.sync_model_watches()
        if changed:
            await self.refresh(changed)

    async def refresh(self, names: Iterable[str] | None = None, *, force: bool = False) -> None:
        if self.manager is not None:
            await self.in_load_pool(lambda: self.manager.refresh(names, force=force))

    def worker(self, route: str) -> RouteWorker:
        """The predict worker of ``route`` (created on first use, on the loop thread)."""
        worker = self.workers.get(route)
        if worker is None:
            server = self.config.server
            worker = RouteWorker(
                route,
                max_batch_size=server.max_batch_size,
                max_batch_delay_s=server.max_batch_delay_ms / 1000,
                threads=self.predict_threads(route),
                on_batch=self.metrics.batch_size.labels(route).observe,
            )
            self.workers[route] = worker
        return worker

    def predict_threads(self, route: str) -> int:
        model = next((m for m in self.config.models if m.name == route), None)
        return (model.predict_threads if model else 0) or self.config.server.predict_threads

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def stop(self) -> None:
        if self.follower is not None:
            await asyncio.to_thread(self.follower.stop)  # joins watchdog's thread
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
        workers, self.workers = list(self.workers.values()), {}
        for worker in workers:
            await self.in_load_pool(worker.close)
        self.load_pool.shutdown(wait=True, cancel_futures=True)


def _route_options(model: ModelConfig) -> dict[str, Any]:
    return {"swap": model.swap, "warmup": model.warmup, "warmup_example": model.warmup_example}


def create_app(config: Config, *, reload: Callable[[], Config] | None = None) -> web.Application:
    """The aiohttp application serving ``config``'s models.

    ``reload`` re-reads the configuration when its file changes (default: the file alone).
    """
    from serving import admin, handlers, oip

    daemon = Daemon(config, reload=reload)
    app = web.Application(
        client_max_size=config.server.max_body_bytes,
        middlewares=[
            daemon.metrics.middleware,
            error_middleware,
            oip.oip_errors,
            handlers.prediction_auth,
        ],
    )
    app[DAEMON] = daemon

    async def pipeline(app: web.Application) -> AsyncIterator[None]:
        if config.server.workers > 1:
            # A worker binds its (shared) port only once its models are loaded, so the kernel
            # never hands a connection to a worker that would answer 503 (at start or after a
            # restart); the other workers answer meanwhile.
            await daemon.start()
        else:
            daemon.spawn(daemon.start())  # listen at once: probes see 503 until loaded
        yield
        await daemon.stop()

    app.cleanup_ctx.append(pipeline)
    handlers.add_routes(app)
    admin.add_routes(app)
    oip.add_routes(app)
    app[admin.SEEN] = collections.OrderedDict()
    return app
