"""modeld's synchronous core: resolve, cache, check and load MLflow models.

Nothing here imports aiohttp or :mod:`serving`; it works in any script::

    import loader
    model = loader.load_model("models:/iris/Production")
    model.predict(df)
"""

from __future__ import annotations

from loader.api import default_cache_dir, load_model, make_source
from loader.cache import CacheEntry, ModelCache
from loader.deps import DependencyPolicy, DependencyReport, Mismatch, check_model_dir
from loader.envs import EnvInfo, EnvSpec, EnvStore, model_environment
from loader.errors import (
    CacheError,
    CacheFull,
    ConfigError,
    DependencyMismatch,
    EnvBuildError,
    InvalidModelURI,
    LoaderError,
    ModelLoadError,
    ModelNotFound,
    ModelNotReady,
    RegistryError,
    RegistryUnavailable,
    WorkerUnavailable,
)
from loader.isolated import IsolatedModel
from loader.live import LiveModel
from loader.manager import ModelHandle, ModelManager
from loader.pipeline import ModelInfo, ModelSource, Prepared, Resolution
from loader.poller import PollSchedule
from loader.registry import ModelVersion, Registry
from loader.uri import ModelRef, RefKind, parse_uri

__all__ = [
    "CacheEntry",
    "CacheError",
    "CacheFull",
    "ConfigError",
    "DependencyMismatch",
    "DependencyPolicy",
    "DependencyReport",
    "EnvBuildError",
    "EnvInfo",
    "EnvSpec",
    "EnvStore",
    "IsolatedModel",
    "InvalidModelURI",
    "LiveModel",
    "LoaderError",
    "Mismatch",
    "ModelCache",
    "ModelHandle",
    "ModelInfo",
    "ModelLoadError",
    "ModelManager",
    "ModelNotFound",
    "ModelNotReady",
    "ModelRef",
    "ModelSource",
    "ModelVersion",
    "PollSchedule",
    "Prepared",
    "RefKind",
    "Registry",
    "RegistryError",
    "RegistryUnavailable",
    "WorkerUnavailable",
    "model_environment",
    "Resolution",
    "check_model_dir",
    "default_cache_dir",
    "load_model",
    "make_source",
    "parse_uri",
]
