"""Every error the loader raises, one hierarchy under :class:`LoaderError`.

::

    LoaderError
    |- ConfigError          an option has a bad value (key path, value, what is accepted)
    |- InvalidModelURI      a model URI is malformed; the message lists the accepted forms
    |- RegistryError        the registry answered with an error (raised ``from`` MLflow's)
    |  |- ModelNotFound     no such model, version, alias, or nothing READY in that stage
    |  `- RegistryUnavailable  the registry could not be reached (and the cache had no copy)
    |- CacheError           disk full, corrupt entry, lock timeout
    |- DependencyMismatch   the model needs packages the running environment lacks (strict policy)
    |- ModelLoadError       mlflow.pyfunc could not load the files, or the warm-up failed
    `- ModelNotReady        a model was asked for before any version of it was loaded

Messages are built from attributes (``.uri``, ``.name``, ``.version``...) and say what failed, the
bad value, and what to do about it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

#: What a secret looks like inside an error text: a URL's user:password, a token= or
#: password= parameter, an Authorization header's value.
_SECRETS = (
    (re.compile(r"(?P<keep>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s:@]*:[^/\s@]*@"), r"\g<keep>***@"),
    (re.compile(r"(?P<keep>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s:@]+@"), r"\g<keep>***@"),
    (
        re.compile(
            r"(?P<keep>\b(?:token|access_token|password|secret|sig|signature|key)=)[^&\s'\"]+",
            re.IGNORECASE,
        ),
        r"\g<keep>***",
    ),
    (
        re.compile(
            r"(?P<keep>\bAuthorization['\"]?\s*[:=]\s*['\"]?)[^'\",}\s]+(?:\s+[^'\",}\s]+)?",
            re.IGNORECASE,
        ),
        r"\g<keep>***",
    ),
)


def redact(text: str) -> str:
    """``text`` without the credentials an error from MLflow or a client library may carry
    (userinfo in URLs, token/password parameters, Authorization values). Every error string
    that leaves the process goes through it: status routes, log lines."""
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


class LoaderError(Exception):
    """Base class of every error raised by :mod:`loader`; its message never carries a
    credential (see :func:`redact`), whatever text it was built from."""

    def __init__(self, *args: object) -> None:
        super().__init__(*(redact(a) if isinstance(a, str) else a for a in args))


class ConfigError(LoaderError):
    """An option has a bad value."""

    def __init__(self, key: str, value: object, expected: str) -> None:
        self.key, self.value, self.expected = key, value, expected
        super().__init__(f"{key} = {value!r} is not valid: expected {expected}")


class InvalidModelURI(LoaderError):
    """A model URI that does not parse, names an unknown stage, or could escape a directory."""

    ACCEPTED_FORMS = (
        "models:/NAME/VERSION",
        "models:/NAME/latest",
        "models:/NAME/STAGE (STAGE one of None, Staging, Production, Archived)",
        "models:/NAME@ALIAS",
        "models:/MODEL_ID (an MLflow 3 logged model, e.g. models:/m-...)",
        "runs:/RUN_ID/PATH",
        "an artifact store URI (s3://, gs://, wasbs://, mlflow-artifacts:/, https://, ...)",
        "file:///ABSOLUTE/PATH",
        "a local directory path",
    )

    def __init__(self, uri: object, reason: str) -> None:
        self.uri, self.reason = uri, reason
        forms = ", ".join(self.ACCEPTED_FORMS)
        super().__init__(f"invalid model URI {_quote(uri)}: {reason}. Accepted forms: {forms}")


class RegistryError(LoaderError):
    """The registry answered with an error; the MlflowException is the ``__cause__``."""


class ModelNotFound(RegistryError):
    """The registry has no such model, version or alias, or nothing READY in that stage."""

    def __init__(
        self, name: str, what: str, *, detail: str = "", registry: str | None = None
    ) -> None:
        self.name, self.what, self.registry = name, what, registry
        tail = f" ({detail})" if detail else ""
        where = f" in registry {registry}" if registry else ""
        if what == "registered model":
            message = f"no registered model {name!r}{where}{tail}"
        elif what == "logged model":
            message = (
                f"no logged model {name!r}{where}{tail}: models:/ID names an MLflow 3 logged "
                "model by its id; for a registered model write models:/NAME/VERSION, "
                "models:/NAME/latest, models:/NAME/STAGE or models:/NAME@ALIAS"
            )
        else:
            message = f"registered model {name!r}{where} has no {what}{tail}"
        super().__init__(message)


class RegistryUnavailable(RegistryError):
    """The registry could not be reached in time."""

    def __init__(self, registry: str, reason: str, *, uri: str | None = None) -> None:
        self.registry, self.reason, self.uri = registry, reason, uri
        msg = f"registry {registry} is unreachable ({reason})"
        if uri is not None:
            msg += f" and the cache holds no copy of {uri!r}: start once with the registry up"
        super().__init__(msg)


class CacheError(LoaderError):
    """The disk cache failed: disk full, corrupt entry, lock timeout."""


class CacheFull(CacheError):
    """A cache write failed because the disk is full: nothing is damaged, reads go on, and
    the write succeeds once space returns."""


class DependencyMismatch(LoaderError):
    """The model's recorded dependencies do not match the running environment."""

    def __init__(self, model: str, mismatches: Sequence[object]) -> None:
        self.model, self.mismatches = model, tuple(mismatches)
        lines = "; ".join(str(m) for m in self.mismatches)
        super().__init__(
            f"{model} refused by the strict dependency policy: {lines}. Install the versions the "
            "model needs, add the packages to the ignore list, or use policy 'isolate' (its own "
            "environment) or 'warn'"
        )


class ModelLoadError(LoaderError):
    """mlflow.pyfunc could not load the model, or its warm-up prediction failed."""


class EnvBuildError(LoaderError):
    """A model's isolated environment could not be found, built or verified (step ``env``)."""


class WorkerUnavailable(LoaderError):
    """An isolated model's worker process died or is restarting: the call was not answered
    (the daemon answers 503; the worker is restarted with backoff)."""


class ModelNotReady(LoaderError):
    """A model was asked for before any version of it was loaded."""

    def __init__(self, name: str, served: Iterable[str] = ()) -> None:
        self.name = name
        served = sorted(served)
        hint = f"; loaded models: {', '.join(served)}" if served else ""
        super().__init__(f"model {name!r} is not loaded{hint}")


def _quote(value: object, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...'"
