"""Auth for httpx and requests: a fresh token on every request, one retry after a 401.

    client = httpx.Client(auth=vm_token.VideoManagerAuth("Marketing"))

Where a token goes: by git's helper's rule, which the daemon applies — only to a profile's
API host or one of its `credential_hosts`, and only over https (plain http to loopback
only). Any other request (an upload to the host the API names, anything else the client
is used for) goes out exactly as the caller made it: no Authorization is added, one the
caller set stays, and its 401 is returned as it is and reported to nobody.

Which VideoManager: the one named, else the id in the request's path
(`/v1/vms/{id}/...`), else the daemon's default — so one client can talk to several.
Which profile (account) of the daemon: the one named (`profile=`; then only its hosts get
a token), else the one whose host is the request's — so one client can talk to several
APIs. `$VM_TOKEN_PROFILE` is not consulted: the request's host says which.

This module imports httpx; `import vm_token` does not import it (VideoManagerAuth is
loaded on first use), and requests is imported only by RequestsAuth.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator, Mapping
from os import PathLike
from typing import TYPE_CHECKING, Any

import httpx

from . import protocol
from ._git_credential import videomanager_from_path
from .aio import AsyncClient
from .client import Client, get_fields, invalidate_fields
from .errors import BadRequest, UnknownHost
from .token import Token

if TYPE_CHECKING:
    import requests

__all__ = ["RequestsAuth", "VideoManagerAuth"]

DEFAULT_MIN_TTL = 30.0
_DEFAULT_PORTS = {"http": 80, "https": 443}


def host_of(scheme: str, host: str, port: int | None) -> str:
    """`host[:port]` as git names a host: the port only when not the scheme's default, an
    IPv6 address in brackets."""
    host = host.lower()
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    if port is None or port == _DEFAULT_PORTS.get(scheme.lower()):
        return host
    return f"{host}:{port}"


class _TokenSource:
    """What VideoManagerAuth and RequestsAuth share: which token, and how to get one.

    No connection to the daemon is kept between requests — asking costs a connect, tens
    of microseconds next to the milliseconds of an API call — so nothing needs closing
    and an auth object may be shared by threads and event loops alike.
    """

    def __init__(
        self,
        videomanager: str | int | None = None,
        *,
        min_ttl: float = DEFAULT_MIN_TTL,
        socket: str | PathLike[str] | None = None,
        profile: str | None = None,
    ) -> None:
        self.videomanager = None if videomanager is None else str(videomanager)
        self.min_ttl = min_ttl
        self.socket = socket
        self.profile = profile or None

    def videomanager_for(self, path: str) -> str | None:
        """The one given, else the id in a `/v1/vms/{id}/...` path, else None (default)."""
        return self.videomanager or videomanager_from_path(path)

    def _which(self, scheme: str, host: str) -> dict[str, Any]:
        """The fields that choose the profile and let the daemon refuse a host: git's own
        (`host`, `protocol`), and the profile if one was named."""
        fields: dict[str, Any] = {"host": host, "protocol": scheme}
        if self.profile:
            fields["profile"] = self.profile
        return fields

    def token(self, vm: str | None, scheme: str, host: str) -> Token | None:
        """A token for a request to `scheme://host`, None if none may go there."""
        # profile="": the daemon's choice by host, never $VM_TOKEN_PROFILE.
        with Client(self.socket, profile="") as client:
            try:
                return _get(client, vm, self.min_ttl, self._which(scheme, host))
            except UnknownHost:
                return None

    def replace(self, rejected: Token, vm: str | None, scheme: str, host: str) -> Token | None:
        """Report a token the API rejected; a new one (None if the host is no longer ours)."""
        which = self._which(scheme, host)
        with Client(self.socket, profile="") as client:
            try:
                client.request(protocol.INVALIDATE,
                               **invalidate_fields(rejected, rejected.videomanager_id), **which)
                return _get(client, vm, self.min_ttl, which)
            except UnknownHost:
                return None

    async def atoken(self, vm: str | None, scheme: str, host: str) -> Token | None:
        async with AsyncClient(self.socket, max_connections=1, profile="") as client:
            try:
                return await _aget(client, vm, self.min_ttl, self._which(scheme, host))
            except UnknownHost:
                return None

    async def areplace(self, rejected: Token, vm: str | None, scheme: str,
                       host: str) -> Token | None:
        which = self._which(scheme, host)
        async with AsyncClient(self.socket, max_connections=1, profile="") as client:
            try:
                await client.request(protocol.INVALIDATE,
                                     **invalidate_fields(rejected, rejected.videomanager_id),
                                     **which)
                return await _aget(client, vm, self.min_ttl, which)
            except UnknownHost:
                return None


def _get(client: Client, vm: str | None, min_ttl: float, which: dict[str, Any]) -> Token:
    try:
        return Token.from_reply(client.request(protocol.GET, **get_fields(vm, min_ttl),
                                               **which))
    except BadRequest:
        if not min_ttl:
            raise
        # min_ttl is a margin we would like, not one we need: with tokens that live less
        # than it (the daemon says so), the freshest token there is will do.
        return Token.from_reply(client.request(protocol.GET, **get_fields(vm, 0), **which))


async def _aget(client: AsyncClient, vm: str | None, min_ttl: float,
                which: dict[str, Any]) -> Token:
    try:
        return Token.from_reply(await client.request(protocol.GET, **get_fields(vm, min_ttl),
                                                     **which))
    except BadRequest:
        if not min_ttl:
            raise
        return Token.from_reply(await client.request(protocol.GET, **get_fields(vm, 0),
                                                     **which))


def _httpx_origin(request: httpx.Request) -> tuple[str, str]:
    """(scheme, host[:port]) of the request, the host as it is looked up (IDNA-encoded)."""
    url = request.url
    return url.scheme, host_of(url.scheme, url.raw_host.decode("ascii"), url.port)


def _replayable(request: httpx.Request) -> bool:
    # A body already in memory can be sent again; a streamed upload cannot.
    return isinstance(request.stream, httpx.ByteStream)


def _carried(headers: Mapping[str, str], token: Token) -> bool:
    """Whether a request with these headers carried `token`. A response is the last of the
    redirects followed; after one to another host (httpx and requests drop the header
    there) its 401 is that host's, and says nothing about the token."""
    return headers.get("Authorization") == token.authorization


