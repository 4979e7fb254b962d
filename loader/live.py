"""``LiveModel``: an in-process model handle that follows the registry and swaps itself.

The same pipeline as the daemon (ModelSource -> ModelManager), scheduled by a thread::

    with loader.LiveModel("models:/iris@champion", poll_interval_s=30) as live:
        live.predict(frame)          # always one complete model, whatever swaps meanwhile
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from loader.api import make_source
from loader.deps import Match, Policy
from loader.errors import LoaderError, ModelNotReady
from loader.manager import ModelHandle, ModelManager
from loader.poller import PollSchedule

log = logging.getLogger(__name__)
ROUTE = "live"


class LiveModel:
    """Load ``uri`` now and keep following it from a background thread.

    Args:
        uri: any model URI ``load_model`` accepts.
        poll_interval_s: seconds between registry polls (with jitter; backoff while it fails).
        on_swap: called as ``on_swap(old_handle, new_handle)`` from the polling thread.
        keep_versions: versions of the model the disk cache keeps (the least recently used
            beyond it are evicted when a new one arrives; None: all), as the daemon does.
        Other keywords are those of :func:`loader.load_model`.

    Raises:
        InvalidModelURI, ModelNotFound, RegistryUnavailable, DependencyMismatch, ModelLoadError:
            the first load failed (nothing to serve).
    """

    def __init__(
        self,
        uri: str | os.PathLike[str],
        *,
        poll_interval_s: float = 10.0,
        on_swap: Callable[[ModelHandle | None, ModelHandle], None] | None = None,
        keep_versions: int | None = 3,
        cache_dir: str | os.PathLike[str] | None = None,
        dependency_policy: Policy = "warn",
        dependency_match: Match = "minor",
        dependency_ignore: tuple[str, ...] | list[str] = (),
        tracking_uri: str | None = None,
        registry_uri: str | None = None,
        warmup: bool = True,
        retry_base_s: float = 30.0,
    ) -> None:
        self.schedule = PollSchedule(poll_interval_s)
        self._on_swap = on_swap
        source = make_source(
            cache_dir=cache_dir,
            tracking_uri=tracking_uri,
            registry_uri=registry_uri,
            dependency_policy=dependency_policy,
            dependency_match=dependency_match,
            dependency_ignore=dependency_ignore,
            keep_versions=keep_versions,
        )
        self.manager = ModelManager(source, on_swap=self._swapped, retry_base_s=retry_base_s)
        self.manager.add(ROUTE, os.fspath(uri), warmup=warmup)
        self.manager.refresh()
        route = self.manager.route(ROUTE)
        if route.handle is None:
            self.manager.close()
            if isinstance(route.last_error, LoaderError):
                raise route.last_error
            raise ModelNotReady(os.fspath(uri)) from route.last_error
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="modeld-live", daemon=True)
        self._thread.start()

    # -- the caller's side --------------------------------------------------------------------

    @property
    def handle(self) -> ModelHandle:
        """The handle serving now; keep it for a call to stay on one version."""
        return self.manager.get(ROUTE)

    @property
    def version(self) -> int:
        return self.handle.version.version

    def predict(self, data: Any, params: dict[str, Any] | None = None) -> Any:
        """Predict with the version serving now (one complete model, never half-swapped)."""
        return self.handle.predict(data, params)

    def refresh(self) -> None:
        """Poll now (e.g. after a registry webhook)."""
        self._wake.set()

    def status(self) -> dict[str, Any]:
        return self.manager.status(ROUTE)

    def close(self) -> None:
        """Stop following and release the model. Idempotent."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join()
        self.manager.close()

    def __enter__(self) -> LiveModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the polling thread -------------------------------------------------------------------

    def _follow(self) -> None:
        failures = 0
        while not self._stop.is_set():
            self._wake.wait(self.schedule.next_delay(failures))
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.manager.refresh()
            except Exception:  # never let the thread die: the model keeps serving
                log.exception("LiveModel refresh failed")
            failures = failures + 1 if self.manager.registry_down_since is not None else 0

    def _swapped(self, route: str, old: ModelHandle | None, new: ModelHandle) -> None:
        if self._on_swap is not None:
            try:
                self._on_swap(old, new)
            except Exception:
                log.exception("LiveModel on_swap callback raised")
