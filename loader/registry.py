"""Resolve refs to concrete, READY model versions through an ``MlflowClient``.

The Registry only reports: it never downloads weights into the cache nor decides what is served.
``resolve_many`` answers any number of movable refs with ONE ``search_registered_models`` call
(``name IN (...)`` returns each model's aliases and its latest version per stage).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loader.errors import (
    LoaderError,
    ModelNotFound,
    RegistryError,
    RegistryUnavailable,
    redact,
)
from loader.uri import ModelRef, RefKind

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

READY = "READY"
#: Files read before the weights, so a strict dependency refusal costs almost nothing.
METADATA_FILES = ("MLmodel", "requirements.txt", "python_env.yaml", "conda.yaml")
_PAGE_SIZE = 1000
#: Error codes a registry answers for an operation it does not have.
_NO_SUCH_FEATURE = ("ENDPOINT_NOT_FOUND", "FEATURE_DISABLED", "NOT_IMPLEMENTED")
#: A model directory with more files than this is listed no further (its revision then covers
#: those listed).
_MAX_LISTED_FILES = 10_000
#: The pip package each artifact store's client comes in, by the module MLflow imports.
_STORE_PACKAGES = {
    "boto3": "boto3",
    "botocore": "boto3",
    "google": "google-cloud-storage",
    "azure": "azure-storage-blob azure-identity",
    "pyarrow": "pyarrow",
    "pysftp": "pysftp",
}


@dataclass(frozen=True, slots=True)
class ModelVersion:
    """A resolved, concrete model version as the registry described it."""

    registry: str
    name: str
    version: int
    source: str
    run_id: str | None = None
    status: str = READY
    stage: str = "None"
    aliases: tuple[str, ...] = ()
    tags: tuple[tuple[str, str], ...] = ()
    description: str | None = None
    last_updated_ms: int | None = None
    #: Local directory for ``runs:/`` and path refs; registry versions are downloaded instead.
    local_path: str | None = field(default=None, compare=False)
    #: An MLflow 3 logged model (``models:/<model_id>``): its id (also its ``name`` here, which
    #: keys the cache) and the name it was logged under.
    model_id: str | None = None
    logged_name: str | None = None
    #: An artifact store URI: a digest of what the store lists there (paths and sizes), so a
    #: changed model is a new version; part of the cache key.
    revision: str | None = None

    @property
    def label(self) -> str:
        """``name@version`` as used in log lines (a logged model: its id; an artifact store
        URI: its name and revision)."""
        if self.model_id:
            return self.model_id
        if self.revision:
            return f"{self.name}@{self.revision[:8]}"
        return f"{self.name}@{self.version}"

    @property
    def cache_key(self) -> str:
        """Registry identity + name + version + source: two registries never collide."""
        parts = [self.registry, self.name, str(self.version), self.source]
        if self.revision:
            parts.append(self.revision)
        digest = hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:16]
        return f"{self.version}-{digest}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "registry": self.registry,
            "name": self.name,
            "version": self.version,
            "source": self.source,
            "run_id": self.run_id,
            "status": self.status,
            "stage": self.stage,
            "aliases": list(self.aliases),
            "tags": dict(self.tags),
            "description": self.description,
            "last_updated_ms": self.last_updated_ms,
            "local_path": self.local_path,
            "model_id": self.model_id,
            "logged_name": self.logged_name,
            "revision": self.revision,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelVersion:
        return cls(
            registry=data["registry"],
            name=data["name"],
            version=int(data["version"]),
            source=data["source"],
            run_id=data.get("run_id"),
            status=data.get("status", READY),
            stage=data.get("stage", "None"),
            aliases=tuple(data.get("aliases", ())),
            tags=tuple(sorted((data.get("tags") or {}).items())),
            description=data.get("description"),
            last_updated_ms=data.get("last_updated_ms"),
            local_path=data.get("local_path"),
            model_id=data.get("model_id"),
            logged_name=data.get("logged_name"),
            revision=data.get("revision"),
        )


class LazyClient:
    """``MlflowClient(tracking_uri, registry_uri)``, made on first use.

    Making an MlflowClient builds its tracking store at once, and MLflow 3's default store is
    ``sqlite:///mlflow.db``: a process that serves only local paths, or lists the cache, would
    create a 1 MB database in its working directory (and fail on a read-only one), where
    ``mlflow models serve`` touches no store for a local path. The URIs are resolved as the
    client resolves them, without a store; any other attribute makes the client.
    """

    def __init__(self, tracking_uri: str | None = None, registry_uri: str | None = None) -> None:
        from mlflow.tracking._model_registry import utils as registry_utils
        from mlflow.tracking._tracking_service import utils as tracking_utils

        resolve_tracking: Any = tracking_utils._resolve_tracking_uri  # untyped in MLflow
        self.tracking_uri: str = str(resolve_tracking(tracking_uri))
        self.registry_uri = str(registry_utils._resolve_registry_uri(registry_uri, tracking_uri))
        self._args = (tracking_uri, registry_uri)
        self._made: MlflowClient | None = None
        self._lock = threading.Lock()

    @property
    def client(self) -> MlflowClient:
        """The client (made now if it was not yet)."""
        with self._lock:
            if self._made is None:
                from mlflow import MlflowClient

                self._made = MlflowClient(tracking_uri=self._args[0], registry_uri=self._args[1])
            return self._made

    def __getattr__(self, name: str) -> Any:  # only for names not set above
        if name in ("_args", "_made", "_lock"):  # half-built (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.client, name)


class Registry:
    """Resolve :class:`ModelRef` values against one MLflow registry.

    Args:
        client: the ``MlflowClient`` to use (its tracking and registry URIs are honoured).
        identity: a stable name for this registry, used in cache keys; defaults to the client's
            registry URI.
    """

    def __init__(self, client: MlflowClient | LazyClient, *, identity: str | None = None) -> None:
        self.client = client
        if isinstance(client, LazyClient):  # its URIs without its store
            self.tracking_uri: str = client.tracking_uri
            registry_uri = client.registry_uri
        else:
            self.tracking_uri = client._tracking_client.tracking_uri
            registry_uri = str(client._registry_uri)
        self.identity = identity or _redact(str(registry_uri))
        self._batch_filter_ok = True
        #: Whether the registry has model aliases at all (None: not asked yet).
        self._aliases_supported: bool | None = None
        #: Each registered model's last_updated_timestamp as the last resolve_many saw it:
        #: deleting a version touches it, so a remembered version is re-checked only then.
        self._model_stamps: dict[str, Any] = {}
        #: Fixed-version refs whose last answer was "not found", while their model's stamp stays
        #: the same: the answer stands without a call (a deleted pinned version stays reported,
        #: not cleared by the remembered version at the next poll; a deleted version number
        #: never comes back).
        self._missing: dict[ModelRef, tuple[Any, ModelNotFound]] = {}
        #: Number of registry calls made; tests and benchmarks read it.
        self.calls = 0

    # -- resolution ---------------------------------------------------------------------------

    def resolve(self, ref: ModelRef) -> ModelVersion:
        """Resolve one ref to a READY version.

        Raises:
            ModelNotFound: unknown name, version or alias, or nothing READY in that stage.
            RegistryUnavailable: the registry cannot be reached.
            RegistryError: any other registry failure.
        """
        result = self.resolve_many([ref])[ref]
        if isinstance(result, LoaderError):
            raise result
        return result

    def resolve_many(
        self,
        refs: Iterable[ModelRef],
        *,
        known: Mapping[ModelRef, ModelVersion] | None = None,
    ) -> dict[ModelRef, ModelVersion | LoaderError]:
        """Resolve many refs with one batched registry request.

        ``known`` holds the previous answers: an alias still pointing at the same version number,
        or a fixed version, costs no extra call while its registered model is unchanged (its
        last-updated time, which deleting a version moves, is what it was at the last call);
        after a change such a version is fetched again, so a deleted one is reported.

        Raises:
            RegistryUnavailable: the registry cannot be reached (nothing could be resolved).
        """
        refs = list(dict.fromkeys(refs))
        known = known or {}
        out: dict[ModelRef, ModelVersion | LoaderError] = {}
        registry_refs = [r for r in refs if r.is_registry]
        for ref in refs:
            if ref.kind in (RefKind.MODEL_ID, RefKind.ARTIFACT):
                try:  # a logged model never changes: asked once, then known
                    if ref.kind is RefKind.MODEL_ID:
                        out[ref] = known.get(ref) or self._logged_model(ref)
                    else:  # a store's objects can: listed at each poll
                        out[ref] = self._artifact_version(ref)
                except RegistryUnavailable as exc:
                    if ref.kind is RefKind.MODEL_ID:
                        raise  # the tracking server: the registry's refs cannot be asked either
                    out[ref] = exc  # one store down: that ref alone
                except LoaderError as exc:
                    out[ref] = exc
            elif not ref.is_registry:
                out[ref] = self._resolve_local(ref)
        if not registry_refs:
            return out
        names = sorted({r.name for r in registry_refs if r.name is not None})
        models = self._fetch_models(names)
        stamps = {n: getattr(rm, "last_updated_timestamp", None) for n, rm in models.items()}
        for ref in registry_refs:
            name = str(ref.name)
            unchanged = name in self._model_stamps and self._model_stamps[name] == stamps.get(name)
            missing = self._missing.get(ref)
            if unchanged and missing is not None and missing[0] == stamps.get(name):
                out[ref] = missing[1]
                continue
            try:
                out[ref] = self._pick(ref, models.get(name), known.get(ref) if unchanged else None)
            except RegistryUnavailable:
                raise
            except ModelNotFound as exc:
                out[ref] = exc
                if ref.kind is RefKind.VERSION:  # the others are answered by the batch itself
                    self._missing[ref] = (stamps.get(name), exc)
            except LoaderError as exc:
                out[ref] = exc
            else:
                self._missing.pop(ref, None)
        self._model_stamps.update(stamps)
        return out

    def _fetch_models(self, names: list[str]) -> dict[str, Any]:
        """Registered models by name, in one paged call when the backend allows it."""
        batchable = [n for n in names if "'" not in n and "\\" not in n]
        models: dict[str, Any] = {}
        if self._batch_filter_ok and batchable:
            quoted = ", ".join(f"'{n}'" for n in batchable)
            try:
                models.update(self._search(f"name IN ({quoted})"))
            except RegistryError as exc:
                code = getattr(exc.__cause__, "error_code", "")
                if code not in ("INVALID_PARAMETER_VALUE", "BAD_REQUEST", "ENDPOINT_NOT_FOUND"):
                    raise
                log.warning("registry refused a batched search (%s); polling per model", exc)
                self._batch_filter_ok = False
                models.clear()
        for name in names:
            if name in models or (self._batch_filter_ok and name in batchable):
                continue
            try:
                models[name] = self._call(
                    self.client.get_registered_model, name, missing=(name, "registered model")
                )
            except ModelNotFound:
                continue
        return models

    def _search(self, filter_string: str) -> dict[str, Any]:
        # The registry store itself: MLflow 3's client appends a prompt-excluding tag filter
        # to every search, which a registry without tag search (an Azure ML workspace)
        # refuses; a list of names never names a prompt unless one was asked for.
        registry_client = getattr(self.client, "_get_registry_client", None)
        store = getattr(registry_client(), "store", None) if registry_client else None
        search = getattr(store, "search_registered_models", None)
        found: dict[str, Any] = {}
        token = None
        while True:
            if search is not None:
                page = self._call(search, filter_string, _PAGE_SIZE, None, token)
                for rm in page:
                    found[rm.name] = rm
                token = getattr(page, "token", None)
                if not token:
                    return found
                continue
            page = self._call(
                self.client.search_registered_models,
                filter_string=filter_string,
                max_results=_PAGE_SIZE,
                page_token=token,
            )
            for rm in page:
                found[rm.name] = rm
            token = getattr(page, "token", None)
            if not token:
                return found

    def _pick(self, ref: ModelRef, rm: Any, known: ModelVersion | None) -> ModelVersion:
        name = ref.name
        assert name is not None
        if rm is None:
            raise ModelNotFound(
                name, "registered model", detail=f"ref {ref.uri}", registry=self.identity
            )
        aliases_by_version: dict[int, list[str]] = {}
        for alias, number in (rm.aliases or {}).items():
            aliases_by_version.setdefault(int(number), []).append(alias)
        latest = {int(mv.version): mv for mv in rm.latest_versions or ()}

        def finish(mv: Any) -> ModelVersion:
            return self._to_version(mv, tuple(sorted(aliases_by_version.get(int(mv.version), ()))))

        if ref.kind is RefKind.VERSION:
            assert ref.version is not None
            if ref.version in latest:
                return self._require_ready(ref, finish(latest[ref.version]))
            if known is not None and known.version == ref.version:
                aliases = tuple(sorted(aliases_by_version.get(ref.version, ())))
                return replace(known, aliases=aliases)
            return self._require_ready(ref, finish(self._get_version(name, ref.version)))
        if ref.kind is RefKind.ALIAS:
            number = {a.lower(): int(v) for a, v in (rm.aliases or {}).items()}.get(
                str(ref.alias).lower()
            )
            if number is None:
                if not rm.aliases:
                    self._require_aliases(name, str(ref.alias))
                have = ", ".join(sorted(rm.aliases or {})) or "none"
                raise ModelNotFound(
                    name, f"alias {ref.alias!r}", detail=f"aliases: {have}", registry=self.identity
                )
            if number in latest:
                return self._require_ready(ref, finish(latest[number]))
            if known is not None and known.version == number:
                return replace(known, aliases=tuple(sorted(aliases_by_version.get(number, ()))))
            return self._require_ready(ref, finish(self._get_version(name, number)))
        if ref.kind is RefKind.STAGE:
            candidates = [mv for mv in latest.values() if mv.current_stage == ref.stage]
        else:
            candidates = list(latest.values())
        if not candidates:
            what = f"version in stage {ref.stage!r}" if ref.kind is RefKind.STAGE else "versions"
            raise ModelNotFound(name, what, registry=self.identity)
        best = max(candidates, key=lambda mv: int(mv.version))
        if best.status == READY:
            return finish(best)
        # The highest version is still registering (or failed): serve the highest READY one.
        return finish(self._highest_ready(name, ref.stage if ref.kind is RefKind.STAGE else None))

    def _require_aliases(self, name: str, alias: str) -> None:
        """A model without aliases: ask for the alias itself, once per registry, to tell a
        registry that has no aliases at all (an Azure ML workspace) from an alias not set.

        Raises:
            RegistryError: the registry does not support aliases.
        """
        if self._aliases_supported is None:
            try:
                self._call(
                    self.client.get_model_version_by_alias,
                    name,
                    alias,
                    missing=(name, f"alias {alias!r}"),
                )
                self._aliases_supported = True
            except RegistryUnavailable:
                raise
            except RegistryError as exc:  # "no such alias" (MLflow's code varies) or none at all
                code = getattr(exc.__cause__, "error_code", "")
                self._aliases_supported = code not in _NO_SUCH_FEATURE
        if self._aliases_supported is False:
            raise RegistryError(
                f"registry {self.identity} does not support model aliases, so "
                f"models:/{name}@{alias} cannot be resolved there: name a version "
                f"(models:/{name}/3), the latest (models:/{name}/latest) or a stage "
                f"(models:/{name}/Production)"
            )

    def _logged_model(self, ref: ModelRef) -> ModelVersion:
        """An MLflow 3 logged model (``models:/<model_id>``) as a version: its artifact
        location is the source, its run and logged name are shown in status."""
        model_id = str(ref.model_id)
        get = getattr(self.client, "get_logged_model", None)
        if get is None:
            raise RegistryError(
                f"{ref.uri} names an MLflow 3 logged model; this MLflow has no logged models "
                "(install mlflow>=3)"
            )
        lm = self._call(get, model_id, missing=(model_id, "logged model"))
        status = str(getattr(lm.status, "name", lm.status) or READY).upper()
        if status not in (READY, "LOGGED_MODEL_STATUS_READY"):
            raise ModelNotFound(
                model_id, "READY logged model", detail=f"status is {status}", registry=self.identity
            )
        tags = getattr(lm, "tags", None) or {}
        return ModelVersion(
            registry=self.identity,
            name=model_id,
            version=1,
            source=lm.artifact_location,
            run_id=lm.source_run_id or None,
            tags=tuple(sorted(tags.items())),
            last_updated_ms=getattr(lm, "last_updated_timestamp", None),
            model_id=model_id,
            logged_name=lm.name,
        )

    def _artifact_version(self, ref: ModelRef) -> ModelVersion:
        """A model directory at an artifact store URI as a version. Its revision is what the
        store tells cheaply: the listing (paths and sizes, one call per directory) and the
        digest of its small MLmodel file (which MLflow writes anew, with a new model_uuid, at
        every save), so a re-saved model is a new version, fetched, checked, loaded and
        swapped like a registry's."""
        store = _store_identity(ref.uri)
        try:
            files = self._call(self._list_files, ref.uri)
            if "MLmodel" not in files:
                name = _artifact_name(ref)
                have = ", ".join(sorted(files)[:10]) or "nothing"
                raise ModelNotFound(name, "MLmodel file", detail=f"{ref.uri} holds {have}")
            mlmodel = self._call(self._read_file, ref.uri, "MLmodel")
        except RegistryUnavailable as exc:  # the store is what could not be reached
            raise RegistryUnavailable(store, exc.reason) from exc
        listing = "\n".join(f"{path}\x00{size}" for path, size in sorted(files.items()))
        listing += "\n" + hashlib.sha256(mlmodel).hexdigest()
        return ModelVersion(
            registry=store,
            name=_artifact_name(ref),
            version=1,
            source=ref.uri,
            revision=hashlib.sha256(listing.encode()).hexdigest()[:16],
        )

    def _list_files(self, uri: str) -> dict[str, int]:
        """Every file under ``uri`` with its size, through MLflow's artifact repository."""
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        repo = get_artifact_repository(uri, tracking_uri=self.tracking_uri)
        files: dict[str, int] = {}
        pending: list[str | None] = [None]
        while pending and len(files) < _MAX_LISTED_FILES:
            directory = pending.pop()
            for info in repo.list_artifacts(directory):
                if info.is_dir:
                    pending.append(info.path)
                else:
                    files[info.path] = int(info.file_size or 0)
        return files

    def _read_file(self, uri: str, path: str) -> bytes:
        """One small file of the model directory at ``uri``."""
        import tempfile

        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        repo: Any = get_artifact_repository(uri, tracking_uri=self.tracking_uri)
        with tempfile.TemporaryDirectory(prefix="modeld-mlmodel-") as tmp:
            local = repo.download_artifacts(path, dst_path=tmp)
            return Path(local).read_bytes()

    def _highest_ready(self, name: str, stage: str | None) -> Any:
        versions = self._call(
            self.client.search_model_versions, filter_string=f"name = '{name}'", max_results=1000
        )
        ready = [
            mv
            for mv in versions
            if mv.status == READY and (stage is None or mv.current_stage == stage)
        ]
        if not ready:
            what = f"READY version in stage {stage!r}" if stage else "READY version"
            raise ModelNotFound(name, what, registry=self.identity)
        return max(ready, key=lambda mv: int(mv.version))

    def _get_version(self, name: str, version: int) -> Any:
        return self._call(
            self.client.get_model_version, name, str(version), missing=(name, f"version {version}")
        )

    def _require_ready(self, ref: ModelRef, mv: ModelVersion) -> ModelVersion:
        if mv.status != READY:
            raise ModelNotFound(
                mv.name, f"READY version {mv.version}", detail=f"status is {mv.status}"
            )
        return mv

    def _to_version(self, mv: Any, aliases: tuple[str, ...]) -> ModelVersion:
        return ModelVersion(
            registry=self.identity,
            name=mv.name,
            version=int(mv.version),
            source=mv.source or "",
            run_id=mv.run_id or None,
            status=mv.status or READY,
            stage=mv.current_stage or "None",
            aliases=aliases,
            tags=tuple(sorted((mv.tags or {}).items())),
            description=mv.description or None,
            last_updated_ms=mv.last_updated_timestamp,
        )

    def _resolve_local(self, ref: ModelRef) -> ModelVersion | LoaderError:
        if ref.kind is RefKind.PATH:
            path = Path(str(ref.path))
            if not (path / "MLmodel").is_file():
                return ModelNotFound(str(path), "MLmodel file", detail=f"ref {ref.uri}")
            stamp = int((path / "MLmodel").stat().st_mtime_ns // 1_000_000)
            return ModelVersion(
                registry="local",
                name=path.name,
                version=1,
                source=str(path),
                last_updated_ms=stamp,
                local_path=str(path),
            )
        # runs:/ artifacts do not change once logged: the run id and path name them for good.
        return ModelVersion(
            registry=self.identity,
            name=f"run-{ref.run_id}-{ref.path.replace('/', '-') if ref.path else ''}",
            version=1,
            source=ref.uri,
            run_id=ref.run_id,
        )

    # -- downloads ----------------------------------------------------------------------------

    def download(self, version: ModelVersion, dst: Path, *, files: Iterable[str] = ()) -> None:
        """Download a version's artifacts (or only ``files`` of them) into ``dst``.

        Missing optional ``files`` are skipped.

        Raises:
            RegistryUnavailable, RegistryError: the artifacts could not be downloaded.
        """
        from mlflow.artifacts import download_artifacts

        if (
            version.model_id is not None
            or version.revision is not None
            or (version.source.startswith("runs:/") and version.name.startswith("run-"))
        ):
            base = version.source  # a logged model's artifact location, or the run's own URI
        else:
            base = self._call(
                self.client.get_model_version_download_uri,
                version.name,
                str(version.version),
                missing=(version.name, f"version {version.version}"),
            )
        wanted = list(files)
        dst.mkdir(parents=True, exist_ok=True)
        if not wanted:
            self._call(
                download_artifacts,
                artifact_uri=base,
                dst_path=str(dst),
                tracking_uri=self.tracking_uri,
                missing=(version.name, f"artifacts at {base}"),
            )
            _flatten_single_dir(dst)
            return
        for name in wanted:
            try:
                self._call(
                    download_artifacts,
                    artifact_uri=f"{base.rstrip('/')}/{name}",
                    dst_path=str(dst),
                    tracking_uri=self.tracking_uri,
                )
            except RegistryUnavailable:
                raise
            except RegistryError:
                log.debug("%s has no %s", version.label, name)

    # -- error mapping ------------------------------------------------------------------------

    def _call(
        self, fn: Any, *args: Any, missing: tuple[str, str] | None = None, **kwargs: Any
    ) -> Any:
        """``fn(*args, **kwargs)`` with MLflow's errors mapped to ours. ``missing`` is the
        (model name, what) a RESOURCE_DOES_NOT_EXIST answer means for this call."""
        from mlflow.exceptions import MlflowException

        self.calls += 1
        try:
            return fn(*args, **kwargs)
        except MlflowException as exc:
            raise _map_mlflow_error(self.identity, exc, missing) from exc
        except (ConnectionError, TimeoutError) as exc:
            raise RegistryUnavailable(self.identity, f"{type(exc).__name__}: {exc}") from exc
        except ImportError as exc:  # an artifact store whose client library is not installed
            module = (exc.name or "").split(".")[0]
            package = _STORE_PACKAGES.get(module, module or "its client library")
            raise RegistryError(
                f"this artifact store needs {package}, which is not installed: "
                f"pip install {package}"
            ) from exc
        except OSError:
            raise  # local files (a vanished source, a full disk): the cache reports those
        except Exception as exc:
            if _looks_like_connection_error(exc):
                raise RegistryUnavailable(self.identity, _short(exc)) from exc
            if type(exc).__name__ == "ClientAuthenticationError":
                # azure-identity found no credential or its endpoint is down: the registry
                # cannot be asked, like one that is unreachable (the cache keeps serving)
                raise RegistryUnavailable(
                    self.identity, f"no Azure credential: {_short(exc, 400)}"
                ) from exc
            raise RegistryError(f"registry {self.identity}: {_short(exc)}") from exc


def _map_mlflow_error(
    identity: str, exc: Any, missing: tuple[str, str] | None = None
) -> RegistryError:
    code = getattr(exc, "error_code", "")
    message = getattr(exc, "message", str(exc))
    if code == "RESOURCE_DOES_NOT_EXIST" and missing is not None:
        return ModelNotFound(*missing, registry=identity)
    if _looks_like_connection_error(exc) or code in ("TEMPORARILY_UNAVAILABLE",):
        return RegistryUnavailable(identity, _short(message))
    if "failures occurred while downloading" in message:
        # MLflow lists each file's error on the following lines: keep them, they say why
        # (a full disk, a vanished source) where the first line does not.
        detail = " ".join(message.split())
        return RegistryError(f"downloading from {identity} failed: {_short(detail, 600)}")
    return RegistryError(f"registry {identity} failed: {_short(message)} ({code})")


def _looks_like_connection_error(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}"
    markers = (
        "ConnectionError",
        "Connection refused",
        "Max retries exceeded",
        "failed with exception",
        "Read timed out",
        "ConnectTimeout",
        "OperationalError",
        "unable to open database",
        "status code 50",
        "Name or service not known",
        "Could not connect to the endpoint URL",  # botocore: an S3 store down
        "Failed to establish a new connection",
    )
    return any(m in text for m in markers)


def _store_identity(uri: str) -> str:
    """An artifact store's identity: scheme and host (or bucket), without credentials."""
    from urllib.parse import urlsplit

    parts = urlsplit(_redact(uri))
    return f"{parts.scheme}://{parts.netloc}"


def _artifact_name(ref: ModelRef) -> str:
    """A name for an artifact store URI (its last path part) with a short digest of the URI,
    so two stores' ``model`` directories never share a cache folder."""
    last = (ref.path or "").rstrip("/").rsplit("/", 1)[-1] or "model"
    return f"{last}-{hashlib.sha256(ref.uri.encode()).hexdigest()[:8]}"


def _short(value: object, limit: int = 300) -> str:
    """The first line of an error, bounded and without credentials."""
    text = str(value).strip().splitlines()[0] if str(value).strip() else repr(value)
    text = redact(text)
    return text if len(text) <= limit else text[:limit] + "..."


def _redact(uri: str) -> str:
    """Drop credentials from a URI so it can be logged and used as a cache identity."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.username or parts.password:
        host = parts.hostname or ""
        if parts.port:
            host += f":{parts.port}"
        return urlunsplit(parts._replace(netloc=host))
    return uri


def _flatten_single_dir(dst: Path) -> None:
    """download_artifacts of a directory URI may nest it one level; keep MLmodel at the top."""
    if (dst / "MLmodel").exists():
        return
    children = list(dst.iterdir())
    if len(children) == 1 and children[0].is_dir() and (children[0] / "MLmodel").exists():
        inner = children[0]
        for item in inner.iterdir():
            item.rename(dst / item.name)
        inner.rmdir()
