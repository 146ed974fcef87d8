"""Requests: one request map in, one reply map out, for every op of the protocol.

Which profile a request is for is `routing`'s to say. Nothing here talks to the API or the
socket: the keeper does the one, `connections` the other.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any, Final

from vm_token import protocol

from ..keeper import BadRequest, Keeper, Refused, TokenInfo
from ..tasks import count_tasks
from ..text import quote
from .connections import error_reply
from .login_ops import login_ops
from .routing import Routes

__all__ = ["Dispatcher"]

log = logging.getLogger(__name__)

Op = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]

# The largest min_ttl we accept: a day is far beyond any token's lifetime.
MAX_MIN_TTL: Final = 86400.0
MAX_FIELD: Final = 16 * 1024
# E-mail addresses, the API's user names, are at most 254 characters.
MAX_USERNAME: Final = 320
# What a reply's VideoManager list may take of a frame: the rest is for the other fields.
# `list` pages past it; `status` shows the first page.
LIST_ROOM: Final = protocol.MAX_FRAME - 8 * 1024


def _page(items: Iterable[dict[str, Any]], offset: int, room: int
          ) -> tuple[list[Any], int | None]:
    """Of `items` (those from `offset` on), the first that fit in `room` bytes of msgpack
    (at least one), and the offset of the next page (None after the last)."""
    page: list[Any] = []
    used = 0
    for index, item in enumerate(items, offset):
        size = len(protocol.packb(item))
        if page and used + size > room:
            return page, index
        page.append(item)
        used += size
    return page, None


def _tagged(lists: list[tuple[str, list[dict[str, Any]]]], offset: int
            ) -> Iterator[dict[str, Any]]:
    """The items of several profiles' lists one after the other, from `offset` on, each
    naming its profile (copied as they are read: a page is a few hundred of thousands)."""
    for name, items in lists:
        for index in range(offset, len(items)):
            yield {**items[index], "profile": name}
        offset = max(0, offset - len(items))


def _opt_ref(request: dict[str, Any], name: str) -> str | None:
    value = request.get(name)
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str) and value.strip() and len(value) <= MAX_FIELD:
        return value.strip()
    raise BadRequest(f"'{name}' must be a VideoManager id or name")


def _required_str(request: dict[str, Any], name: str, limit: int = MAX_FIELD) -> str:
    value = request.get(name)
    if not isinstance(value, str) or not value:
        raise BadRequest(f"'{name}' must be a non-empty string")
    if len(value) > limit:
        raise BadRequest(f"'{name}' is longer than {limit} characters")
    return value


# What the token-only socket serves: tokens, and what a client needs to ask for them.
# Never what changes the daemon's session (login, logout, the interactive logins), nor
# status: the daemon's state, its counters, its profiles' errors and APIs are its user's.
TOKEN_OPS: Final = frozenset({protocol.HELLO, protocol.GET, protocol.INVALIDATE,
                              protocol.LIST})

# What fast_reply remembers: a process asks for a handful of VideoManagers, not hundreds.
FAST_CACHE: Final = 64
_PLAIN_GET_FIELDS: Final = frozenset({"v", "op", "vm", "min_ttl", "profile"})


def _plain_get(body: bytes) -> tuple[str | None, float, str | None] | None:
    """(vm, min_ttl, profile) if `body` is a valid `get` with no fields but v, op, vm,
    min_ttl and profile."""
    if len(body) > 256:
        return None
    try:
        request = protocol.decode_body(body)
        # Exactly what the full path takes: `v` an int (not 1.0, not True), op "get".
        if (request.get("op") != protocol.GET or type(request.get("v")) is not int
                or request["v"] != protocol.PROTOCOL_VERSION
                or request.keys() - _PLAIN_GET_FIELDS):
            return None
        profile = request.get("profile")
        if profile is not None and (not isinstance(profile, str) or not profile):
            return None  # the full path says what is wrong with it
        return _opt_ref(request, "vm"), _min_ttl(request), profile
    except (protocol.MalformedFrame, BadRequest):
        return None


def _offset(request: dict[str, Any]) -> int:
    value = request.get("offset", 0)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadRequest("'offset' must be a whole number from 0")
    return value


def _min_ttl(request: dict[str, Any]) -> float:
    value = request.get("min_ttl", 0)
    if value is None:
        return 0.0
    if (isinstance(value, bool) or not isinstance(value, int | float)
            or not math.isfinite(value) or not 0 <= value <= MAX_MIN_TTL):
        raise BadRequest(f"'min_ttl' must be a number of seconds from 0 to {MAX_MIN_TTL:g}")
    return float(value)


class Dispatcher:
    """Turns one request map into one reply map."""

    def __init__(
        self,
        keeper: Keeper,
        *,
        version: str,
        login: Callable[[str | None, str, str], Awaitable[None]],
        describe: Callable[[str | None], dict[str, Any]],
        routes: Routes,
    ) -> None:
        self.keeper = keeper
        self.routes = routes
        self.profile = self.routes.profile  # which profile a request is for
        self.version = version
        self._login = login  # (profile, username, password): the app starts the session
        self._describe = describe  # api_url (of a profile), uptime, … from the app
        self.requests = 0
        # For fast_reply: request bodies seen (at most FAST_CACHE), and reply frames.
        self._known_gets: dict[bytes, tuple[str | None, float, str | None]] = {}
        # Weak: a token's reply goes when the keeper lets go of the token (replaced,
        # invalidated, logged out) — no copy of it outlives the keeper's.
        self._frames: weakref.WeakKeyDictionary[TokenInfo, bytes] = weakref.WeakKeyDictionary()
        # A VideoManager list, and the first page of it `status` showed.
        self._shown: tuple[list[dict[str, Any]], list[Any]] | None = None
        self._ops: dict[str, Op] = {
            protocol.HELLO: self._hello,
            protocol.GET: self._get,
            protocol.LIST: self._list,
            protocol.STATUS: self._status,
            protocol.INVALIDATE: self._invalidate,
            protocol.LOGIN: self._login_op,
            protocol.LOGOUT: self._logout,
            **login_ops(keeper, self.routes),
        }

    async def __call__(self, request: dict[str, Any]) -> dict[str, Any]:
        self.requests += 1
        op = request.get("op")
        version = request.get("v")
        try:
            if not isinstance(op, str):
                raise BadRequest("'op' must be a string")
            if isinstance(version, bool) or not isinstance(version, int):
                raise BadRequest("'v' (the protocol version) must be an integer")
            handler = self._ops.get(op)
            if handler is None:
                raise BadRequest(f"unknown op {quote(op, 40)}")
            if version != protocol.PROTOCOL_VERSION and op != protocol.HELLO:
                return error_reply(
                    protocol.UNSUPPORTED_VERSION,
                    f"protocol version {version} is not supported; this vm-tokend speaks "
                    f"version {protocol.PROTOCOL_VERSION}",
                )
            return await handler(request)
        except Refused as exc:
            return error_reply(exc.code, exc.message)

    def token_only(self) -> Op:
        """This dispatcher as the token-only socket serves it: TOKEN_OPS, and forbidden_op
        for every other op of the protocol (an unknown one is a bad_request, as on the
        main socket). Its `hello` says so."""
        served = ", ".join(sorted(TOKEN_OPS))

        async def answer(request: dict[str, Any]) -> dict[str, Any]:
            op = request.get("op")
            # an allow list: an op added later is forbidden here until it is listed
            if isinstance(op, str) and op not in TOKEN_OPS and op in self._ops:
                return error_reply(protocol.FORBIDDEN_OP,
                                   f"{op} is not served on the token socket, only {served}; "
                                   "ask on the daemon's own socket, as its user")
            reply = await self(request)
            if op == protocol.HELLO and reply.get("ok"):
                reply["ops"] = sorted(TOKEN_OPS)
            return reply

        return answer

    # -- ops --------------------------------------------------------------------------------

    async def _hello(self, request: dict[str, Any]) -> dict[str, Any]:
        described = self._describe(self.profile(request))
        return {"ok": True, "protocol": protocol.PROTOCOL_VERSION,
                "daemon": "vm-tokend", "version": self.version,
                "api_url": described.get("api_url"),
                "login_method": described.get("login_method", "password"),
                "redirect_port": described.get("redirect_port"),
                "profiles": sorted(self.keeper.accounts),
                "default_profile": self.keeper.default_profile}

    async def _get(self, request: dict[str, Any]) -> dict[str, Any]:
        profile = self.profile(request)
        info = await self.keeper.get(_opt_ref(request, "vm"), _min_ttl(request),
                                     profile=profile)
        return self._got(info, profile)

    def _got(self, info: TokenInfo, profile: str | None) -> dict[str, Any]:
        described = self._describe(profile)
        return {
            "ok": True,
            "token": info.token,
            "videomanager_id": info.videomanager.id,
            "videomanager_name": info.videomanager.name,
            "expires_at": info.expires_at,
            "username": self.keeper.account(profile).username,
            "profile": profile if profile is not None else self.keeper.default_profile,
            # the API the token is for, and the CAs its certificate is checked against: a
            # client that forwards the token (the proxy) sends it there, so verified, and
            # nowhere else, even when a reload changed the profile's api_url or ca_bundle
            "api_url": described.get("api_url"),
            "ca_bundle": described.get("ca_bundle"),
        }

    def fast_reply(self, body: bytes) -> bytes | None:
        """The reply frame to a plain `get` (no host) for a token we hold, or None.

        The common request, a script or library asking again and again for the same token,
        is answered without decoding, dispatching or encoding: a request body seen before
        maps to its VideoManager and min_ttl, a held token to its encoded reply. Half the
        daemon's cost per request went to those steps. Anything else — an unseen body, a
        token that must be fetched, any field but v/op/vm/min_ttl/profile — takes the full
        path.
        """
        known = self._known_gets.get(body)
        if known is None:
            known = _plain_get(body)
            if known is None:
                return None
            if len(self._known_gets) >= FAST_CACHE:
                self._known_gets.clear()  # many distinct requests: start over, stay small
            self._known_gets[body] = known
        ref, min_ttl, profile = known
        info = self.keeper.held(ref, min_ttl, profile)
        if info is None:
            return None
        frame = self._frames.get(info)
        if frame is None:
            frame = self._frames[info] = protocol.encode_frame(self._got(info, profile))
        self.requests += 1
        return frame

    async def _settled(self, request: dict[str, Any], names: list[str]
                       ) -> list[tuple[str, Refused]]:
        """With `wait`: once the logins in flight of `names` have ended, which failed and
        why (`vm-token list` right after the daemon started finds them in flight)."""
        wait = request.get("wait", False)
        if not isinstance(wait, bool):
            raise BadRequest("'wait' must be true or false")
        failed = []
        if wait:
            for name in names:
                try:
                    await self.keeper.wait_logged_in(name)
                except Refused as exc:
                    failed.append((name, exc))
        return failed

    async def _list(self, request: dict[str, Any]) -> dict[str, Any]:
        profile = self.profile(request)
        names = [profile] if profile is not None else list(self.keeper.accounts)
        failed = await self._settled(request, names)
        if failed and len(names) == 1:
            raise failed[0][1]  # as `get` would answer
        lists = [(name, self.keeper.list(name)) for name in names]
        offset = _offset(request)
        page, following = _page(_tagged(lists, offset), offset, LIST_ROOM)
        reply: dict[str, Any] = {"ok": True, "videomanagers": page,
                                 "total": sum(len(items) for _, items in lists),
                                 "auth": self.keeper.state(profile).get("auth")}
        if following is not None:
            reply["next"] = following
        if failed:
            reply["failed"] = [{"profile": name, "code": exc.code, "message": exc.message}
                               for name, exc in failed]
        return reply

    async def _status(self, request: dict[str, Any]) -> dict[str, Any]:
        profile = self.profile(request)
        await self._settled(request, [profile] if profile is not None
                            else list(self.keeper.accounts))
        items = self.keeper.list(profile)
        described = self._describe(profile)
        apis = described.pop("profile_apis", {})
        return {
            "ok": True,
            **described,
            **self.keeper.state(profile),
            "profile": profile if profile is not None else self.keeper.default_profile,
            "requests": self.requests,
            "upstream_calls": dict(self.keeper.calls),
            "tasks": count_tasks(),
            "videomanagers": self._first_page(items),
            "videomanagers_total": len(items),
            "profiles": self._profiles(apis),
        }

    def _first_page(self, items: list[dict[str, Any]]) -> list[Any]:
        """What `status` shows of a VideoManager list: its first page, measured again only
        when the list is another (the keeper makes a new one when something changed)."""
        if self._shown is None or self._shown[0] is not items:
            self._shown = (items, _page(items, 0, LIST_ROOM)[0])
        return self._shown[1]

    def _profiles(self, apis: dict[str, str]) -> list[dict[str, Any]]:
        """A line of each profile for `status`, `default` first."""
        result = []
        for name in sorted(self.keeper.accounts, key=lambda n: (n != "default", n)):
            state = self.keeper.state(name)
            result.append({
                "name": name, "default": name == self.keeper.default_profile,
                "api_url": apis.get(name),
                "username": state.get("username"), "auth": state.get("auth"),
                "issuer": state.get("issuer"), "state": state.get("state"),
                "last_error": state.get("last_error"),
                "videomanagers_total": len(self.keeper.list(name)),
            })
        return result

    async def _invalidate(self, request: dict[str, Any]) -> dict[str, Any]:
        profile = self.profile(request)
        token = _required_str(request, "token")
        if not token.isascii():
            raise BadRequest("'token' must be ASCII, as every access token is")
        invalidated = self.keeper.invalidate(token, _opt_ref(request, "vm"), profile=profile)
        return {"ok": True, "invalidated": invalidated}

    async def _login_op(self, request: dict[str, Any]) -> dict[str, Any]:
        profile = self.profile(request)
        username = _required_str(request, "username", MAX_USERNAME)
        password = _required_str(request, "password")
        await self._login(profile, username, password)
        await self.keeper.wait_logged_in(profile)
        return {"ok": True, "username": username,
                "videomanagers": len(self.keeper.list(profile))}

    async def _logout(self, request: dict[str, Any]) -> dict[str, Any]:
        profile = self.profile(request)
        await self.keeper.start_session(None, profile)
        log.info("logged out%s: credentials and tokens forgotten",
                 f" of profile {quote(profile)}" if profile else "")
        return {"ok": True}
