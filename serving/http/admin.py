"""Admin routes, a sub-app at ``/admin``: refresh now, pin/unpin (rollback), registry webhooks.

Admin routes need ``Authorization: Bearer <admin.token>`` when a token is configured, and are
reachable only from loopback when none is. Webhooks authenticate by their HMAC signature
(``admin.webhook_secret``), reject stale timestamps and replayed delivery ids, and only trigger a
poll: the poll stays the source of truth (MLflow sends no event for stage transitions or deletes).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

import orjson
from aiohttp import web

from loader.manager import ModelManager
from serving.http.auth import is_loopback, require_token
from serving.http.errors import Style, envelope, error_middleware, json_response
from serving.http.keys import daemon_of
from serving.http.predict import read_body
from serving.runtime import edits
from serving.runtime.deliveries import DeliveryLedger

log = logging.getLogger(__name__)
PREFIX = "/admin"
WEBHOOK_PATH = "/webhooks/mlflow"
LEDGER: web.AppKey[DeliveryLedger] = web.AppKey("webhook_deliveries")
Handler = Callable[[web.Request], Awaitable[web.Response]]


def sub_app(cache_root: Callable[[], Any]) -> web.Application:
    """The /admin routes; webhook deliveries are remembered beside the cache ``cache_root()``
    names (shared by every worker on that volume)."""
    app = web.Application(middlewares=[error_middleware(Style.MLFLOW)])
    app[LEDGER] = DeliveryLedger(cache_root)
    app.router.add_post("/refresh", refresh_all)
    app.router.add_post("/models/{name}/refresh", refresh_one)
    app.router.add_post("/models/{name}/pin", pin)
    app.router.add_delete("/models/{name}/pin", unpin)
    app.router.add_post(WEBHOOK_PATH, webhook)
    app.router.add_put("/models/{name}/weights", set_weights)
    return app


def admin_only(handler: Handler) -> Handler:
    """The admin token when one is configured, else loopback callers only."""

    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.Response:
        token = daemon_of(request).config.admin.token
        if token:
            require_token(request, token, setting="admin.token")
        elif not is_loopback(request.remote):
            raise web.HTTPForbidden(
                text="admin routes answer loopback callers only unless admin.token is set"
            )
        return await handler(request)

    return wrapped


def _manager(request: web.Request) -> ModelManager:
    manager = daemon_of(request).manager
    if manager is None:
        raise web.HTTPServiceUnavailable(text="modeld is still starting")
    return manager


def _force(request: web.Request) -> bool:
    return request.query.get("force") in ("1", "true")


@admin_only
async def refresh_all(request: web.Request) -> web.Response:
    manager = _manager(request)
    daemon = daemon_of(request)
    await daemon.refresh(force=_force(request))
    await daemon.share(edits.POLL, "")
    return json_response(manager.status().to_dict())


@admin_only
async def refresh_one(request: web.Request) -> web.Response:
    daemon = daemon_of(request)
    name = request.match_info["name"]
    daemon.dataplane.require(name)
    await daemon.refresh([name], force=_force(request))
    await daemon.share(edits.POLL, name)
    return json_response(_manager(request).status(name).to_dict())


@admin_only
async def pin(request: web.Request) -> web.Response:
    """Freeze a model at ``{"version": N}`` (a rollback) until DELETE resumes following."""
    daemon = daemon_of(request)
    name = request.match_info["name"]
    daemon.dataplane.require(name)
    try:
        body = orjson.loads(await read_body(request))
    except orjson.JSONDecodeError as exc:
        return envelope(400, f'send {{"version": N}} as JSON ({exc})', "INVALID_PARAMETER_VALUE")
    version = body.get("version") if isinstance(body, dict) else None
    if isinstance(version, str) and version.isdigit():
        version = int(version)
    manager = _manager(request)
    # ConfigError (a bad value) -> 400 quoting it; ModelNotFound (no such version) -> 404
    number = cast(int, version)  # pin() refuses anything but a version number, quoting it
    status = await daemon.in_load_pool(lambda: manager.pin(name, number, verify=True))
    if status.version is None or status.version.version != version:
        rejected = [r for r in status.rejected if r.version.version == version]
        why = rejected[-1].reason if rejected else status.problem
        return json_response(
            {
                **status.to_dict(),
                "error_code": "INVALID_STATE",
                "message": f"{name} pinned to {version}, which is not served: {why}",
            },
            409,
        )
    await daemon.share(edits.PIN, name, version)
    return json_response(status.to_dict())


@admin_only
async def set_weights(request: web.Request) -> web.Response:
    """``{"weights": {"ARM": N, ...}}``: new weights for a route's arms, until the next config
    reload (which starts again from the configured ones). Answers the route's split."""
    daemon = daemon_of(request)
    name = request.match_info["name"]
    daemon.dataplane.require(name)
    split = daemon.dataplane.splits.get(name)
    if split is None:
        return envelope(400, f"{name} has no arms to weigh", "INVALID_PARAMETER_VALUE")
    try:
        body = orjson.loads(await read_body(request))
    except orjson.JSONDecodeError as exc:
        return envelope(400, f'send {{"weights": {{"ARM": N}}}} as JSON ({exc})',
                        "INVALID_PARAMETER_VALUE")  # fmt: skip
    weights = body.get("weights") if isinstance(body, dict) else None
    if not isinstance(weights, dict) or not weights:
        return envelope(400, f'send {{"weights": {{"ARM": N}}}}; arms: {split.names()}',
                        "INVALID_PARAMETER_VALUE")  # fmt: skip
    try:
        split.set_weights(weights)
    except KeyError as exc:
        return envelope(404, str(exc.args[0]), "RESOURCE_DOES_NOT_EXIST")
    except ValueError as exc:
        return envelope(400, str(exc), "INVALID_PARAMETER_VALUE")
    log.info("%s: arm weights now %s", name, {a.config.name: a.weight for a in split.answering})
    await daemon.share(edits.WEIGHTS, name, weights)
    return json_response(split.to_dict())


