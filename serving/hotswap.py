"""Following: the poll loop, push refreshes, and watchdog on local models and the config file.

Threads (watchdog's observer) reach the event loop only through ``call_soon_threadsafe``; every
refresh runs the loader's synchronous ``ModelManager.refresh`` in the daemon's load executor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from loader.poller import PollSchedule
from loader.uri import RefKind, parse_uri

if TYPE_CHECKING:
    from watchdog.events import FileSystemEvent

    from serving.app import Daemon

log = logging.getLogger(__name__)
DEBOUNCE_S = 0.5


class Follower:
    """Re-resolve every followed ref on a schedule, at once when poked, and on file changes."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self._wake = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._observer = None
        self._watched: dict[str, object] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}

    @property
    def schedule(self) -> PollSchedule:
        return PollSchedule(self.daemon.config.registry.poll_interval_s)

    def poke(self) -> None:
        """Poll now (from the loop thread)."""
        self._wake.set()

    async def run(self) -> None:
        """The poll loop; the daemon's initial load has already happened."""
        failures = 0
        while True:
            delay = self.schedule.next_delay(failures)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
            self._wake.clear()
            try:
                await self.daemon.refresh()
            except Exception:  # never let following die: the served models keep serving
                log.exception("registry poll failed")
            manager = self.daemon.manager
            down = manager is not None and manager.registry_down_since is not None
            failures = failures + 1 if down else 0

    # -- watchdog -----------------------------------------------------------------------------

    def start_watching(self) -> None:
        """Watch local model directories and the config file (its directory, for atomic saves)."""
        from watchdog.observers import Observer

        self._observer = Observer()
        self._observer.daemon = True
        self._observer.start()
        config_path = self.daemon.config.path
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
        for model in self.daemon.config.models:
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
            self.daemon.spawn(self.daemon.reload_config())
        else:
            name = key.split(":", 1)[1]
            log.info("%s: files changed on disk, reloading", name)
            self.daemon.spawn(self.daemon.refresh([name]))

    def stop(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=10)
            self._observer = None
