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
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any, Final

import h11
import httpcore
import httpx

import vm_token

from .http11 import ClientGone, Conversation
from .routes import Refusal, Upstream, end_to_end, videomanager_of

__all__ = ["Forwarder", "ask_daemon"]

log = logging.getLogger(__name__)

# httpcore reads the API's answers 64 KiB at a time; a bulk download then costs the event
# loop two passes per 64 KiB. A MiB per read (a buffer per connection, not per body).
httpcore._async.http11.AsyncHTTP11Connection.READ_NUM_BYTES = 1 << 20

# A body up to this size is kept while it streams, for one replay after a 401.
MAX_REPLAY: Final = 1024 * 1024
REPLACED_HEADER: Final = b"x-vm-token-replaced"
# Tokens held for reuse: a proxy serves a handful of VideoManagers, not thousands.
MAX_HELD: Final = 256
# How long a request waits for a free connection to the API before a 503.
POOL_TIMEOUT: Final = 10.0
# Headers of the client's that never go upstream: ours replace them, or h11/httpx set them.
_DROP: Final = frozenset({b"host", b"authorization", b"expect", b"content-length"})
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

    async def chunks(self) -> AsyncIterator[bytes]:
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


def _has_body(request: h11.Request) -> bool:
    for name, value in request.headers:
        if name == b"transfer-encoding" or (name == b"content-length" and value != b"0"):
            return True
    return False


def _content_length(request: h11.Request) -> bytes | None:
    for name, value in request.headers:
        if name == b"content-length":
            return value
    return None


