"""``load_model``: ``mlflow.pyfunc.load_model`` with a verified disk cache and offline start.

:class:`SourceOptions` is the one description of a pipeline (registry, cache, dependency policy):
``load_model``, :class:`~loader.live.LiveModel`, the daemon and the operator commands all build
theirs from it with :func:`make_source`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loader.azure import prepare_azureml
from loader.cache import ModelCache, Verify
from loader.deps import ENV_MANAGERS, DependencyPolicy, Match, Policy
from loader.envs import BUILD_TIMEOUT_S, EnvStore
from loader.errors import ConfigError, LoaderError
from loader.pipeline import ModelSource
from loader.pyfunc import import_ahead_of_mlflow
from loader.registry import LazyClient, Registry
from loader.uri import parse_uri

DEFAULT_CACHE_DIR = "~/.cache/modeld"
#: Versions of one model a *following* pipeline keeps on disk (LiveModel, the daemon): a ref
#: that moves daily would otherwise fill the volume.
FOLLOWING_KEEP_VERSIONS = 3
_sources: dict[SourceOptions, ModelSource] = {}
_models: weakref.WeakValueDictionary[tuple[Any, ...], Any] = weakref.WeakValueDictionary()
_lock = threading.Lock()


@dataclass(frozen=True, slots=True)
class SourceOptions:
    """How to build a pipeline; every field has the library's default.

    Attributes:
        cache_dir: the disk cache root (default ``~/.cache/modeld``).
        tracking_uri, registry_uri: MLflow's (default: MLflow's own resolution, e.g.
            ``$MLFLOW_TRACKING_URI``).
        dependency_policy: ``strict`` | ``warn`` | ``ignore``.
        dependency_match: ``exact`` | ``minor`` | ``major``, for ``==`` pins.
        dependency_ignore: package names never checked.
        verify: how a cache hit is checked: ``size`` | ``full`` | ``none``.
        max_cache_bytes: size limit with least-recently-used eviction (None: none).
        keep_versions: versions of each model kept on disk (None: all).
        snapshots: keep a pickle of each loaded model beside it (10-40x faster loads).
        env_manager: ``mlflow models serve``'s ``--env-manager``: ``uv`` or ``virtualenv``
            run every version in its own environment (dependency_policy ``isolate_always``),
            ``local`` in this process; None leaves ``dependency_policy`` as given.
        env_build_timeout_s: a build of an environment taking longer fails.
        env_max_bytes: disk budget of the environments (None: none).
        env_parallel_builds: environment builds at once on this node.
        env_pythons: extra Python interpreters (paths or globs) environments may use.
    """

    cache_dir: str | None = None
    tracking_uri: str | None = None
    registry_uri: str | None = None
    dependency_policy: Policy = "warn"
    dependency_match: Match = "minor"
    dependency_ignore: tuple[str, ...] = ()
    verify: Verify = "size"
    max_cache_bytes: int | None = None
    keep_versions: int | None = None
    snapshots: bool = True
    env_manager: str | None = None
    env_build_timeout_s: float = BUILD_TIMEOUT_S
    env_max_bytes: int | None = None
    env_parallel_builds: int = 1
    env_pythons: tuple[str, ...] = ()

    @classmethod
    def of(cls, options: SourceOptions | None = None, **fields: Any) -> SourceOptions:
        """``options`` (or the defaults) with ``fields`` replaced.

        Raises:
            ConfigError: a keyword that is not a field (the message lists the fields).
        """
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(fields) - set(known))
        if unknown:
            raise ConfigError(unknown[0], fields[unknown[0]], f"one of the options {known}")
        for name in ("dependency_ignore", "env_pythons"):
            if name in fields:
                fields[name] = tuple(fields[name])
        manager = fields.get("env_manager")
        if manager is not None and manager not in ENV_MANAGERS:
            raise ConfigError(
                "env_manager", manager, f"one of {sorted(ENV_MANAGERS)} (conda is not supported)"
            )
        if fields.get("cache_dir") is not None:
            fields["cache_dir"] = os.fspath(fields["cache_dir"])
        return dataclasses.replace(options or cls(), **fields)

    @property
    def cache_root(self) -> Path:
        return Path(self.cache_dir or DEFAULT_CACHE_DIR).expanduser()

    @property
    def policy(self) -> Policy:
        """The dependency policy, with ``env_manager`` applied."""
        if self.env_manager is None:
            return self.dependency_policy
        return ENV_MANAGERS[self.env_manager]  # type: ignore[return-value]


def default_cache_dir() -> Path:
    """``~/.cache/modeld``: the cache root when none is given (the daemon also reads
    ``$MODELD_CACHE_DIR``; the library reads no environment variable)."""
    return Path(DEFAULT_CACHE_DIR).expanduser()


def make_source(options: SourceOptions | None = None, **fields: Any) -> ModelSource:
    """Build the shared pipeline (registry client + cache + policy) from ``options`` and/or
    :class:`SourceOptions` fields as keywords.

    Raises:
        ConfigError: a bad option name or value.
        CacheError: the cache directory cannot be used.
    """
    opts = SourceOptions.of(options, **fields)
    import_ahead_of_mlflow()
    tracking_uri, registry_uri = _uris(opts)
    prepare_azureml(tracking_uri, registry_uri)
    policy = DependencyPolicy(opts.policy, opts.dependency_match, tuple(opts.dependency_ignore))
    return ModelSource(
        Registry(_client(opts)),
        make_cache(opts),
        dependency_policy=policy,
        verify=opts.verify,
        snapshots=opts.snapshots,
        envs=make_envs(opts),
    )


def make_cache(options: SourceOptions | None = None, **fields: Any) -> ModelCache:
    """The disk cache ``options`` name, alone (no MLflow import: ``modeld cache ...``).

    Raises:
        ConfigError: a bad option; CacheError: the cache directory cannot be used.
    """
    opts = SourceOptions.of(options, **fields)
    return ModelCache(
        opts.cache_root, max_bytes=opts.max_cache_bytes, keep_versions=opts.keep_versions
    )


def make_envs(options: SourceOptions | None = None, **fields: Any) -> EnvStore:
    """The isolated environments ``options`` name, alone (``modeld env ...``).

    Raises:
        ConfigError: a bad option.
    """
    opts = SourceOptions.of(options, **fields)
    return EnvStore(
        opts.cache_root / "envs",
        build_timeout_s=opts.env_build_timeout_s,
        max_bytes=opts.env_max_bytes,
        parallel_builds=opts.env_parallel_builds,
        pythons=opts.env_pythons,
    )


def share_stores(options: SourceOptions | None = None, **fields: Any) -> int:
    """Build MLflow's database stores for ``options``' tracking and registry URIs in this
    process, with their connections closed, ahead of forking processes that use them.

    MLflow keeps one store per URI, so a process forked after this takes it as it is instead of
    building its own: for a database registry (``sqlite:``, ``postgresql:``, ``mysql:``,
    ``mssql:``), the engine, the schema check and the ORM set-up, ~0.5 s and ~18 MB that each
    process would otherwise write out of the memory it shares with the others. Its connection
    pool is emptied (SQLAlchemy's rule for engines and ``fork``): each process opens its own
    connections. HTTP, Databricks, Azure ML and plugin stores are left alone (cheap to build,
    and some hold sessions or credentials a fork must not share). Returns how many it built.

    Raises whatever building the store raises (the database unreachable, ...).
    """
    from mlflow.store.db.db_types import DATABASE_ENGINES

    lazy = _client(SourceOptions.of(options, **fields))  # the URIs as the client resolves them
    tracking_db = _scheme(lazy.tracking_uri) in DATABASE_ENGINES
    registry_db = _scheme(lazy.registry_uri) in DATABASE_ENGINES
    stores = []
    if tracking_db or registry_db:  # (making the client builds its tracking store)
        client: Any = lazy.client  # (its private parts are untyped)
        if tracking_db:
            stores.append(client._tracking_client.store)
        if registry_db:
            stores.append(client._get_registry_client().store)
    for store in stores:
        engine = getattr(store, "engine", None)
        if engine is not None:
            engine.dispose()
    return len(stores)


def _uris(opts: SourceOptions) -> tuple[str, str]:
    """The tracking and registry URIs ``opts`` give, MLflow's defaults filled in."""
    import mlflow

    return (
        opts.tracking_uri or mlflow.get_tracking_uri(),
        opts.registry_uri or mlflow.get_registry_uri(),
    )


def _client(opts: SourceOptions) -> LazyClient:
    return LazyClient(tracking_uri=opts.tracking_uri, registry_uri=opts.registry_uri)


def _scheme(uri: str) -> str:
    """``postgresql+psycopg2://...`` -> ``postgresql``."""
    return uri.partition(":")[0].partition("+")[0].lower() if ":" in uri else ""


def load_model(
    uri: str | os.PathLike[str], *, model_config: dict[str, Any] | None = None, **options: Any
) -> Any:
    """Load a model like ``mlflow.pyfunc.load_model(uri, model_config=...)``, through the
    verified disk cache.

    ``options`` are :class:`SourceOptions` fields (``cache_dir``, ``dependency_policy``,
    ``tracking_uri``, ``env_manager``...). With ``env_manager="uv"`` (or a dependency policy
    of ``isolate`` and a mismatch) the model's calls run in a worker process of its own
    environment, built from its requirements and cached beside it (``model.close()`` stops the
    worker; so does dropping the model). The result is the pyfunc model with ``model.modeld``
    describing where it came from (name, version, source, cache path, dependency report,
    environment, stale flag). Loading the same version twice in one process returns the same
    object. With the registry unreachable, a ref loaded before is served from the cache and
    marked stale.

    Raises:
        InvalidModelURI: ``uri`` is malformed (the message lists the accepted forms).
        ConfigError: an unknown option or a bad option value.
        ModelNotFound: no such model, version, alias, or nothing READY in that stage.
        RegistryUnavailable: the registry is down and the cache has no copy for ``uri``.
        DependencyMismatch: ``dependency_policy="strict"`` and the environment does not match.
        EnvBuildError: its isolated environment could not be built (no Python of its version
            here, or uv failed).
        CacheError, ModelLoadError: the files could not be cached or loaded.
    """
    ref = parse_uri(uri)
    opts = SourceOptions.of(**options)
    opts = dataclasses.replace(opts, cache_dir=str(opts.cache_root))
    with _lock:
        source = _sources.get(opts)
        if source is None:
            source = _sources[opts] = make_source(opts)
    resolution = source.resolve(ref)
    prepared = source.prepare(resolution.version)
    identity = (
        opts,
        prepared.cache_key or str(prepared.path),
        resolution.version.last_updated_ms if prepared.cache_key is None else None,
        json.dumps(model_config, sort_keys=True, default=str) if model_config else None,
    )
    with _lock:
        model = _models.get(identity)
    if model is None:
        env = source.environment(prepared)
        model = source.load(
            prepared, uri=ref.uri, stale=resolution.stale, model_config=model_config, env=env
        )
        with _lock:
            model = _models.setdefault(identity, model)
    model.modeld.stale = resolution.stale
    model.modeld.model_version = resolution.version
    if not resolution.stale:
        source.remember(ref, resolution.version)  # what an offline start loads for ``uri``
    return model


__all__ = [
    "FOLLOWING_KEEP_VERSIONS",
    "LoaderError",
    "SourceOptions",
    "default_cache_dir",
    "load_model",
    "make_cache",
    "make_envs",
    "make_source",
    "share_stores",
]
