"""Azure Machine Learning workspace registries (``azureml://`` URIs, the azureml-mlflow plugin).

The plugin asks azure-identity for a token on every registry call, through a chain it builds
itself: ``DefaultAzureCredential``'s credentials, then an interactive browser login and a
device-code login. A daemon can answer neither; the device code would hold a start for up to
fifteen minutes, printing a code nobody reads. :func:`prepare_azureml` builds the plugin's service
context ahead of MLflow (the plugin caches it by URI) with the same chain minus the
interactive credentials, so with no usable credential a start fails in seconds and says why.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlsplit

from loader.errors import ConfigError

log = logging.getLogger(__name__)

SCHEME = "azureml"
#: Credential classes that wait on a person; never used by a daemon.
_INTERACTIVE = ("InteractiveBrowserCredential", "DeviceCodeCredential")


def is_azureml(uri: str | None) -> bool:
    return bool(uri) and urlsplit(str(uri)).scheme == SCHEME


def prepare_azureml(*uris: str | None) -> None:
    """Set up every ``azureml://`` URI among ``uris`` for unattended use.

    Raises:
        ConfigError: an ``azureml://`` URI without the azureml-mlflow plugin installed.
    """
    for uri in dict.fromkeys(u for u in uris if is_azureml(u)):
        assert uri is not None
        try:
            from azureml.mlflow._internal.service_context_loader import (
                _AzureMLServiceContextLoader as loader,
            )
        except ImportError as exc:
            raise ConfigError(
                "registry.tracking_uri",
                uri,
                "an azureml:// URI with the azureml-mlflow plugin installed "
                "(pip install azureml-mlflow)",
            ) from exc
        context: Any = loader.load_service_context(uri)  # builds credentials; no network
        auth = getattr(context, "_auth", None)
        chain = getattr(auth, "credentials", None)
        if chain is None:  # a token from MLFLOW_TRACKING_TOKEN: nothing interactive in it
            continue
        kept = [c for c in chain if type(c).__name__ not in _INTERACTIVE]
        if len(kept) == len(chain):
            continue
        from azure.identity import ChainedTokenCredential

        context._auth = ChainedTokenCredential(*kept)
        log.debug("azure credential chain for %s: %s", urlsplit(uri).netloc, _names(kept))


def _names(chain: list[Any]) -> str:
    return ", ".join(type(c).__name__ for c in chain)
