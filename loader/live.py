"""``LiveModel``: an in-process model handle that follows the registry and swaps itself.

The same pipeline as the daemon (ModelSource -> ModelManager), followed by the same poll loop
(:class:`~loader.poller.Poller`), in a thread::

    with loader.LiveModel("models:/iris@champion", poll_interval_s=30) as live:
        live.predict(frame)          # always one complete model, whatever swaps meanwhile
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from loader.api import FOLLOWING_KEEP_VERSIONS, SourceOptions, make_source
from loader.errors import LoaderError, ModelNotReady
from loader.manager import RETRY_BASE_S, ModelHandle, ModelManager
from loader.poller import POLL_INTERVAL_S, Poller, PollSchedule

log = logging.getLogger(__name__)
ROUTE = "live"


class LiveModel:
    """Load ``uri`` now and keep following it from a background thread.

    Args:
        uri: any model URI ``load_model`` accepts.
        poll_interval_s: seconds between registry polls (with jitter; backoff while it fails).
        on_swap: called as ``on_swap(old_handle, new_handle)`` from the polling thread after
            each swap (not for the first load, which happens before the constructor returns).
        warmup: run the model's input example through it before serving a version.
        retry_base_s: first wait before retrying a rejected version (doubling after).
        model_config: passed to ``mlflow.pyfunc.load_model(model_config=)`` for each version.
        options: :class:`~loader.api.SourceOptions` fields (``cache_dir``,
            ``dependency_policy``, ``tracking_uri``, ``env_manager="uv"`` to run every version
            in its own environment...); ``keep_versions`` defaults to 3 here,
            as in the daemon: the least recently used versions of the model beyond it are
            evicted from disk when a new one arrives.

    Raises:
        InvalidModelURI, ModelNotFound, RegistryUnavailable, DependencyMismatch, ModelLoadError:
            the first load failed (nothing to serve).
        ConfigError: an unknown option or a bad option value.
    """

    def __init__(
        self,
        uri: str | os.PathLike[str],
        *,
        poll_interval_s: float = POLL_INTERVAL_S,
        on_swap: Callable[[ModelHandle | None, ModelHandle], None] | None = None,
        warmup: bool = True,
        retry_base_s: float = RETRY_BASE_S,
        model_config: dict[str, Any] | None = None,
        **options: Any,
    ) -> None:
        schedule = PollSchedule(poll_interval_s)
        options.setdefault("keep_versions", FOLLOWING_KEEP_VERSIONS)
        source = make_source(SourceOptions.of(**options))
        self._on_swap = on_swap
        self.manager = ModelManager(source, retry_base_s=retry_base_s)
        self.manager.add(ROUTE, os.fspath(uri), warmup=warmup, model_config=model_config)
        self.manager.refresh()
        route = self.manager.route(ROUTE)
        if route.handle is None:
            self.manager.close()
            if isinstance(route.last_error, LoaderError):
                raise route.last_error
            raise ModelNotReady(os.fspath(uri)) from route.last_error
        self.manager.on_swap = self._swapped  # the first load is the constructor's, not a swap
        self._poller = Poller(self.manager.refresh, lambda: schedule, name="modeld-live")
        self._poller.start()

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
        self._poller.poke()

    def status(self) -> dict[str, Any]:
        """The route's status as JSON-ready data (version, stage, aliases, rejections...)."""
        return self.manager.status(ROUTE).to_dict()

    def close(self) -> None:
        """Stop following and release the model. Idempotent."""
        self._poller.stop()
        self.manager.close()

    def __enter__(self) -> LiveModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _swapped(self, route: str, old: ModelHandle | None, new: ModelHandle) -> None:
        if self._on_swap is not None:
            try:
                self._on_swap(old, new)
            except Exception:
                log.exception("LiveModel on_swap callback raised")
