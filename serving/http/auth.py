"""Who may call what: bearer tokens for predictions and admin, loopback for an open admin."""

from __future__ import annotations

from aiohttp import web

from serving.runtime.access import bearer_matches, is_loopback

__all__ = ["is_loopback", "require_token"]


def require_token(request: web.Request, token: str, *, setting: str) -> None:
    """Raises 401 unless the request carries ``token`` (nothing to check when it is empty)."""
    if token and not bearer_matches(request.headers.get("Authorization"), token):
        what = "admin" if setting == "admin.token" else "prediction"
        raise web.HTTPUnauthorized(
            text=f"{what} routes need 'Authorization: Bearer <{setting}>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
