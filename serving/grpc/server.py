"""The Open Inference Protocol's gRPC service (``inference.GRPCInferenceService``), a second
transport on the same data plane as HTTP: the same routes, batching, hot-swap, token, TLS and
drain, on ``server.grpc_port``.

grpc's asyncio server runs on the daemon's event loop. Messages are parsed there (protobuf's C
parser: a ``ModelInferRequest`` names its route); decoding the tensors, ``predict`` and encoding
the answer run on the route's predict thread (:class:`~serving.codecs.grpc.GrpcCodec`), exactly
as for ``/v2/.../infer``.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.parse
from collections.abc import Awaitable, Callable
from importlib.metadata import version as package_version
from typing import Any

import grpc
from google.protobuf import json_format

from loader.errors import (
    ConfigError,
    InvalidModelURI,
    ModelNotFound,
    ModelNotReady,
    RegistryUnavailable,
    WorkerUnavailable,
)
from serving.codecs import messages as pb
from serving.codecs.base import ProtocolError
from serving.codecs.grpc import GrpcCodec
from serving.codecs.oip import model_metadata
from serving.runtime import repository
from serving.runtime.access import bearer_matches, is_loopback
from serving.runtime.dataplane import RouteNotFound, Served
from serving.runtime.lifecycle import Daemon
from serving.runtime.metrics import UNKNOWN_ROUTE

log = logging.getLogger(__name__)
SERVICE = "inference.GRPCInferenceService"
EXTENSIONS = ["binary_tensor_data", "classification"]


class Unauthenticated(Exception):
    pass


class Forbidden(Exception):
    pass


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status for what a call raised (bad input is never UNKNOWN)."""
    if isinstance(exc, Unauthenticated):
        return grpc.StatusCode.UNAUTHENTICATED, str(exc)
    if isinstance(exc, Forbidden):
        return grpc.StatusCode.PERMISSION_DENIED, str(exc)
    if isinstance(exc, ProtocolError):
        return grpc.StatusCode.INVALID_ARGUMENT, exc.message
    if isinstance(exc, RouteNotFound):
        return grpc.StatusCode.NOT_FOUND, exc.message
    if isinstance(exc, ModelNotFound):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, ConfigError | InvalidModelURI):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, ModelNotReady | RegistryUnavailable | WorkerUnavailable):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, TimeoutError):
        return (
            grpc.StatusCode.DEADLINE_EXCEEDED,
            "Request processing time exceeded limit (server.request_timeout_s)",
        )
    return grpc.StatusCode.INTERNAL, "internal server error (logged on the server)"