class Forwarder:
    """Forwards requests for any profile: one daemon client, one HTTP client per API."""

    def __init__(self, daemon: vm_token.AsyncClient, *, connect_timeout: float,
                 read_timeout: float, min_ttl: float) -> None:
        self.daemon = daemon
        self.min_ttl = min_ttl
        self._timeout = httpx.Timeout(read_timeout, connect=connect_timeout,
                                      pool=POOL_TIMEOUT)
        self._upstreams: dict[str | None, Upstream] = {}
        # The daemon's last answer per (profile, VideoManager): token, api_url, expiry. Used
        # while it has more than min_ttl left; a 401 drops it. The daemon stays the source:
        # this saves a round trip per request, not a refresh.
        self._tokens: dict[tuple[str | None, str | None], tuple[str, str, float]] = {}
        self._http: dict[str, httpx.AsyncClient] = {}

    async def aclose(self) -> None:
        for http in self._http.values():
            await http.aclose()

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
        transfer = any(name == b"transfer-encoding" for name, _ in request.headers)
        length = _content_length(request)
        if transfer and length is not None:  # RFC 9112 6.1: a smuggling attempt, or broken
            raise Refusal(400, "bad_request", "Content-Length and Transfer-Encoding together")
        for _ in range(2):  # a second time only if the profile's API changed meanwhile
            upstream = await self.upstream(profile)
            url = upstream.url_for(request.target)
            path = url[len(upstream.origin):].split("?", 1)[0]
            videomanager = videomanager_of(path, upstream.root)
            token, api_url = await self._token(profile, videomanager)
            if Upstream.from_api_url(api_url) == upstream:
                break
            self._upstreams[profile] = Upstream.from_api_url(api_url)  # a reload moved it
        else:
            raise Refusal(503, "upstream_unavailable", "the profile's API keeps changing")
        headers = end_to_end(list(request.headers), drop=_DROP)
        if not any(name == b"accept-encoding" for name, _ in headers):
            headers.append((b"accept-encoding", b"identity"))  # bodies pass through raw
        body = _Body(conversation) if _has_body(request) else None
        if body is None and not isinstance(await conversation.next_event(), h11.EndOfMessage):
            raise ClientGone("a request without a body went on")  # h11 says its end at once
        http = self._client(upstream.origin)
        response = await self._send(http, request.method, url, headers, length, body, token)
        replaced = False
        if response.status_code == 401:
            # The API refused the token: the daemon gets a fresh one. A request whose body
            # was kept whole is sent again with it; a longer one's 401 goes back, marked,
            # and the client's own retry gets the fresh token.
            await self._invalidate(profile, token, videomanager)
            if body is None or (body.complete and body.kept is not None):
                await response.aclose()
                token, _ = await self._token(profile, videomanager)
                replay = bytes(body.kept) if body is not None and body.kept is not None \
                    else None
                response = await self._send(http, request.method, url, headers, length,
                                            replay, token)
            else:
                replaced = True
        try:
            sent = await self._relay(conversation, response, replaced)
        finally:
            await response.aclose()
        return response.status_code, body.sent if body else 0, sent

    # -- the API side -------------------------------------------------------------------

    def _client(self, origin: str) -> httpx.AsyncClient:
        http = self._http.get(origin)
        if http is None:
            http = self._http[origin] = httpx.AsyncClient(
                timeout=self._timeout, follow_redirects=False, trust_env=False,
                limits=httpx.Limits(max_connections=100, max_keepalive_connections=20),
                # no cookie jar: one account's cookies never go out with another's token
                cookies=CookieJar(policy=DefaultCookiePolicy(allowed_domains=[])))
            http.headers.clear()  # none of httpx's own defaults: the client's headers only
        return http

    async def _send(self, http: httpx.AsyncClient, method: bytes, url: str,
                    headers: list[tuple[bytes, bytes]], length: bytes | None,
                    body: _Body | bytes | None, token: str) -> httpx.Response:
        outgoing = [*headers, (b"authorization", f"Bearer {token}".encode())]
        if length is not None:
            outgoing.append((b"content-length", length))
        content: AsyncIterator[bytes] | bytes | None
        content = body.chunks() if isinstance(body, _Body) else body
        try:
            request = http.build_request(method.decode("ascii", "replace"), url,
                                         headers=outgoing, content=content)
        except httpx.InvalidURL:
            raise Refusal(400, "bad_request", "the target is not a URL the API can take") \
                from None
        try:
            return await http.send(request, stream=True)
        except httpx.PoolTimeout:
            raise Refusal(503, "proxy_busy", "every connection to the API is in use; "
                          "retry") from None
        except httpx.TimeoutException:
            raise Refusal(504, "upstream_timeout", "the API did not answer in time") from None
        except httpx.TransportError as exc:
            raise Refusal(502, "upstream_unavailable",
                          f"cannot reach the API: {type(exc).__name__}") from None

    async def _relay(self, conversation: Conversation, response: httpx.Response,
                     replaced: bool) -> int:
        drop = {b"x-vm-token-error", REPLACED_HEADER}  # ours alone say the proxy answered
        if any(name.lower() == b"transfer-encoding" for name, _ in response.headers.raw):
            drop.add(b"content-length")  # framed by chunks: a length beside it is a lie
        headers = end_to_end(list(response.headers.raw), drop=frozenset(drop))
        if replaced:
            headers.append((REPLACED_HEADER, b"1"))
        await conversation.send(h11.Response(status_code=response.status_code,
                                             headers=headers,
                                             reason=response.reason_phrase.encode("latin-1",
                                                                                  "replace")))
        sent = 0
        try:
            async for chunk in response.aiter_raw():
                sent += len(chunk)
                await conversation.send(h11.Data(data=chunk))
        except httpx.TransportError as exc:
            raise ClientGone(f"the API's answer broke off: {type(exc).__name__}") from exc
        await conversation.send(h11.EndOfMessage())
        return sent

    # -- the daemon side ----------------------------------------------------------------

    async def _token(self, profile: str | None, videomanager: str | None
                     ) -> tuple[str, str]:
        held = self._tokens.get((profile, videomanager))
        if held is not None and held[2] - time.time() > self.min_ttl:
            return held[0], held[1]
        fields = {"min_ttl": self.min_ttl, **_profile(profile)}
        if videomanager is not None:
            fields["vm"] = videomanager
        reply = await ask_daemon(self.daemon.request("get", **fields))
        token, api_url = reply.get("token"), reply.get("api_url")
        if not isinstance(token, str) or not isinstance(api_url, str):
            raise Refusal(502, "daemon_unreachable", "vm-tokend answered without a token or "
                          "the API it is for (a vm-tokend older than this proxy?)")
        expires_at = reply.get("expires_at")
        if isinstance(expires_at, int | float) and not isinstance(expires_at, bool):
            if len(self._tokens) > MAX_HELD:
                self._tokens.clear()  # a crowd of VideoManagers: start again
            self._tokens[(profile, videomanager)] = (token, api_url, float(expires_at))
        return token, api_url

    async def _invalidate(self, profile: str | None, token: str,
                          videomanager: str | None) -> None:
        self._tokens.pop((profile, videomanager), None)
        fields = {"token": token, **_profile(profile)}
        if videomanager is not None:
            fields["vm"] = videomanager
        try:
            await self.daemon.request("invalidate", **fields)
        except vm_token.Error as exc:
            log.debug("could not report a refused token: %s", type(exc).__name__)



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

