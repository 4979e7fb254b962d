"""One model version from ref to loaded pyfunc: resolve -> metadata -> deps -> fetch -> load.

:class:`ModelSource` ties the Registry, the ModelCache and the dependency policy together. It is
synchronous and shared: ``load_model``, the :class:`~loader.manager.ModelManager` and the daemon
all go through it.
"""

from __future__ import annotations

import dataclasses
import logging
import pickle
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loader.cache import CacheEntry, ModelCache, Verify
from loader.deps import (
    DependencyPolicy,
    DependencyReport,
    Policy,
    check_model_dir,
    environment_fingerprint,
)
from loader.envs import EnvInfo, EnvStore, model_environment
from loader.errors import LoaderError, RegistryUnavailable
from loader.inherit import take as inherited
from loader.pyfunc import PyFuncLoader
from loader.registry import METADATA_FILES, ModelVersion, Registry
from loader.uri import ModelRef

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Resolution:
    """What a ref resolved to, and whether that came from the cache's memory (registry down)."""

    ref: ModelRef
    version: ModelVersion
    stale: bool = False


@dataclass(frozen=True, slots=True)
class Prepared:
    """A version on local disk that passed the dependency policy."""

    version: ModelVersion
    path: Path
    report: DependencyReport
    cache_key: str | None
    downloaded: bool


@dataclass(slots=True)
class ModelInfo:
    """Attached to every loaded model as ``model.modeld``: where it came from."""

    uri: str
    name: str
    version: int
    source: str
    run_id: str | None
    cache_path: str
    dependency_report: DependencyReport
    stale: bool = False
    loaded_at: float = field(default_factory=time.time)
    model_version: ModelVersion | None = None
    #: The isolated environment the model runs in (None: in this process).
    environment: EnvInfo | None = None
    #: How it was loaded: ``mlflow``, ``snapshot`` (the cache's pickle), ``isolated`` (a worker
    #: process of its environment) or ``inherited`` (from the parent of ``--workers``).
    loaded_by: str = "mlflow"


