"""Auth for httpx and requests: a fresh token on every request, one retry after a 401.

    client = httpx.Client(auth=vm_token.VideoManagerAuth("Marketing"))

Which VideoManager: the one named, else the id in the request's path
(`/v1/vms/{id}/...`), else the daemon's default — so one client can talk to several.
Which profile (account) of the daemon: the one named (`profile=`), else the one whose API
host is the request's host (the daemon picks it from `prefer_host`; no match: its default
profile) — so one client can talk to several APIs. `$VM_TOKEN_PROFILE` is not consulted:
the request's host says which.

This module imports httpx; `import vm_token` does not import it (VideoManagerAuth is
loaded on first use), and requests is imported only by RequestsAuth.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator
from os import PathLike
from typing import TYPE_CHECKING, Any

import httpx

from . import protocol
from .aio import AsyncClient
from .client import Client, get_fields, invalidate_fields
from .credential import videomanager_from_path
from .errors import BadRequest
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

    def _which(self, host: str) -> dict[str, Any]:
        """The field that picks the profile: the one given, else the request's host."""
        return {"profile": self.profile} if self.profile else {"prefer_host": host}

    def token(self, vm: str | None, host: str) -> Token:
        # profile="": the daemon's choice by host, never $VM_TOKEN_PROFILE.
        with Client(self.socket, profile="") as client:
            return _get(client, vm, self.min_ttl, self._which(host))

    def replace(self, rejected: Token, vm: str | None, host: str) -> Token:
        """Report a token the API rejected; a new one."""
        which = self._which(host)
        with Client(self.socket, profile="") as client:
            client.request(protocol.INVALIDATE,
                           **invalidate_fields(rejected, rejected.videomanager_id), **which)
            return _get(client, vm, self.min_ttl, which)

    async def atoken(self, vm: str | None, host: str) -> Token:
        async with AsyncClient(self.socket, max_connections=1, profile="") as client:
            return await _aget(client, vm, self.min_ttl, self._which(host))

    async def areplace(self, rejected: Token, vm: str | None, host: str) -> Token:
        which = self._which(host)
        async with AsyncClient(self.socket, max_connections=1, profile="") as client:
            await client.request(protocol.INVALIDATE,
                                 **invalidate_fields(rejected, rejected.videomanager_id),
                                 **which)
            return await _aget(client, vm, self.min_ttl, which)


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


def _httpx_host(request: httpx.Request) -> str:
    url = request.url
    return host_of(url.scheme, url.host, url.port)


def _replayable(request: httpx.Request) -> bool:
    # A body already in memory can be sent again; a streamed upload cannot.
    return isinstance(request.stream, httpx.ByteStream)


class VideoManagerAuth(_TokenSource, httpx.Auth):
    """httpx auth for the VideoManager Pro API, with tokens from vm-tokend.

        VideoManagerAuth(videomanager=None, *, min_ttl=30, socket=None, profile=None)

    Works with httpx.Client and httpx.AsyncClient, under trio and asyncio; the async flow
    never blocks the event loop. On a 401 it reports the token to the daemon, gets a new
    one and sends the request once more (bodies that were streamed cannot be re-sent: then
    the 401 is returned).
    """

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response]:
        vm = self.videomanager_for(request.url.path)
        host = _httpx_host(request)
        token = self.token(vm, host)
        request.headers["Authorization"] = token.authorization
        response = yield request
        if response.status_code == 401 and _replayable(request):
            request.headers["Authorization"] = self.replace(token, vm, host).authorization
            yield request

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        vm = self.videomanager_for(request.url.path)
        host = _httpx_host(request)
        token = await self.atoken(vm, host)
        request.headers["Authorization"] = token.authorization
        response = yield request
        if response.status_code == 401 and _replayable(request):
            request.headers["Authorization"] = (
                await self.areplace(token, vm, host)).authorization
            yield request


class RequestsAuth(_TokenSource):
    """The same for requests: `requests.get(url, auth=vm_token.RequestsAuth())`.

        RequestsAuth(videomanager=None, *, min_ttl=30, socket=None, profile=None)
    """

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        from urllib.parse import urlsplit

        url = urlsplit(request.url or "")
        vm = self.videomanager_for(url.path)
        host = host_of(url.scheme, url.hostname or "", url.port)
        token = self.token(vm, host)
        request.headers["Authorization"] = token.authorization
        state = {"token": token, "vm": vm, "host": host, "retried": False}
        request.register_hook(  # type: ignore[no-untyped-call]
            "response", lambda r, **kw: self._on_response(r, state, **kw))
        return request

    def _on_response(self, response: requests.Response, state: dict[str, Any],
                     **kwargs: Any) -> requests.Response:
        if response.status_code != 401 or state["retried"]:
            return response
        body = response.request.body
        if body is not None and not isinstance(body, bytes | str):
            return response  # a streamed upload cannot be sent again
        state["retried"] = True
        token = self.replace(state["token"], state["vm"], state["host"])
        response.content  # noqa: B018 - read it, so the connection can be reused
        response.close()
        retry = response.request.copy()
        retry.headers["Authorization"] = token.authorization
        new = response.connection.send(retry, **kwargs)
        new.history.append(response)
        new.request = retry
        return new
