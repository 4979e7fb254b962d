"""Parse model URIs into frozen :class:`ModelRef` values. Pure: no I/O, no MLflow import.

Accepted forms mirror ``mlflow.pyfunc.load_model``: ``models:/NAME/VERSION``,
``models:/NAME/latest``, ``models:/NAME/STAGE``, ``models:/NAME@ALIAS``, MLflow 3's
``models:/MODEL_ID`` (a logged model, as ``log_model`` returns it: ``models:/m-...``),
``runs:/RUN_ID/PATH``, ``file:///abs/path`` and plain local paths.
"""

from __future__ import annotations

import os
import urllib.parse
from dataclasses import dataclass
from enum import StrEnum

from loader.errors import InvalidModelURI

#: Artifact stores MLflow has a repository for: a model directory at such a URI is served as it
#: is, downloaded through MLflow's own repository (its client library must be installed).
ARTIFACT_SCHEMES = (
    "mlflow-artifacts", "s3", "gs", "wasbs", "abfss", "r2", "b2", "dbfs", "hdfs", "viewfs",
    "http", "https", "ftp", "sftp",
)  # fmt: skip
#: MLflow's stages, matched case-insensitively as MLflow's resolver does.
STAGES = ("None", "Staging", "Production", "Archived")
_STAGE_BY_LOWER = {s.lower(): s for s in STAGES}
_MAX_URI_CHARS = 4096


class RefKind(StrEnum):
    VERSION = "version"
    LATEST = "latest"
    STAGE = "stage"
    ALIAS = "alias"
    MODEL_ID = "model_id"
    ARTIFACT = "artifact"
    RUN = "run"
    PATH = "path"


@dataclass(frozen=True, slots=True)
class ModelRef:
    """What the user asked for: an unresolved model URI."""

    uri: str
    kind: RefKind
    name: str | None = None
    version: int | None = None
    stage: str | None = None
    alias: str | None = None
    run_id: str | None = None
    path: str | None = None
    model_id: str | None = None

    @property
    def is_registry(self) -> bool:
        """A registered model's version, stage, alias or latest (these can be pinned)."""
        return self.kind in (RefKind.VERSION, RefKind.LATEST, RefKind.STAGE, RefKind.ALIAS)

    @property
    def is_remote(self) -> bool:
        """Resolved by asking a server (so a start with it down needs the cache's memory):
        registry refs, MLflow 3 logged models and artifact store URIs."""
        return self.is_registry or self.kind in (RefKind.MODEL_ID, RefKind.ARTIFACT)

    @property
    def is_movable(self) -> bool:
        """True when the version this ref names can change (latest, stage, alias)."""
        return self.kind in (RefKind.LATEST, RefKind.STAGE, RefKind.ALIAS)

    @property
    def selector(self) -> str:
        """The part after the name, as a person writes it: ``7``, ``latest``, ``Production``."""
        if self.kind is RefKind.VERSION:
            return str(self.version)
        if self.kind is RefKind.LATEST:
            return "latest"
        if self.kind is RefKind.STAGE:
            return str(self.stage)
        if self.kind is RefKind.ALIAS:
            return f"@{self.alias}"
        if self.kind is RefKind.MODEL_ID:
            return str(self.model_id)
        return self.uri

    def __str__(self) -> str:
        return self.uri


def parse_uri(uri: object) -> ModelRef:
    """Parse ``uri`` into a :class:`ModelRef`.

    Raises:
        InvalidModelURI: malformed URI, unknown stage, or a name that could escape a directory.
    """
    if isinstance(uri, os.PathLike):
        uri = os.fspath(uri)
    if not isinstance(uri, str):
        raise InvalidModelURI(uri, f"expected a string, got {type(uri).__name__}")
    if not uri.strip():
        raise InvalidModelURI(uri, "the URI is empty")
    if len(uri) > _MAX_URI_CHARS:
        raise InvalidModelURI(uri, f"longer than {_MAX_URI_CHARS} characters")
    if "\x00" in uri:
        raise InvalidModelURI(uri, "it contains a NUL character")
    if uri != uri.strip():
        raise InvalidModelURI(uri, "it has leading or trailing whitespace")

    scheme, sep, _ = uri.partition(":")
    if sep and scheme.lower() == "models":
        return _parse_models(uri)
    if sep and scheme.lower() == "runs":
        return _parse_runs(uri)
    if sep and scheme.lower() == "file":
        return _parse_file(uri)
    if sep and scheme.lower() in ARTIFACT_SCHEMES:
        return _parse_artifact(uri, scheme.lower())
    if sep and len(scheme) > 1 and scheme.replace("+", "").replace("-", "").isalnum():
        raise InvalidModelURI(
            uri, f"unsupported scheme {scheme!r} (artifact stores: {', '.join(ARTIFACT_SCHEMES)})"
        )
    return ModelRef(uri=uri, kind=RefKind.PATH, path=os.path.abspath(os.path.expanduser(uri)))


