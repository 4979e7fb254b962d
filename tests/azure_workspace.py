"""A local Azure Machine Learning workspace endpoint for the real ``azureml-mlflow`` plugin.

Only what cannot run here is emulated: the workspace's HTTPS front (the Azure path prefix, a
bearer token) and the managed-identity endpoint that hands the plugin its token. Behind the
prefix a real ``mlflow server`` answers. The support matrix of the registry guide
(``../shared/reference``) is enforced the way a workspace refuses: renaming a registered model,
deleting a whole registered model, aliases, ``LIKE``/``ILIKE`` and tag filters; and, to prove
modeld's fallback against the plugin's own client code, ``name IN (...)`` when ``refuse_in``.

The plugin is reached by an ``azureml://HOST/mlflow/v1.0/subscriptions/...`` tracking URI; it
turns that into ``https://HOST/mlflow/v2.0/subscriptions/.../workspaces/W/api/2.0/mlflow/...``
and asks azure-identity for a token: with ``IDENTITY_ENDPOINT`` and ``IDENTITY_HEADER`` set,
azure-identity's managed-identity credential (App Service protocol) asks this server.
"""

from __future__ import annotations

import json
import re
import ssl
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import requests

from tests.helpers import self_signed

SUBSCRIPTION = "00000000-1111-2222-3333-444444444444"
RESOURCE_GROUP = "modeld-rg"
WORKSPACE = "modeld-ws"
SCOPE = (
    f"/subscriptions/{SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}"
    f"/providers/Microsoft.MachineLearningServices/workspaces/{WORKSPACE}"
)
#: The bearer token the managed-identity endpoint hands out and the workspace accepts.
TOKEN = "modeld-emulated-workspace-token"
IDENTITY_HEADER = "modeld-emulated-identity-header"

#: Operations a workspace registry refuses (method, path after /api/2.0/mlflow/).
_UNSUPPORTED = {
    ("POST", "registered-models/rename"): "renaming a registered model",
    ("DELETE", "registered-models/delete"): "deleting a registered model",
    ("GET", "registered-models/alias"): "model aliases",
    ("POST", "registered-models/alias"): "model aliases",
    ("DELETE", "registered-models/alias"): "model aliases",
}
_SEARCHES = ("registered-models/search", "model-versions/search")
_LIKE = re.compile(r"\bI?LIKE\b", re.IGNORECASE)
_TAGS = re.compile(r"\btags?\.", re.IGNORECASE)
_IN = re.compile(r"\bIN\s*\(", re.IGNORECASE)


@dataclass(frozen=True)
class Call:
    """One registry call the workspace received."""

    method: str
    op: str
    filter: str | None
    refused: bool