class VideoManagerAuth(_TokenSource, httpx.Auth):
    """httpx auth for the VideoManager Pro API, with tokens from vm-tokend.

        VideoManagerAuth(videomanager=None, *, min_ttl=30, socket=None, profile=None)

    Works with httpx.Client and httpx.AsyncClient, under trio and asyncio; the async flow
    never blocks the event loop. A token goes only to a profile's hosts, over https (see
    the module's docstring); other requests go out untouched. On a 401 to a request that
    carried a token it reports the token to the daemon, gets a new one and sends the
    request once more (bodies that were streamed cannot be re-sent: then the 401 is
    returned).
    """

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response]:
        vm = self.videomanager_for(request.url.path)
        scheme, host = _httpx_origin(request)
        token = self.token(vm, scheme, host)
        if token is None:
            yield request  # not ours to authorize: as the caller made it
            return
        request.headers["Authorization"] = token.authorization
        response = yield request
        if (response.status_code == 401 and _replayable(request)
                and _carried(response.request.headers, token)):
            fresh = self.replace(token, vm, scheme, host)
            if fresh is not None:
                request.headers["Authorization"] = fresh.authorization
                yield request

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        vm = self.videomanager_for(request.url.path)
        scheme, host = _httpx_origin(request)
        token = await self.atoken(vm, scheme, host)
        if token is None:
            yield request
            return
        request.headers["Authorization"] = token.authorization
        response = yield request
        if (response.status_code == 401 and _replayable(request)
                and _carried(response.request.headers, token)):
            fresh = await self.areplace(token, vm, scheme, host)
            if fresh is not None:
                request.headers["Authorization"] = fresh.authorization
                yield request


class RequestsAuth(_TokenSource):
    """The same for requests: `requests.get(url, auth=vm_token.RequestsAuth())`.

        RequestsAuth(videomanager=None, *, min_ttl=30, socket=None, profile=None)
    """

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        from urllib.parse import urlsplit

        url = urlsplit(request.url or "")
        vm = self.videomanager_for(url.path)
        scheme = url.scheme.lower()
        host = host_of(scheme, url.hostname or "", url.port)
        token = self.token(vm, scheme, host)
        if token is None:
            return request  # not ours to authorize: as the caller made it
        request.headers["Authorization"] = token.authorization
        state = {"token": token, "vm": vm, "scheme": scheme, "host": host, "retried": False}
        request.register_hook(  # type: ignore[no-untyped-call]
            "response", lambda r, **kw: self._on_response(r, state, **kw))
        return request

    def _on_response(self, response: requests.Response, state: dict[str, Any],
                     **kwargs: Any) -> requests.Response:
        # requests copies this hook into the requests of redirects it follows, to any host:
        # only a 401 to a request that carried the token is about the token.
        if (response.status_code != 401 or state["retried"]
                or not _carried(response.request.headers, state["token"])):
            return response
        body = response.request.body
        if body is not None and not isinstance(body, bytes | str):
            return response  # a streamed upload cannot be sent again
        state["retried"] = True
        token = self.replace(state["token"], state["vm"], state["scheme"], state["host"])
        if token is None:
            return response
        response.content  # noqa: B018 - read it, so the connection can be reused
        response.close()
        retry = response.request.copy()
        retry.headers["Authorization"] = token.authorization
        new = response.connection.send(retry, **kwargs)
        new.history.append(response)
        new.request = retry
        return new
