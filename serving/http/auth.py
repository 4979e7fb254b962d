"""Who may call what: bearer tokens for predictions and admin, loopback for an open admin."""

from __future__ import annotations

import hmac
import ipaddress

from aiohttp import web


def bearer_matches(request: web.Request, token: str) -> bool:
    """Constant-time check of ``Authorization: Bearer <token>``."""
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    # A header's bytes that are not UTF-8 arrive as surrogates: compare them as the bytes sent.
    return scheme.lower() == "bearer" and hmac.compare_digest(
        value.strip().encode("utf-8", "surrogateescape"), token.encode()
    )


def require_token(request: web.Request, token: str, *, setting: str) -> None:
    """Raises 401 unless the request carries ``token`` (nothing to check when it is empty)."""
    if token and not bearer_matches(request, token):
        what = "admin" if setting == "admin.token" else "prediction"
        raise web.HTTPUnauthorized(
            text=f"{what} routes need 'Authorization: Bearer <{setting}>'",
            headers={"WWW-Authenticate": "Bearer"},
        )


def is_loopback(remote: str | None) -> bool:
    if not remote:  # a Unix domain socket: local by construction
        return True
    try:
        return ipaddress.ip_address(remote.split("%", 1)[0]).is_loopback
    except ValueError:
        return False
