"""The wire ops of interactive logins: login_start, login_finish, login_wait, login_cancel.

A client (`vm-token login --browser`, or one in another language) drives the flow; the
daemon keeps its secrets and does every exchange. See docs/PROTOCOL.md.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Any, Final
from urllib.parse import urlsplit

import trio

from vm_token import protocol
from vm_token.errors import BadRequest

from ..keeper import Keeper
from ..keeper.interactive import InteractiveLogins
from ..text import quote
from .routing import Routes

__all__ = ["login_ops"]

Op = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]

MAX_REDIRECT_URI: Final = 200
MAX_CODE: Final = 4096  # authorization codes are opaque; Keycloak's are a few hundred bytes
MAX_STATE: Final = 512
MAX_FLOW_ID: Final = 64
MAX_ISSUER: Final = 2048  # the longest URL the daemon takes from a provider (oidc.check_url)


def _text(request: dict[str, Any], name: str, limit: int) -> str:
    value = request.get(name)
    if not isinstance(value, str) or not value or len(value) > limit or not value.isprintable():
        raise BadRequest(f"'{name}' must be printable text of at most {limit} characters")
    return value


def loopback_redirect(uri: str) -> str:
    """A redirect URI a native app may use (RFC 8252 7.3): http to a loopback IP literal,
    with a port; BadRequest otherwise."""
    parts = urlsplit(uri)
    try:
        port = parts.port
    except ValueError:
        port = None
    if (parts.scheme != "http" or parts.hostname not in ("127.0.0.1", "::1") or not port
            or parts.username or parts.password or parts.query or parts.fragment):
        raise BadRequest(f"redirect_uri {quote(uri)} must be http://127.0.0.1:PORT/… or "
                         "http://[::1]:PORT/… (a loopback listener, RFC 8252)")
    return uri


def login_ops(keeper: Keeper, routes: Routes) -> dict[str, Op]:
    """The ops, bound to `keeper`; `routes` says which profile a request is for."""
    profile = routes.profile

    def logins(request: dict[str, Any]) -> InteractiveLogins:
        return keeper.account(profile(request)).interactive

    def user(request: dict[str, Any]) -> str | None:
        """The profile's username: a login as anybody else is refused."""
        return routes.user(profile(request))

    async def done(request: dict[str, Any], username: str) -> dict[str, Any]:
        return {"ok": True, "username": username,
                "videomanagers": len(keeper.list(profile(request)))}

    async def start(request: dict[str, Any]) -> dict[str, Any]:
        method = request.get("method")
        if method == "code":
            redirect_uri = loopback_redirect(_text(request, "redirect_uri", MAX_REDIRECT_URI))
            flow, code = await logins(request).start_code(redirect_uri)
            return {"ok": True, "flow": flow.id, "method": "code", "url": code.url,
                    "redirect_uri": redirect_uri}
        if method == "device":
            flow, device = await logins(request).start_device()
            expires_in = max(0.0, device.expires_at - trio.current_time())
            return {"ok": True, "flow": flow.id, "method": "device",
                    "user_code": device.user_code,
                    "verification_uri": device.verification_uri,
                    "verification_uri_complete": device.verification_uri_complete,
                    "expires_in": math.floor(expires_in), "interval": device.interval}
        raise BadRequest("'method' must be \"code\" (a browser login) or \"device\"")

    async def finish(request: dict[str, Any]) -> dict[str, Any]:
        flow = _text(request, "flow", MAX_FLOW_ID)
        # RFC 9207: the redirect's `iss`, if it had one (nil or absent: it had none).
        iss = _text(request, "iss", MAX_ISSUER) if request.get("iss") is not None else None
        username = await logins(request).finish_code(
            flow, _text(request, "code", MAX_CODE), _text(request, "state", MAX_STATE), iss,
            user=user(request))
        return await done(request, username)

    async def wait(request: dict[str, Any]) -> dict[str, Any]:
        flow = _text(request, "flow", MAX_FLOW_ID)
        if request.get("method") == "code":  # a browser login: until it ends
            await logins(request).watch(flow)
            return {"ok": True, "ended": True}
        return await done(request, await logins(request).wait_device(flow, user=user(request)))

    async def cancel(request: dict[str, Any]) -> dict[str, Any]:
        flow = request.get("flow")
        if flow is not None:
            flow = _text(request, "flow", MAX_FLOW_ID)
        return {"ok": True, "cancelled": logins(request).cancel(flow)}

    return {protocol.LOGIN_START: start, protocol.LOGIN_FINISH: finish,
            protocol.LOGIN_WAIT: wait, protocol.LOGIN_CANCEL: cancel}
