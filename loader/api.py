"""``load_model``: ``mlflow.pyfunc.load_model`` with a verified disk cache and offline start."""

from __future__ import annotations

import os
import threading
import weakref
from pathlib import Path
from typing import Any

from loader.cache import ModelCache, Verify
from loader.deps import DependencyPolicy, Match, Policy
from loader.errors import LoaderError
from loader.pipeline import ModelSource
from loader.pyfunc import import_ahead_of_mlflow
from loader.registry import Registry, bound_http_retries
from loader.uri import parse_uri

DEFAULT_CACHE_DIR = "~/.cache/modeld"
_sources: dict[tuple[Any, ...], ModelSource] = {}
_models: weakref.WeakValueDictionary[tuple[Any, ...], Any] = weakref.WeakValueDictionary()
_lock = threading.Lock()


def default_cache_dir() -> Path:
    """``$MODELD_CACHE_DIR``, else ``~/.cache/modeld``."""
    return Path(os.environ.get("MODELD_CACHE_DIR") or DEFAULT_CACHE_DIR).expanduser()


def make_source(
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    tracking_uri: str | None = None,
    registry_uri: str | None = None,
    dependency_policy: Policy = "warn",
    dependency_match: Match = "minor",
    dependency_ignore: tuple[str, ...] | list[str] = (),
    verify: Verify = "size",
    max_cache_bytes: int | None = None,
    keep_versions: int | None = None,
    snapshots: bool = True,
) -> ModelSource:
    """Build the shared pipeline (registry client + cache + policy) from plain options.

    Raises:
        ConfigError: a bad option value.
        CacheError: the cache directory cannot be used.
    """
    import_ahead_of_mlflow()
    from mlflow import MlflowClient

    bound_http_retries()
    policy = DependencyPolicy(dependency_policy, dependency_match, tuple(dependency_ignore))
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri)
    cache = ModelCache(
        Path(cache_dir) if cache_dir else default_cache_dir(),
        max_bytes=max_cache_bytes,
        keep_versions=keep_versions,
    )
    return ModelSource(
        Registry(client), cache, dependency_policy=policy, verify=verify, snapshots=snapshots
    )


def load_model(
    uri: str | os.PathLike[str],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    dependency_policy: Policy = "warn",
    dependency_match: Match = "minor",
    dependency_ignore: tuple[str, ...] | list[str] = (),
    tracking_uri: str | None = None,
    registry_uri: str | None = None,
    verify: Verify = "size",
) -> Any:
    """Load a model like ``mlflow.pyfunc.load_model(uri)``, through the verified disk cache.

    The result is the pyfunc model with ``model.modeld`` describing where it came from (name,
    version, source, cache path, dependency report, stale flag). Loading the same version twice in
    one process returns the same object. With the registry unreachable, a ref loaded before is
    served from the cache and marked stale.

    Raises:
        InvalidModelURI: ``uri`` is malformed (the message lists the accepted forms).
        ModelNotFound: no such model, version, alias, or nothing READY in that stage.
        RegistryUnavailable: the registry is down and the cache has no copy for ``uri``.
        DependencyMismatch: ``dependency_policy="strict"`` and the environment does not match.
        CacheError, ModelLoadError: the files could not be cached or loaded.
    """
    ref = parse_uri(uri)
    options = (
        str(Path(cache_dir).expanduser()) if cache_dir else str(default_cache_dir()),
        tracking_uri,
        registry_uri,
        dependency_policy,
        dependency_match,
        tuple(dependency_ignore),
        verify,
    )
    with _lock:
        source = _sources.get(options)
        if source is None:
            source = make_source(
                cache_dir=options[0],
                tracking_uri=tracking_uri,
                registry_uri=registry_uri,
                dependency_policy=dependency_policy,
                dependency_match=dependency_match,
                dependency_ignore=dependency_ignore,
                verify=verify,
            )
            _sources[options] = source
    resolution = source.resolve(ref)
    prepared = source.prepare(resolution.version)
    identity = (
        options,
        prepared.cache_key or str(prepared.path),
        resolution.version.last_updated_ms if prepared.cache_key is None else None,
    )
    with _lock:
        model = _models.get(identity)
    if model is None:
        model = source.load(prepared, uri=ref.uri, stale=resolution.stale)
        with _lock:
            model = _models.setdefault(identity, model)
    model.modeld.stale = resolution.stale
    model.modeld.model_version = resolution.version
    return model


__all__ = ["LoaderError", "default_cache_dir", "load_model", "make_source"]
