"""Who may call what, for every transport: a bearer token compared in constant time, and the
loopback rule of admin calls when no admin token is set (HTTP's ``/admin`` and ``/v2``
repository routes, gRPC's repository RPCs)."""

from __future__ import annotations

import hmac
import ipaddress


def bearer_matches(authorization: str | None, token: str) -> bool:
    """Whether an ``Authorization`` value is ``Bearer <token>`` (constant time)."""
    scheme, _, value = (authorization or "").partition(" ")
    # A header's bytes that are not UTF-8 arrive as surrogates: compare them as the bytes sent.
    return scheme.lower() == "bearer" and hmac.compare_digest(
        value.strip().encode("utf-8", "surrogateescape"), token.encode()
    )


def is_loopback(remote: str | None) -> bool:
    """Whether a peer address is this machine (None or "": a Unix domain socket)."""
    if not remote:  # a Unix domain socket: local by construction
        return True
    try:
        return ipaddress.ip_address(remote.split("%", 1)[0]).is_loopback
    except ValueError:
        return False
