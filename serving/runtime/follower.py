"""Following: the registry poll loop, push refreshes, and watchdog on local models and the config.

The poll loop is the loader's own :class:`~loader.poller.Poller` (the one ``LiveModel`` uses): a
thread calling the manager's synchronous ``refresh`` on the configured schedule. Watchdog's
thread reaches the event loop only through ``call_soon_threadsafe``; what a file change
triggers (a config reload, a local model's refresh) is the lifecycle's to run.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loader.manager import ModelManager
from loader.poller import Poller, PollSchedule
from loader.uri import RefKind, parse_uri
from serving.config import Config

if TYPE_CHECKING:
    from watchdog.events import FileSystemEvent

log = logging.getLogger(__name__)
DEBOUNCE_S = 0.5


class Follower:
    """Re-resolve every followed ref on a schedule, at once when poked, and on file changes.

    Args:
        manager: whose ``refresh`` the poll loop calls.
        config: the configuration in force now (read at each poll and file event).
        on_config_change: called on the loop when the config file changed.
        on_model_change: called on the loop with a route name when its local files changed.
    """

    def __init__(
        self,
        manager: ModelManager,
        config: Callable[[], Config],
        *,
        on_config_change: Callable[[], object],
        on_model_change: Callable[[str], object],
    ) -> None:
        self._config = config
        self._on_config_change = on_config_change
        self._on_model_change = on_model_change
        self._loop = asyncio.get_running_loop()
        self._poller = Poller(
            manager.refresh, lambda: PollSchedule(config().registry.poll_interval_s)
        )
        self._observer: Any = None
        self._watched: dict[str, object] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}

    def start(self) -> None:
        """Start polling, and watching files where the platform allows (else polling alone
        follows local models too)."""
        self._poller.start()
        try:
            self.start_watching()
        except Exception:  # e.g. inotify limits: polling still follows the registry
            log.exception("file watching unavailable; local models reload at each poll")

    def poke(self) -> None:
        """Poll now (thread-safe)."""
        self._poller.poke()

    # -- watchdog -----------------------------------------------------------------------------

    def start_watching(self) -> None:
        """Watch local model directories and the config file (its directory, for atomic saves)."""
        from watchdog.observers import Observer

        self._observer = Observer()
        self._observer.name = "modeld-watch"
        self._observer.daemon = True
        self._observer.start()
        config_path = self._config().path
        if config_path:
            path = Path(config_path).resolve()
            self._watch(
                str(path.parent), recursive=False, on_change=lambda p: p == str(path), key="config"
            )
        self.sync_model_watches()

    def sync_model_watches(self) -> None:
        """Watch exactly the local-path models currently configured."""
        if self._observer is None:
            return
        wanted = {}
        for model in self._config().models:
            ref = parse_uri(model.uri)
            if ref.kind is RefKind.PATH and ref.path and os.path.isdir(ref.path):
                wanted[f"model:{model.name}"] = ref.path
        for key in [k for k in self._watched if k.startswith("model:") and k not in wanted]:
            self._observer.unschedule(self._watched.pop(key))
        for key, path in wanted.items():
            if key not in self._watched:
                self._watch(path, recursive=True, on_change=lambda p: True, key=key)

    def _watch(
        self, path: str, *, recursive: bool, on_change: Callable[[str], bool], key: str
    ) -> None:
        from watchdog.events import FileSystemEventHandler

        follower = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                if event.event_type in ("opened", "closed_no_write"):
                    return
                paths = [os.fsdecode(event.src_path)]
                if getattr(event, "dest_path", None):
                    paths.append(os.fsdecode(event.dest_path))
                if any(on_change(str(Path(p).resolve())) for p in paths):
                    follower._loop.call_soon_threadsafe(follower._debounce, key)

        assert self._observer is not None
        self._watched[key] = self._observer.schedule(Handler(), path, recursive=recursive)

    def _debounce(self, key: str) -> None:
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        self._timers[key] = self._loop.call_later(DEBOUNCE_S, self._fire, key)

    def _fire(self, key: str) -> None:
        self._timers.pop(key, None)
        if key == "config":
            self._on_config_change()
        else:
            name = key.split(":", 1)[1]
            log.info("%s: files changed on disk, reloading", name)
            self._on_model_change(name)

    def stop(self) -> None:
        """Stop polling and watching; joins both threads (blocking: run it off the loop)."""
        self._poller.stop()
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=10)
            self._observer = None