class ModelSource:
    """Resolve, fetch, check and load model versions through one registry and one cache."""

    def __init__(
        self,
        registry: Registry,
        cache: ModelCache,
        *,
        dependency_policy: DependencyPolicy | None = None,
        verify: Verify = "size",
        snapshots: bool = True,
        envs: EnvStore | None = None,
        start_timeout_s: float | None = None,
    ) -> None:
        self.snapshots = snapshots
        #: Where isolated environments are built (under the cache root unless given).
        self.envs = envs if envs is not None else EnvStore(cache.root / "envs")
        #: How long an isolated model's worker may take to load it (None: the default).
        self.start_timeout_s = start_timeout_s
        self.registry = registry
        self.cache = cache
        self.policy = dependency_policy or DependencyPolicy()
        self.verify: Verify = verify

    # -- resolve ------------------------------------------------------------------------------

    def resolve_many(
        self, refs: Iterable[ModelRef], *, known: Mapping[ModelRef, ModelVersion] | None = None
    ) -> dict[ModelRef, Resolution | LoaderError]:
        """Resolve refs with one registry request; fall back to remembered answers when down.

        Never raises for the registry being down: each ref gets either a stale
        :class:`Resolution` from the cache's memory or the :class:`RegistryUnavailable` error.
        """
        refs = list(refs)
        out: dict[ModelRef, Resolution | LoaderError] = {}
        remote = [r for r in refs if r.is_remote]
        local = [r for r in refs if not r.is_remote]
        answers = self.registry.resolve_many(local) if local else {}
        if remote:
            try:
                answers.update(self.registry.resolve_many(remote, known=known))
            except RegistryUnavailable as exc:
                out.update({ref: self._recall(ref, exc) for ref in remote})
        for ref, answer in answers.items():
            if isinstance(answer, RegistryUnavailable):  # one artifact store down
                out[ref] = self._recall(ref, answer)
            elif isinstance(answer, LoaderError):
                out[ref] = answer
            else:
                out[ref] = Resolution(ref, answer)
        return out

    def remember(self, ref: ModelRef, version: ModelVersion) -> None:
        """Record that ``ref`` was served (or fetched by ``modeld pull``) as ``version``: what a
        start with the registry down serves. A version that was resolved but never served (say,
        rejected by the dependency check) is never remembered, so it cannot shadow the last good
        one. A failure to write is logged: it must not stop serving."""
        if not ref.is_remote:
            return
        try:
            self.cache.remember(self.registry.identity, ref.uri, version)
        except LoaderError as exc:
            log.warning("could not remember %s for %s: %s", version.label, ref.uri, exc)

    def resolve(self, ref: ModelRef) -> Resolution:
        """Resolve one ref (see :meth:`resolve_many`).

        Raises:
            ModelNotFound, RegistryUnavailable, RegistryError
        """
        answer = self.resolve_many([ref])[ref]
        if isinstance(answer, LoaderError):
            raise answer
        return answer

    def _recall(self, ref: ModelRef, exc: RegistryUnavailable) -> Resolution | LoaderError:
        remembered = self.cache.recall(self.registry.identity, ref.uri)
        if remembered is None or self.cache.lookup(self.cache.key(remembered)) is None:
            return RegistryUnavailable(exc.registry, exc.reason, uri=ref.uri)
        return Resolution(ref, remembered, stale=True)  # the manager says so, once an outage

    # -- prepare ------------------------------------------------------------------------------

    def policy_for(self, policy: Policy | None) -> DependencyPolicy:
        """The pipeline's dependency policy, or the same with another ``policy`` (a route's)."""
        if policy is None or policy == self.policy.policy:
            return self.policy
        return dataclasses.replace(self.policy, policy=policy)

    def prepare(self, version: ModelVersion, *, policy: DependencyPolicy | None = None) -> Prepared:
        """Get ``version`` onto local disk; under the strict policy the dependencies are checked
        on the small metadata files before the weights come (other policies cannot refuse, so
        they skip that extra round trip).

        Raises:
            DependencyMismatch: the strict policy refuses the model (weights not downloaded).
            RegistryUnavailable, RegistryError, CacheError: the files could not be fetched.
        """
        policy = policy or self.policy
        if version.local_path is not None:
            path = Path(version.local_path)
            report = self._check(version, path, policy)
            return Prepared(version, path, report, None, downloaded=False)
        key = self.cache.key(version)
        entry: CacheEntry | None = self.cache.lookup(key, verify=self.verify)
        if entry is None:
            if policy.policy == "strict":  # may refuse: decide before the weights come
                meta = self.cache.fetch_metadata(
                    version, lambda dst: self.registry.download(version, dst, files=METADATA_FILES)
                )
                self._check(version, meta.path, policy)
            entry = self.cache.fetch(
                version, lambda dst: self.registry.download(version, dst), verify=self.verify
            )
        report = self._check(version, entry.path, policy, enforce=False)
        return Prepared(version, entry.path, report, key, downloaded=entry.downloaded)

    @staticmethod
    def _check(
        version: ModelVersion, path: Path, policy: DependencyPolicy, *, enforce: bool = True
    ) -> DependencyReport:
        report = check_model_dir(path, policy)
        if enforce:
            policy.enforce(version.label, report)
        return report

    # -- environment --------------------------------------------------------------------------

    def environment(
        self, prepared: Prepared, *, policy: DependencyPolicy | None = None
    ) -> EnvInfo | None:
        """The isolated environment ``prepared`` runs in under the policy (found or built),
        None when it runs in this process.

        Raises:
            EnvBuildError: no Python of the model's version here, or the build failed.
        """
        if not (policy or self.policy).isolates(prepared.report):
            return None
        spec = model_environment(prepared.path)
        if spec.skipped:
            log.info(
                "%s: conda packages not installed in its environment (uv installs pip "
                "packages): %s",
                prepared.version.label,
                ", ".join(spec.skipped),
            )
        return self.envs.ensure(spec, prepared.path, prepared.version.label)

    # -- load ---------------------------------------------------------------------------------

    def load(
        self,
        prepared: Prepared,
        *,
        uri: str,
        stale: bool = False,
        model_config: dict[str, Any] | None = None,
        env: EnvInfo | None = None,
    ) -> Any:
        """Load a prepared version with mlflow.pyfunc and attach :class:`ModelInfo`.
        ``model_config`` goes to ``mlflow.pyfunc.load_model(model_config=)`` (such a load
        neither reads nor writes a load snapshot: the snapshot holds the model as loaded
        without one). With ``env`` (:meth:`environment`) the model is loaded by a worker
        process of that environment (:class:`~loader.isolated.IsolatedModel`).

        Raises:
            ModelLoadError: mlflow could not load it.
        """
        started = time.perf_counter()
        how = "mlflow"
        model: Any
        if env is not None:
            from loader.isolated import START_TIMEOUT_S, IsolatedModel

            model = IsolatedModel(
                prepared.path,
                env,
                label=prepared.version.label,
                model_config=model_config,
                start_timeout_s=self.start_timeout_s or START_TIMEOUT_S,
                lease=self.envs.lease(env),
            )
            how = "isolated"
        elif (model := inherited(prepared.path, model_config)) is not None:
            how = "inherited"
        elif model_config:
            model, how = PyFuncLoader(prepared.path).load(model_config=model_config), "mlflow"
        else:
            model, how = self._load_fast(prepared)
        version = prepared.version
        model.modeld = ModelInfo(
            uri=uri,
            name=version.name,
            version=version.version,
            source=version.source,
            run_id=version.run_id,
            cache_path=str(prepared.path),
            dependency_report=prepared.report,
            stale=stale,
            model_version=version,
            environment=env,
            loaded_by=how,
        )
        log.info(
            "loaded %s in %.3fs from %s%s",
            version.label,
            time.perf_counter() - started,
            prepared.path,
            {
                "snapshot": " (snapshot)",
                "isolated": f" (environment {env and env.key})",
                "inherited": " (shared with the parent process)",
            }.get(how, ""),
        )
        return model

    def _load_fast(self, prepared: Prepared) -> tuple[Any, str]:
        """Load from the cache's snapshot when one exists for this environment, else with
        mlflow.pyfunc (then save a snapshot: a pickle load is 10-40x faster than skops)."""
        key = prepared.cache_key
        if key is None or not self.snapshots:
            return PyFuncLoader(prepared.path).load(), "mlflow"
        fingerprint = environment_fingerprint(prepared.path)
        data = self.cache.read_snapshot(key, fingerprint)
        if data is not None:
            try:
                return pickle.loads(data), "snapshot"
            except Exception as exc:  # stale class paths and the like: fall back, rewrite
                log.warning("load snapshot of %s unusable (%s): loading normally", key, exc)
        model = PyFuncLoader(prepared.path).load()
        try:
            data = pickle.dumps(model, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # not every model pickles (open sessions, locks...)
            log.debug("no load snapshot for %s: %s", key, exc)
        else:
            self.cache.write_snapshot(key, fingerprint, data)
        return model, "mlflow"
