"""Admin routes: refresh now, pin/unpin (rollback), and MLflow registry webhooks.

Admin routes need ``Authorization: Bearer <admin.token>`` when a token is configured, and are
reachable only from loopback when none is. Webhooks authenticate by their HMAC signature
(``admin.webhook_secret``), reject stale timestamps and replayed delivery ids, and only trigger a
poll: the poll stays the source of truth (MLflow sends no event for stage transitions or deletes).
"""

from __future__ import annotations

import base64
import collections
import hashlib
import hmac
import ipaddress
import logging
import time

import orjson
from aiohttp import web

from serving.app import DAEMON, Daemon
from serving.errors import envelope
from serving.handlers import bearer_matches, json_response, require_route

log = logging.getLogger(__name__)
WEBHOOK_PATH = "/admin/webhooks/mlflow"
_SEEN_DELIVERIES = 4096


def add_routes(app: web.Application) -> None:
    app.router.add_post("/admin/refresh", refresh_all)
    app.router.add_post("/admin/models/{name}/refresh", refresh_one)
    app.router.add_post("/admin/models/{name}/pin", pin)
    app.router.add_delete("/admin/models/{name}/pin", unpin)
    app.router.add_post(WEBHOOK_PATH, webhook)


def _authorized(request: web.Request) -> Daemon:
    """The daemon, once the caller may use admin routes.

    Raises:
        web.HTTPUnauthorized, web.HTTPForbidden
    """
    daemon = request.app[DAEMON]
    token = daemon.config.admin.token
    if token:
        if not bearer_matches(request, token):
            raise web.HTTPUnauthorized(
                text="admin routes need 'Authorization: Bearer <admin.token>'",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return daemon
    if not _is_loopback(request.remote):
        raise web.HTTPForbidden(
            text="admin routes answer loopback callers only unless admin.token is set"
        )
    return daemon


def _is_loopback(remote: str | None) -> bool:
    if not remote:  # a Unix domain socket: local by construction
        return True
    try:
        return ipaddress.ip_address(remote.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def _manager(daemon: Daemon):  # noqa: ANN202 - ModelManager, once started
    if daemon.manager is None:
        raise web.HTTPServiceUnavailable(text="modeld is still starting")
    return daemon.manager


async def refresh_all(request: web.Request) -> web.Response:
    daemon = _authorized(request)
    manager = _manager(daemon)
    await daemon.refresh(force=request.query.get("force") in ("1", "true"))
    return json_response(manager.status())


async def refresh_one(request: web.Request) -> web.Response:
    daemon = _authorized(request)
    name = request.match_info["name"]
    require_route(daemon, name)
    await daemon.refresh([name], force=request.query.get("force") in ("1", "true"))
    return json_response(_manager(daemon).status(name))


async def pin(request: web.Request) -> web.Response:
    """Freeze a model at ``{"version": N}`` (a rollback) until DELETE resumes following."""
    daemon = _authorized(request)
    name = request.match_info["name"]
    require_route(daemon, name)
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError as exc:
        return envelope(400, f'send {{"version": N}} as JSON ({exc})', "INVALID_PARAMETER_VALUE")
    version = body.get("version") if isinstance(body, dict) else None
    if isinstance(version, str) and version.isdigit():
        version = int(version)
    manager = _manager(daemon)
    route = manager.route(name)
    previous = route.pinned
    manager.pin(name, version)  # ConfigError -> 400 quoting the value
    await daemon.refresh([name], force=True)
    if route.resolved is None or route.resolved.version != version:  # no such version
        problem = route.problem
        route.pinned = previous
        await daemon.refresh([name])
        return envelope(404, f"{name}: cannot pin version {version}: {problem}")
    status = manager.status(name)
    if status["version"] != version:
        rejected = [r for r in status["rejected"] if r["version"] == version]
        why = rejected[-1]["reason"] if rejected else status["problem"]
        body = {
            **status,
            "error_code": "INVALID_STATE",
            "message": f"{name} pinned to {version}, which is not served: {why}",
        }
        return json_response(body, 409)
    log.info("%s pinned at version %s", name, version)
    return json_response(status)


async def unpin(request: web.Request) -> web.Response:
    daemon = _authorized(request)
    name = request.match_info["name"]
    require_route(daemon, name)
    _manager(daemon).unpin(name)
    await daemon.refresh([name])
    log.info("%s unpinned: following %s again", name, _manager(daemon).route(name).ref)
    return json_response(_manager(daemon).status(name))


async def webhook(request: web.Request) -> web.Response:
    """An MLflow registry webhook: verify its signature, then poll at once."""
    daemon = request.app[DAEMON]
    admin = daemon.config.admin
    if not admin.webhook_secret:
        raise web.HTTPNotFound(text="webhooks are off: set admin.webhook_secret")
    body = await request.read()
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
    if not hmac.compare_digest(base64.b64encode(expected).decode(), signature[3:]):
        return envelope(401, "webhook signature does not match admin.webhook_secret")
    if abs(time.time() - int(stamp)) > admin.webhook_max_age_s:
        return envelope(401, f"webhook timestamp is more than {admin.webhook_max_age_s:.0f}s off")
    seen = request.app[SEEN]
    if delivery in seen:
        return envelope(409, f"webhook delivery {delivery[:64]} was already received")
    seen[delivery] = None
    while len(seen) > _SEEN_DELIVERIES:
        seen.popitem(last=False)
    log.info("registry webhook %s: polling now", delivery[:64])
    if daemon.follower is not None:
        daemon.follower.poke()
    return json_response({"accepted": True})


SEEN: web.AppKey[collections.OrderedDict[str, None]] = web.AppKey("webhook_deliveries")
