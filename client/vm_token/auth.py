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


class _Choice:
    """What VideoManagerAuth and RequestsAuth share: which token to ask for."""

    def __init__(self, videomanager: str | int | None, min_ttl: float) -> None:
        self.videomanager = None if videomanager is None else str(videomanager)
        self.min_ttl = min_ttl

    def videomanager_for(self, path: str) -> str | None:
        return self.videomanager or videomanager_from_path(path)


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


class VideoManagerAuth(httpx.Auth):
    """httpx auth for the VideoManager Pro API, with tokens from vm-tokend.

    Works with httpx.Client and httpx.AsyncClient, under trio and asyncio; the async flow
    never blocks the event loop. On a 401 it reports the token to the daemon, gets a new
    one and sends the request once more (bodies that were streamed cannot be re-sent: then
    the 401 is returned).

    It holds no connection to the daemon between requests — asking costs a connect, tens
    of microseconds next to the milliseconds of an API call — so it needs no closing and
    may be shared by threads and event loops alike.
    """

    def __init__(
        self,
        videomanager: str | int | None = None,
        *,
        min_ttl: float = DEFAULT_MIN_TTL,
        socket: str | PathLike[str] | None = None,
    ) -> None:
        self._choice = _Choice(videomanager, min_ttl)
        self._socket = socket

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response]:
        vm = self._choice.videomanager_for(request.url.path)
        with Client(self._socket) as client:
            token = _get(client, vm, self._choice.min_ttl)
        request.headers["Authorization"] = token.authorization
        response = yield request
        if response.status_code == 401 and _replayable(request):
            with Client(self._socket) as client:
                client.invalidate(token, token.videomanager_id)
                token = _get(client, vm, self._choice.min_ttl)
            request.headers["Authorization"] = token.authorization
            yield request

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        vm = self._choice.videomanager_for(request.url.path)
        async with AsyncClient(self._socket, max_connections=1) as client:
            token = await _aget(client, vm, self._choice.min_ttl)
        request.headers["Authorization"] = token.authorization
        response = yield request
        if response.status_code == 401 and _replayable(request):
            async with AsyncClient(self._socket, max_connections=1) as client:
                await client.invalidate(token, token.videomanager_id)
                token = await _aget(client, vm, self._choice.min_ttl)
            request.headers["Authorization"] = token.authorization
            yield request


class RequestsAuth:
    """The same for requests: `requests.get(url, auth=vm_token.RequestsAuth())`."""

    def __init__(
        self,
        videomanager: str | int | None = None,
        *,
        min_ttl: float = DEFAULT_MIN_TTL,
        socket: str | PathLike[str] | None = None,
    ) -> None:
        import requests  # noqa: F401 - ImportError now, not on the first request

        self._choice = _Choice(videomanager, min_ttl)
        self._socket = socket

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        from urllib.parse import urlsplit

        vm = self._choice.videomanager_for(urlsplit(request.url or "").path)
        with Client(self._socket) as client:
            token = _get(client, vm, self._choice.min_ttl)
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
        token: Token = state["token"]
        with Client(self._socket) as client:
            client.invalidate(token, token.videomanager_id)
            token = _get(client, state["vm"], self._choice.min_ttl)
        response.content  # noqa: B018 - read it, so the connection can be reused
        response.close()
        retry = response.request.copy()
        retry.headers["Authorization"] = token.authorization
        new = response.connection.send(retry, **kwargs)
        new.history.append(response)
        new.request = retry
        return new