#: For the request metrics, which count statuses as HTTP does.
_AS_HTTP = {
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


class InferenceService:
    """The protocol's RPCs and Triton's repository and statistics ones (the same calls as
    the REST ``/v2`` makes: :mod:`serving.runtime.repository`)."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    async def server_live(self, request: pb.ServerLiveRequest, context: Any) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def server_ready(self, request: pb.ServerReadyRequest, context: Any) -> Any:
        manager = self.daemon.manager
        ready = manager is not None and self.daemon.dataplane.ready(manager.status())
        return pb.ServerReadyResponse(ready=ready)

    async def model_ready(self, request: pb.ModelReadyRequest, context: Any) -> Any:
        try:
            self._served(request.name, request.version)
        except (RouteNotFound, ModelNotReady):
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def server_metadata(self, request: pb.ServerMetadataRequest, context: Any) -> Any:
        return pb.ServerMetadataResponse(
            name="modeld", version=package_version("modeld"), extensions=EXTENSIONS
        )

    async def model_metadata(self, request: pb.ModelMetadataRequest, context: Any) -> Any:
        served = self._served(request.name, request.version)
        meta = model_metadata(served.route, served.version, served.handle.model.metadata)
        return pb.ModelMetadataResponse(
            name=meta["name"],
            versions=meta["versions"],
            platform=meta["platform"],
            inputs=[pb.TensorMetadata(**t) for t in meta["inputs"]],
            outputs=[pb.TensorMetadata(**t) for t in meta["outputs"]],
        )

    async def model_infer(self, request: pb.ModelInferRequest, context: Any) -> bytes:
        daemon = self.daemon
        name = request.model_name
        label = name if daemon.dataplane.serves(name) else UNKNOWN_ROUTE
        track = daemon.metrics.track(label)
        status, served = 500, None
        try:
            self._authorize(context)
            served = self._served(name, request.model_version, context)
            body = await daemon.dataplane.predict(
                served,
                b"",
                GrpcCodec(request),
                endpoint="grpc:ModelInfer",
                logged_body=request.SerializeToString,
            )
            status = 200
            context.set_trailing_metadata(_version_metadata(served))
            return body
        except Exception as exc:
            status = _AS_HTTP.get(status_of(exc)[0], 500)
            raise
        finally:
            track.done(
                status,
                route=served.route if served else None,
                version=served.version if served and status < 400 else None,
                arm=(served.name, served.arm) if served and served.arm else None,
            )

    def _served(self, name: str, version: str, context: Any = None) -> Served:
        if not name:
            raise ProtocolError("the request names no model")

        def sticky(source: str, key: str) -> str | None:  # a header is call metadata here
            if source != "header" or context is None:
                return None
            wanted = key.lower()
            found = (v for k, v in context.invocation_metadata() or () if k == wanted)
            return next(found, None)

        return self.daemon.dataplane.serving(name, version=version or None, lookup=sticky)

    async def model_statistics(self, request: pb.ModelStatisticsRequest, context: Any) -> Any:
        served = [self._served(request.name, request.version)] if request.name else None
        stats = repository.statistics(self.daemon, served)
        return json_format.ParseDict({"model_stats": stats}, pb.ModelStatisticsResponse())

    async def repository_index(self, request: pb.RepositoryIndexRequest, context: Any) -> Any:
        self._authorize_admin(context)
        entries = repository.index(self.daemon, ready_only=request.ready)
        return pb.RepositoryIndexResponse(
            models=[
                pb.ModelIndex(
                    name=e.name, version=e.version or "", state=e.state, reason=e.reason or ""
                )
                for e in entries
            ]
        )

    async def repository_model_load(
        self, request: pb.RepositoryModelLoadRequest, context: Any
    ) -> Any:
        self._authorize_admin(context)
        repository.check_load_parameters(request.parameters)
        uri = None
        if repository.URI in request.parameters:
            given = request.parameters[repository.URI]
            if given.WhichOneof("parameter_choice") != "string_param":
                raise ProtocolError("the load parameter 'uri' must be a string_param")
            uri = given.string_param
        await repository.load(self.daemon, _model_name(request), uri)
        return pb.RepositoryModelLoadResponse()

    async def repository_model_unload(
        self, request: pb.RepositoryModelUnloadRequest, context: Any
    ) -> Any:
        self._authorize_admin(context)
        await repository.unload(self.daemon, _model_name(request))
        return pb.RepositoryModelUnloadResponse()

    def _authorize(self, context: Any) -> None:
        token = self.daemon.config.server.token
        if token:
            _require_bearer(context, token, "ModelInfer", "server.token")

    def _authorize_admin(self, context: Any) -> None:
        """As for ``/admin`` and the REST repository: the admin token when one is set, else
        loopback callers only."""
        token = self.daemon.config.admin.token
        if token:
            _require_bearer(context, token, "the repository RPCs", "admin.token")
        elif not _is_loopback_peer(context.peer()):
            raise Forbidden(
                "the repository RPCs answer loopback callers only unless admin.token is set"
            )


def _model_name(request: Any) -> str:
    if not request.model_name:
        raise ProtocolError("the request names no model (model_name)")
    return str(request.model_name)


def _require_bearer(context: Any, token: str, what: str, setting: str) -> None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and bearer_matches(str(value), token):
            return
    raise Unauthenticated(f"{what} needs the metadata 'authorization: Bearer <{setting}>'")


def _is_loopback_peer(peer: str | None) -> bool:
    """grpc's peer string: ``ipv4:127.0.0.1:5000``, ``ipv6:[::1]:5000``, ``unix:/path``."""
    kind, _, address = (peer or "").partition(":")
    if kind == "unix":
        return True
    if kind not in ("ipv4", "ipv6"):
        return False
    host = urllib.parse.unquote(address).rsplit(":", 1)[0].strip("[]")  # grpc %-encodes it
    return bool(host) and is_loopback(host)


def _version_metadata(served: Served) -> list[tuple[str, str]]:
    meta = [
        ("x-model-route", served.name),
        ("x-model-name", served.handle.version.name),
        ("x-model-version", str(served.version)),
    ]
    if served.stale:
        meta.append(("x-model-stale", "true"))
    if served.arm:
        meta.append(("x-model-arm", served.arm))
    return meta


def _unary(method: Callable[[Any, Any], Awaitable[Any]], message: Any) -> grpc.RpcMethodHandler:
    async def call(request: Any, context: Any) -> Any:
        try:
            return await method(request, context)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            code, text = status_of(exc)
            if code is grpc.StatusCode.INTERNAL:
                log.error("gRPC call failed", exc_info=exc)
            await context.abort(code, text)

    def serialize(answer: Any) -> bytes:
        return answer if isinstance(answer, bytes) else answer.SerializeToString()

    return grpc.unary_unary_rpc_method_handler(
        call, request_deserializer=message.FromString, response_serializer=serialize
    )


def _read_pair(key: str, cert: str) -> tuple[bytes, bytes]:
    with open(key, "rb") as k, open(cert, "rb") as c:
        return k.read(), c.read()


def handler(daemon: Daemon) -> grpc.GenericRpcHandler:
    s = InferenceService(daemon)
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "ServerLive": _unary(s.server_live, pb.ServerLiveRequest),
            "ServerReady": _unary(s.server_ready, pb.ServerReadyRequest),
            "ModelReady": _unary(s.model_ready, pb.ModelReadyRequest),
            "ServerMetadata": _unary(s.server_metadata, pb.ServerMetadataRequest),
            "ModelMetadata": _unary(s.model_metadata, pb.ModelMetadataRequest),
            "ModelInfer": _unary(s.model_infer, pb.ModelInferRequest),
            "ModelStatistics": _unary(s.model_statistics, pb.ModelStatisticsRequest),
            "RepositoryIndex": _unary(s.repository_index, pb.RepositoryIndexRequest),
            "RepositoryModelLoad": _unary(s.repository_model_load, pb.RepositoryModelLoadRequest),
            "RepositoryModelUnload": _unary(
                s.repository_model_unload, pb.RepositoryModelUnloadRequest
            ),
        },
    )


async def start(daemon: Daemon) -> grpc.aio.Server:
    """Listen on ``server.grpc_port`` (TLS with the HTTP server's certificate)."""
    server_config = daemon.config.server
    options = [
        ("grpc.max_receive_message_length", server_config.max_body_bytes),
        ("grpc.max_send_message_length", -1),
        ("grpc.so_reuseport", 1 if server_config.workers > 1 else 0),
    ]
    server = grpc.aio.server(options=options)
    server.add_generic_rpc_handlers((handler(daemon),))
    address = f"{server_config.host}:{server_config.grpc_port}"
    if server_config.ssl_certfile:
        key, cert = await asyncio.to_thread(
            _read_pair, server_config.ssl_keyfile, server_config.ssl_certfile
        )
        server.add_secure_port(address, grpc.ssl_server_credentials([(key, cert)]))
    else:
        server.add_insecure_port(address)
    await server.start()
    log.info("gRPC (Open Inference Protocol) listening on %s", address)
    return server