class AzureWorkspace:
    """The emulated workspace on an HTTPS port of 127.0.0.1, in front of ``backend_url``."""

    def __init__(self, backend_url: str, root: Path, *, refuse_in: bool = True) -> None:
        self.backend_url = backend_url.rstrip("/")
        self.root = root
        self.refuse_in = refuse_in
        self.calls: list[Call] = []
        self.token_requests = 0
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self.cert, self.key = self_signed(root)
        self.port = 0

    # -- what a client is given ------------------------------------------------------------

    @property
    def tracking_uri(self) -> str:
        return f"azureml://127.0.0.1:{self.port}/mlflow/v1.0{SCOPE}"

    def env(self) -> dict[str, str]:
        """The environment a pod would have: the cloud named (no discovery call), the CA that
        signs the workspace's certificate, and a managed identity."""
        return {
            "AZUREML_CURRENT_CLOUD": "AzureCloud",
            "REQUESTS_CA_BUNDLE": str(self.cert),
            "IDENTITY_ENDPOINT": f"https://127.0.0.1:{self.port}/msi/token",
            "IDENTITY_HEADER": IDENTITY_HEADER,
        }

    def refused(self) -> list[Call]:
        with self._lock:
            return [c for c in self.calls if c.refused]

    def ops(self) -> list[str]:
        with self._lock:
            return [c.op for c in self.calls]

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> AzureWorkspace:
        workspace = self

        class Handler(_Handler):
            owner = workspace

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, self.key)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        self.port = server.server_address[1]
        self._server = server
        threading.Thread(target=server.serve_forever, name="azure-workspace", daemon=True).start()
        return self

    def stop(self) -> None:
        """Take the workspace off the network (the port stays ours for a restart)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def record(self, call: Call) -> None:
        with self._lock:
            self.calls.append(call)


class _Handler(BaseHTTPRequestHandler):
    owner: AzureWorkspace
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the stdlib's name)
        return

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_PATCH(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    def _handle(self) -> None:
        parts = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if parts.path == "/msi/token":
            return self._token(parts.query)
        prefix = f"/mlflow/v2.0{SCOPE}/api/2.0/mlflow/"
        if not parts.path.startswith(prefix):
            return self._error(404, "ENDPOINT_NOT_FOUND", "no such workspace endpoint")
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self._error(401, "UNAUTHENTICATED", "a valid bearer token is required")
        op = parts.path[len(prefix) :]
        query = parse_qs(parts.query)
        filter_string = (query.get("filter") or [None])[0]
        if filter_string is None and body and op in _SEARCHES:
            filter_string = json.loads(body).get("filter")
        refusal = self._refusal(op, filter_string)
        self.owner.record(Call(self.command, op, filter_string, refusal is not None))
        if refusal is not None:
            status, code, message = refusal
            return self._error(status, code, message)
        names = _in_list(filter_string) if op == "registered-models/search" else None
        if names is not None:
            return self._search_each(names)
        upstream = requests.request(
            self.command,
            f"{self.owner.backend_url}/api/2.0/mlflow/{op}",
            params=parts.query or None,
            data=body or None,
            headers={"Content-Type": self.headers.get("Content-Type", "application/json")},
            timeout=30,
        )
        payload = upstream.content
        if upstream.ok and upstream.headers.get("Content-Type", "").startswith("application/json"):
            payload = json.dumps(_without_aliases(upstream.json())).encode()
        self._send(upstream.status_code, payload)

    def _search_each(self, names: list[str]) -> None:
        """``name IN (...)`` answered in one response (an MLflow server before 3.16 has no
        ``IN`` for registered models: the workspace asks it name by name)."""
        found: list[Any] = []
        for name in names:
            escaped = name.replace("'", "\\'")
            upstream = requests.get(
                f"{self.owner.backend_url}/api/2.0/mlflow/registered-models/search",
                params={"filter": f"name = '{escaped}'", "max_results": "1000"},
                timeout=30,
            )
            upstream.raise_for_status()
            found.extend(upstream.json().get("registered_models", []))
        self._send(200, json.dumps(_without_aliases({"registered_models": found})).encode())

    def _refusal(self, op: str, filter_string: str | None) -> tuple[int, str, str] | None:
        what = _UNSUPPORTED.get((self.command, op))
        if what is not None:
            return 404, "ENDPOINT_NOT_FOUND", f"{what} is not supported by this workspace"
        if op in _SEARCHES and filter_string:
            if _LIKE.search(filter_string):
                return 400, "INVALID_PARAMETER_VALUE", "LIKE and ILIKE are not supported"
            if _TAGS.search(filter_string):
                return 400, "INVALID_PARAMETER_VALUE", "search by tag is not supported"
            if self.owner.refuse_in and _IN.search(filter_string):
                return 400, "INVALID_PARAMETER_VALUE", "the IN operator is not supported"
        return None

    def _token(self, query: str) -> None:
        if self.headers.get("X-IDENTITY-HEADER") != IDENTITY_HEADER:
            return self._error(401, "UNAUTHENTICATED", "bad identity header")
        with self.owner._lock:
            self.owner.token_requests += 1
        resource = (parse_qs(query).get("resource") or [""])[0]
        self._send(
            200,
            json.dumps(
                {
                    "access_token": TOKEN,
                    "expires_on": str(int(time.time()) + 3600),
                    "resource": resource,
                    "token_type": "Bearer",
                }
            ).encode(),
        )

    def _error(self, status: int, code: str, message: str) -> None:
        self._send(status, json.dumps({"error_code": code, "message": message}).encode())

    def _send(self, status: int, payload: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


def _in_list(filter_string: str | None) -> list[str] | None:
    """The names of a ``name IN ('a', 'b')`` filter, or None for any other filter."""
    match = re.fullmatch(r"\s*name\s+IN\s*\((.*)\)\s*", filter_string or "", re.IGNORECASE)
    if match is None:
        return None
    return re.findall(r"'((?:[^'\\]|\\.)*)'", match.group(1))


def _without_aliases(value: Any) -> Any:
    """A workspace's registered models and versions have no aliases field."""
    if isinstance(value, dict):
        return {k: _without_aliases(v) for k, v in value.items() if k != "aliases"}
    if isinstance(value, list):
        return [_without_aliases(v) for v in value]
    return value
