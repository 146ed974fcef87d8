"""Forward one request to the profile's API with the daemon's token, streaming both ways.

The token comes from vm-tokend through the public client (`vm_token.AsyncClient`): the
proxy is a client like any other, and a fault here never touches the daemon. Bodies stream
with backpressure and no size cap; a request body is also kept while it streams, up to
MAX_REPLAY, so that a 401 (a token the API refused) can be answered by replaying the
request once with a fresh token. Redirects are passed back, never followed: a token goes
nowhere but the profile's API origin.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncGenerator, Awaitable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, Final

import h11
import trio

import vm_token

from .api_http import ApiConnection, ApiGone, ApiPool
from .http11 import ClientGone, Conversation
from .routes import Refusal, Upstream, end_to_end, videomanager_of
from .trust import tls_context

__all__ = ["Forwarder", "ask_daemon"]

log = logging.getLogger(__name__)

# A body up to this size is kept while it streams, for one replay after a 401.
MAX_REPLAY: Final = 1024 * 1024
REPLACED_HEADER: Final = b"x-vm-token-replaced"
# Headers of the client's that never go upstream: ours replace them, or we set them.
_DROP: Final = frozenset({b"host", b"authorization", b"expect", b"content-length"})
# While an answer is awaited, whether its client is still there is asked this often: a
# client that left gives its API connection back within this long.
HANGUP_CHECK: Final = 1.0
# (profile, VideoManager, path) entries kept of refused replays: a handful in practice.
MAX_FUTILE: Final = 256
_Key = tuple[str | None, str | None]  # (profile, VideoManager)
# The daemon's refusals, as the proxy's statuses: the API is unreachable (502), nobody is
# logged in (503), the request names what does not exist (404/421).
_STATUS: Final = {
    "not_logged_in": 503, "login_required": 503, "credentials_rejected": 503,
    "login_failed": 503, "upstream_unavailable": 502, "unknown_videomanager": 404,
    "unknown_profile": 421, "forbidden": 403, "bad_request": 400,
}


@dataclass
class _Body:
    """A request body as it streams to the API, and what of it is kept for a replay."""

    conversation: Conversation
    kept: bytearray | None = field(default_factory=bytearray)  # None: too long to keep
    complete: bool = False
    sent: int = 0

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        await self.conversation.continue_if_asked()
        while True:
            event = await self.conversation.next_event()
            if isinstance(event, h11.Data):
                data = bytes(event.data)
                if self.kept is not None:
                    if len(self.kept) + len(data) <= MAX_REPLAY:
                        self.kept += data
                    else:
                        self.kept = None
                self.sent += len(data)
                yield data
            elif isinstance(event, h11.EndOfMessage):
                self.complete = True
                return
            else:
                raise ClientGone(f"unexpected {type(event).__name__} in a request body")


@dataclass
class _Exchange:
    """One client request as it goes to the API: once, and perhaps once more."""

    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]  # Host and framing included, Authorization not
    body: _Body | None
    _started: bool = False

    def content(self) -> AsyncGenerator[bytes, None] | bytes:
        """The body: from the client the first time, from what was kept after that."""
        assert self.body is not None
        if self._started:
            assert self.body.kept is not None
            return bytes(self.body.kept)
        self._started = True
        return self.body.chunks()

    def replayable(self) -> bool:
        """Whether it can be sent again: no body, or one kept whole."""
        return self.body is None or (self.body.complete and self.body.kept is not None)

    def retryable(self) -> bool:
        """Whether it can go again on another connection after one that the API had
        closed before it answered: a request that changes nothing, and has no body."""
        return self.body is None and self.method in (b"GET", b"HEAD", b"OPTIONS")

    @property
    def received(self) -> int:
        return self.body.sent if self.body is not None else 0


def _content_length(request: h11.Request) -> bytes | None:
    for name, value in request.headers:
        if name == b"content-length":
            return value
    return None


@dataclass(frozen=True)
class _Grant:
    """The daemon's answer to a `get`: a token, the API it is for, and what that API's
    certificate is checked against (the daemon's own ca_bundle for the profile)."""

    token: str
    upstream: Upstream
    ca_bundle: str | None


@dataclass
class _BodyGoing:
    """A request body on its way to the API, in a task of its own, while the answer is
    awaited: when it ended (or how it failed)."""

    done_at: float | None = None
    failure: Exception | None = None


class Forwarder:
    """Forwards requests for any profile: one daemon client, one connection pool per API."""

    def __init__(self, daemon: vm_token.AsyncClient, *, connect_timeout: float,
                 read_timeout: float, min_ttl: float) -> None:
        self.daemon = daemon
        self.min_ttl = min_ttl
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._upstreams: dict[str | None, Upstream] = {}
        self._pools: dict[tuple[str, str | None], ApiPool] = {}
        # (profile, VideoManager, path) -> a token whose replay was refused there too: a
        # 401 for it on that path is the path's, not the token's, and is passed back
        # without costing the daemon a fresh token (which would soon make it back off,
        # and refuse every other program)
        self._futile: dict[tuple[_Key, str], str] = {}

    async def aclose(self) -> None:
        for pool in self._pools.values():
            await pool.aclose()

    async def upstream(self, profile: str | None) -> Upstream:
        """The profile's API, as the daemon says it (asked once per profile)."""
        known = self._upstreams.get(profile)
        if known is None:
            hello = await ask_daemon(self.daemon.request("hello", **_profile(profile)))
            api_url = hello.get("api_url")
            if not isinstance(api_url, str):
                raise Refusal(502, "daemon_unreachable", "vm-tokend did not say its API URL")
            known = self._upstreams[profile] = Upstream.from_api_url(api_url)
        return known

    async def forward(self, conversation: Conversation, request: h11.Request,
                      profile: str | None) -> tuple[int, int, int]:
        """Answer `request`; (status, bytes in, bytes out). Refusal before anything was
        sent upstream; ClientGone when the client is."""
        if request.method == b"CONNECT":
            raise Refusal(405, "bad_request", "CONNECT is refused: this is not an open proxy")
        if request.method in (b"TRACE", b"TRACK"):  # it would echo the token back
            raise Refusal(405, "bad_request", "TRACE is refused")
        chunked = any(name == b"transfer-encoding" for name, _ in request.headers)
        length = _content_length(request)
        if chunked and length is not None:  # RFC 9112 6.1: a smuggling attempt, or broken
            raise Refusal(400, "bad_request", "Content-Length and Transfer-Encoding together")
        for _ in range(2):  # a second time only if the profile's API changed meanwhile
            upstream = await self.upstream(profile)
            target = upstream.url_for(request.target)[len(upstream.origin):]
            path = target.split("?", 1)[0]
            key = (profile, videomanager_of(path, upstream.root))
            grant = await self._token(key)
            if grant.upstream == upstream:
                break
            self._upstreams[profile] = grant.upstream  # a reload moved it
        else:
            raise Refusal(503, "upstream_unavailable", "the profile's API keeps changing")
        pool = self._pool(upstream.origin, grant.ca_bundle)
        headers = [(b"host", pool.authority), *end_to_end(list(request.headers), drop=_DROP)]
        if not any(name == b"accept-encoding" for name, _ in headers):
            headers.append((b"accept-encoding", b"identity"))  # bodies pass through raw
        if length is not None:
            headers.append((b"content-length", length))
        elif chunked:
            headers.append((b"transfer-encoding", b"chunked"))  # chunked stays chunked
        exchange = _Exchange(request.method, target.encode("ascii"), headers,
                             _Body(conversation) if chunked or length not in (None, b"0")
                             else None)
        if exchange.body is None and \
                not isinstance(await conversation.next_event(), h11.EndOfMessage):
            raise ClientGone("a request without a body went on")  # h11 says its end at once
        # A body goes out in a task of this nursery, so that an answer the API gives
        # before it has all (a 401, a 413) is passed on while the body still goes: over
        # TLS, a send cut short leaves the connection unusable for the answer's rest.
        failure: Exception | None = None
        async with trio.open_nursery() as background:
            try:
                done = await self._exchange(conversation, exchange, pool, key, path, grant,
                                            background)
            except Exception as exc:  # raised here, not wrapped in the nursery's group
                failure = exc
            background.cancel_scope.cancel()  # a body the API no longer reads
        if failure is not None:
            raise failure
        return done

    async def _exchange(self, conversation: Conversation, exchange: _Exchange,
                        pool: ApiPool, key: _Key, path: str, grant: _Grant,
                        background: trio.Nursery) -> tuple[int, int, int]:
        token = grant.token
        api: ApiConnection | None
        api, response = await self._attempt(pool, exchange, token, conversation, background)
        try:
            replaced = False
            if response.status_code == 401 and self._futile.get((key, path)) != token:
                # The API refused the token. The daemon hears of it (a token another
                # request reported already, or no longer its current one, changes nothing
                # there) and gives the one it holds now. A request whose body was kept
                # whole goes again with it; a longer one's 401 goes back marked, and the
                # client's own retry gets it. Not to an API a reload moved the profile
                # from: then the 401 goes back marked. The same token again (the daemon
                # has no other): the API's 401 as it is.
                await self._invalidate(key, token)
                fresh = await self._token(key)
                if fresh.token != token:
                    if exchange.replayable() and fresh.upstream == grant.upstream \
                            and fresh.ca_bundle == grant.ca_bundle:
                        await _discard(pool, api)
                        api = None
                        api, response = await self._attempt(pool, exchange, fresh.token,
                                                            conversation, background)
                        if response.status_code == 401:  # the path's doing, not the token's
                            if len(self._futile) > MAX_FUTILE:
                                self._futile.clear()
                            self._futile[(key, path)] = fresh.token
                    else:
                        replaced = True
            sent = await _relay(conversation, api, response, replaced)
        finally:
            if api is not None:
                await pool.checkin(api)
        return response.status_code, exchange.received, sent

    # -- the API side -------------------------------------------------------------------

    def _pool(self, origin: str, ca_bundle: str | None) -> ApiPool:
        pool = self._pools.get((origin, ca_bundle))
        if pool is None:
            pool = self._pools[(origin, ca_bundle)] = ApiPool(
                origin, tls_context(origin, ca_bundle), connect_timeout=self._connect_timeout,
                read_timeout=self._read_timeout)
        return pool

    async def _attempt(self, pool: ApiPool, exchange: _Exchange, token: str,
                       conversation: Conversation, background: trio.Nursery
                       ) -> tuple[ApiConnection, h11.Response]:
        """Send the request on a connection; its answer's head. A reused connection the API
        had closed meanwhile is tried once more on a new one, when nothing is lost by it."""
        for _ in range(2):
            api = await pool.checkout()
            try:
                return api, await self._send(api, exchange, token, conversation, background)
            except ApiGone as exc:
                await pool.checkin(api)
                if exc.timeout:
                    raise Refusal(504, "upstream_timeout",
                                  "the API did not answer in time") from None
                if not (api.reused and exc.before_answer and exchange.retryable()):
                    raise Refusal(502, "upstream_unavailable", f"the API: {exc}") from None
            except BaseException:
                await pool.checkin(api)
                raise
        raise Refusal(502, "upstream_unavailable", "the API closes every connection")

    async def _send(self, api: ApiConnection, exchange: _Exchange, token: str,
                    conversation: Conversation, background: trio.Nursery) -> h11.Response:
        """Send the request and wait for the answer's head: within read_timeout once the
        request is out, and while the client is there (asked every HANGUP_CHECK seconds:
        a client that left does not hold a connection to the API). A body goes out in a
        task of `background` while the answer is awaited (RFC 9112 9.5: an API may answer
        early and stop reading)."""
        outgoing = [*exchange.headers, (b"authorization", f"Bearer {token}".encode())]
        try:
            head = h11.Request(method=exchange.method, target=exchange.target,
                               headers=outgoing)
        except h11.LocalProtocolError:
            raise Refusal(400, "bad_request", "not a request the API can take") from None
        await api.send(head)
        going = _BodyGoing()
        if exchange.body is None:
            await api.send(h11.EndOfMessage())
            going.done_at = trio.current_time()
        else:
            background.start_soon(_send_body, api, exchange, going)
        while True:
            with trio.move_on_after(HANGUP_CHECK):
                return await api.receive_head(exchange.method, silence=math.inf)
            if going.failure is not None:
                api.reusable = False
                raise going.failure
            if going.done_at is not None \
                    and trio.current_time() >= going.done_at + api.read_timeout:
                api.reusable = False
                raise ApiGone("the API did not answer in time", timeout=True)
            if conversation.gone():
                api.reusable = False  # its answer will never be read
                raise ClientGone("the client left before the API answered")

    # -- the daemon side ----------------------------------------------------------------

    async def _token(self, key: _Key) -> _Grant:
        """The daemon's token for `key`, the API it is for and how that API is verified,
        asked per request: a logout, a reload or a refresh counts from the next request
        on. (Holding the answer for its min_ttl saved 0.17 ms per request, and served a
        logged-out user or a moved API until the token ran out.)"""
        reply = await ask_daemon(self.daemon.request("get", min_ttl=self.min_ttl,
                                                     **_fields(key)))
        token, api_url, ca_bundle = reply.get("token"), reply.get("api_url"), \
            reply.get("ca_bundle", False)
        if not isinstance(token, str) or not isinstance(api_url, str) \
                or not (ca_bundle is None or isinstance(ca_bundle, str)):
            raise Refusal(502, "daemon_unreachable", "vm-tokend answered without a token, "
                          "the API it is for or what that API is checked against (a "
                          "vm-tokend older than this proxy?)")
        return _Grant(token, Upstream.from_api_url(api_url), ca_bundle)

    async def _invalidate(self, key: _Key, token: str) -> None:
        try:
            await self.daemon.request("invalidate", token=token, **_fields(key))
        except vm_token.Error as exc:
            log.debug("could not report a refused token: %s", type(exc).__name__)


async def _send_body(api: ApiConnection, exchange: _Exchange, going: _BodyGoing
                     ) -> None:
    """The task that sends a request body while its answer is awaited (see _send)."""
    try:
        await api.send_body(exchange.content())
    except (ApiGone, ClientGone) as exc:
        going.failure = exc
    going.done_at = trio.current_time()


async def _discard(pool: ApiPool, api: ApiConnection) -> None:
    """Drop an answer not passed on: read it when it is short, else close."""
    try:
        with trio.move_on_after(1):
            seen = 0
            async with aclosing(api.body()) as pieces:
                async for piece in pieces:
                    seen += len(piece)
                    if seen > MAX_REPLAY:
                        api.reusable = False
                        break
    except ApiGone:
        pass
    await pool.checkin(api)


async def _relay(conversation: Conversation, api: ApiConnection, response: h11.Response,
                 replaced: bool) -> int:
    """Pass the API's answer on (its body raw); the bytes of body sent."""
    drop = {b"x-vm-token-error", REPLACED_HEADER}  # ours alone say the proxy answered
    if any(name == b"transfer-encoding" for name, _ in response.headers):
        drop.add(b"content-length")  # framed by chunks: a length beside it is a lie
    # no CORS header is ever passed on: the proxy serves programs, never web pages
    headers = [(name, value) for name, value in
               end_to_end(list(response.headers), drop=frozenset(drop))
               if not name.startswith(b"access-control-")]
    if replaced:
        headers.append((REPLACED_HEADER, b"1"))
    head = h11.Response(status_code=response.status_code, headers=headers,
                        reason=response.reason)
    body, complete = api.take_buffered()
    if complete:  # a short answer: head and body leave in one write
        await conversation.send(head, h11.Data(data=body), h11.EndOfMessage())
        return len(body)
    await conversation.send(head)
    conversation.streaming()
    sent = 0
    try:
        async with aclosing(api.body()) as pieces:
            async for piece in pieces:
                sent += len(piece)
                await conversation.send(h11.Data(data=piece))
    except ApiGone as exc:
        raise ClientGone(f"the API's answer broke off: {exc}") from exc
    await conversation.send(h11.EndOfMessage())
    return sent


async def ask_daemon(call: Awaitable[dict[str, Any]]) -> dict[str, Any]:
    """The daemon's reply; its refusal, or its absence, as the proxy's Refusal."""
    try:
        return await call
    except vm_token.DaemonError as exc:
        raise Refusal(_STATUS.get(exc.code, 502), exc.code, exc.message) from None
    except vm_token.Error as exc:
        raise Refusal(502, "daemon_unreachable", str(exc)) from None


def _profile(profile: str | None) -> dict[str, str]:
    return {"profile": profile} if profile is not None else {}


def _fields(key: _Key) -> dict[str, str]:
    profile, videomanager = key
    return {**_profile(profile), **({"vm": videomanager} if videomanager is not None else {})}