@admin_only
async def unpin(request: web.Request) -> web.Response:
    daemon = daemon_of(request)
    name = request.match_info["name"]
    daemon.dataplane.require(name)
    manager = _manager(request)
    manager.unpin(name)
    await daemon.refresh([name])
    await daemon.share(edits.UNPIN, name)
    status = manager.status(name)
    log.info("%s unpinned: following %s again", name, status.ref)
    return json_response(status.to_dict())


async def webhook(request: web.Request) -> web.Response:
    """An MLflow registry webhook: verify its signature, then poll at once."""
    daemon = daemon_of(request)
    admin = daemon.config.admin
    if not admin.webhook_secret:
        raise web.HTTPNotFound(text="webhooks are off: set admin.webhook_secret")
    body = await read_body(request)
    delivery = request.headers.get("X-MLflow-Delivery-Id", "")
    stamp = request.headers.get("X-MLflow-Timestamp", "")
    signature = request.headers.get("X-MLflow-Signature", "")
    if not delivery or not stamp.isdigit() or not signature.startswith("v1,"):
        return envelope(400, "missing or malformed X-MLflow-Delivery-Id / -Timestamp / -Signature")
    try:
        payload = body.decode("utf-8")
    except UnicodeDecodeError:
        return envelope(400, "webhook body is not UTF-8")
    expected = hmac.new(
        admin.webhook_secret.encode(), f"{delivery}.{stamp}.{payload}".encode(), hashlib.sha256
    ).digest()
    if not hmac.compare_digest(
        base64.b64encode(expected), signature[3:].encode("utf-8", "surrogateescape")
    ):
        return envelope(401, "webhook signature does not match admin.webhook_secret")
    if abs(time.time() - int(stamp)) > admin.webhook_max_age_s:
        return envelope(401, f"webhook timestamp is more than {admin.webhook_max_age_s:.0f}s off")
    ledger = request.app[LEDGER]
    if not await asyncio.to_thread(ledger.first_time, delivery, max_age_s=admin.webhook_max_age_s):
        return envelope(409, f"webhook delivery {delivery[:64]} was already received")
    log.info("registry webhook %s: polling now", delivery[:64])
    if daemon.follower is not None:
        daemon.follower.poke()
    await daemon.share(edits.POLL, "")
    return json_response({"accepted": True})
