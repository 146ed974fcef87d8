"""Auth for httpx and requests: a fresh token on every request, one retry after a 401.

    client = httpx.Client(auth=vm_token.VideoManagerAuth("Marketing"))

Which VideoManager: the one named, else the id in the request's path
(`/v1/vms/{id}/...`), else the daemon's default — so one client can talk to several.

This module imports httpx; `import vm_token` does not import it (VideoManagerAuth is
loaded on first use), and requests is imported only by RequestsAuth.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator
from os import PathLike
from typing import TYPE_CHECKING, Any

import httpx

from .aio import AsyncClient
from .client import Client
from .credential import videomanager_from_path
from .errors import BadRequest
from .token import Token

if TYPE_CHECKING:
    import requests

__all__ = ["RequestsAuth", "VideoManagerAuth"]

DEFAULT_MIN_TTL = 30.0


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
    ) -> None:
        self.videomanager = None if videomanager is None else str(videomanager)
        self.min_ttl = min_ttl
        self.socket = socket

    def videomanager_for(self, path: str) -> str | None:
        """The one given, else the id in a `/v1/vms/{id}/...` path, else None (default)."""
        return self.videomanager or videomanager_from_path(path)

    def token(self, vm: str | None) -> Token:
        with Client(self.socket) as client:
            return _get(client, vm, self.min_ttl)

    def replace(self, rejected: Token, vm: str | None) -> Token:
        """Report a token the API rejected; a new one."""
        with Client(self.socket) as client:
            client.invalidate(rejected, rejected.videomanager_id)
            return _get(client, vm, self.min_ttl)

    async def atoken(self, vm: str | None) -> Token:
        async with AsyncClient(self.socket, max_connections=1) as client:
            return await _aget(client, vm, self.min_ttl)

    async def areplace(self, rejected: Token, vm: str | None) -> Token:
        async with AsyncClient(self.socket, max_connections=1) as client:
            await client.invalidate(rejected, rejected.videomanager_id)
            return await _aget(client, vm, self.min_ttl)


def _get(client: Client, vm: str | None, min_ttl: float) -> Token:
    try:
        return client.get_token(vm, min_ttl=min_ttl)
    except BadRequest:
        if not min_ttl:
            raise
        # min_ttl is a margin we would like, not one we need: with tokens that live less
        # than it (the daemon says so), the freshest token there is will do.
        return client.get_token(vm)


async def _aget(client: AsyncClient, vm: str | None, min_ttl: float) -> Token:
    try:
        return await client.get_token(vm, min_ttl=min_ttl)
    except BadRequest:
        if not min_ttl:
            raise
        return await client.get_token(vm)


def _replayable(request: httpx.Request) -> bool:
    # A body already in memory can be sent again; a streamed upload cannot.
    return isinstance(request.stream, httpx.ByteStream)


class VideoManagerAuth(_TokenSource, httpx.Auth):
    """httpx auth for the VideoManager Pro API, with tokens from vm-tokend.

        VideoManagerAuth(videomanager=None, *, min_ttl=30, socket=None)

    Works with httpx.Client and httpx.AsyncClient, under trio and asyncio; the async flow
    never blocks the event loop. On a 401 it reports the token to the daemon, gets a new
    one and sends the request once more (bodies that were streamed cannot be re-sent: then
    the 401 is returned).
    """

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response]:
        vm = self.videomanager_for(request.url.path)
        token = self.token(vm)
        request.headers["Authorization"] = token.authorization
        response = yield request
        if response.status_code == 401 and _replayable(request):
            request.headers["Authorization"] = self.replace(token, vm).authorization
            yield request

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        vm = self.videomanager_for(request.url.path)
        token = await self.atoken(vm)
        request.headers["Authorization"] = token.authorization
        response = yield request
        if response.status_code == 401 and _replayable(request):
            request.headers["Authorization"] = (await self.areplace(token, vm)).authorization
            yield request


class RequestsAuth(_TokenSource):
    """The same for requests: `requests.get(url, auth=vm_token.RequestsAuth())`.

        RequestsAuth(videomanager=None, *, min_ttl=30, socket=None)
    """

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        from urllib.parse import urlsplit

        vm = self.videomanager_for(urlsplit(request.url or "").path)
        token = self.token(vm)
        request.headers["Authorization"] = token.authorization
        state = {"token": token, "vm": vm, "retried": False}
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
        token = self.replace(state["token"], state["vm"])
        response.content  # noqa: B018 - read it, so the connection can be reused
        response.close()
        retry = response.request.copy()
        retry.headers["Authorization"] = token.authorization
        new = response.connection.send(retry, **kwargs)
        new.history.append(response)
        new.request = retry
        return new