def _parse_models(uri: str) -> ModelRef:
    rest = uri.split(":", 1)[1]
    if rest.startswith("//"):
        raise InvalidModelURI(uri, "write models:/NAME/..., with one slash (no host part)")
    if not rest.startswith("/") or len(rest) < 2:
        raise InvalidModelURI(uri, "expected models:/ followed by a model name")
    body = rest[1:]
    if "?" in body or "#" in body:
        raise InvalidModelURI(uri, "query strings and fragments are not allowed")
    parts = body.split("/")
    if len(parts) == 1:
        name, at, alias = parts[0].rpartition("@")
        if not at:  # MLflow 3: models:/<model_id>, a logged model (as log_model returns it)
            _check_name(uri, parts[0])
            return ModelRef(uri=uri, kind=RefKind.MODEL_ID, model_id=parts[0])
        _check_name(uri, name)
        if not alias.strip() or alias != alias.strip() or "@" in alias:
            raise InvalidModelURI(uri, f"bad alias {alias!r}")
        return ModelRef(uri=uri, kind=RefKind.ALIAS, name=name, alias=alias)
    if len(parts) != 2:
        raise InvalidModelURI(uri, "a model name cannot contain '/'")
    name, suffix = parts
    _check_name(uri, name)
    if not suffix:
        raise InvalidModelURI(uri, "empty version or stage after the name")
    if suffix.isdigit():
        version = int(suffix)
        if version < 1:
            raise InvalidModelURI(uri, "model versions start at 1")
        return ModelRef(uri=uri, kind=RefKind.VERSION, name=name, version=version)
    if suffix.lower() == "latest":
        return ModelRef(uri=uri, kind=RefKind.LATEST, name=name)
    stage = _STAGE_BY_LOWER.get(suffix.lower())
    if stage is None:
        raise InvalidModelURI(
            uri, f"unknown stage {suffix!r} (stages are {', '.join(STAGES)}; or use a version)"
        )
    return ModelRef(uri=uri, kind=RefKind.STAGE, name=name, stage=stage)


def _check_name(uri: str, name: str) -> None:
    if not name or not name.strip():
        raise InvalidModelURI(uri, "the model name is empty")
    if name in (".", "..") or name.startswith(("/", "\\")) or "\\" in name:
        raise InvalidModelURI(uri, f"model name {name!r} could escape a directory")
    if "@" in name:
        raise InvalidModelURI(uri, "only one @alias is allowed")
    if any(ord(c) < 32 for c in name):
        raise InvalidModelURI(uri, "the model name contains control characters")


def _parse_runs(uri: str) -> ModelRef:
    rest = uri.split(":", 1)[1]
    if not rest.startswith("/") or rest.startswith("//"):
        raise InvalidModelURI(uri, "expected runs:/RUN_ID/PATH")
    run_id, _, path = rest[1:].partition("/")
    if not run_id or not run_id.isalnum():
        raise InvalidModelURI(uri, f"bad run id {run_id!r} (expected letters and digits)")
    path = path.strip("/")
    if not path or any(p in ("", ".", "..") for p in path.split("/")):
        raise InvalidModelURI(uri, f"bad artifact path {path!r} (no empty, '.' or '..' parts)")
    return ModelRef(uri=uri, kind=RefKind.RUN, run_id=run_id, path=path)


def _parse_artifact(uri: str, scheme: str) -> ModelRef:
    parsed = urllib.parse.urlparse(uri)
    if scheme != "mlflow-artifacts" and not parsed.netloc:
        raise InvalidModelURI(uri, f"a {scheme}:// URI names its bucket or host first")
    if "?" in uri or "#" in uri:
        raise InvalidModelURI(uri, "query strings and fragments are not allowed")
    if any(part in (".", "..") for part in parsed.path.split("/")):
        raise InvalidModelURI(uri, "'.' and '..' are not allowed in the path")
    return ModelRef(uri=uri, kind=RefKind.ARTIFACT, path=parsed.path.rstrip("/"))


def _parse_file(uri: str) -> ModelRef:
    parsed = urllib.parse.urlparse(uri)
    if parsed.netloc not in ("", "localhost"):
        raise InvalidModelURI(uri, "file URIs must name a local absolute path (file:///path)")
    path = urllib.parse.unquote(parsed.path)
    if not path.startswith("/"):
        raise InvalidModelURI(uri, "file URIs must hold an absolute path (file:///path)")
    return ModelRef(uri=uri, kind=RefKind.PATH, path=os.path.normpath(path))
