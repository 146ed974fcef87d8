"""The VideoManager Pro API's own login: `POST {api_url}/auth/login` with a username and
password, then `POST {api_url}/auth/refresh/{videoManagerId}` with the refresh token, for a
token per VideoManager. The refresh's answer may lack a refresh token: the one we have
stays (the keeper keeps it).
"""

from __future__ import annotations

import time
from typing import Protocol

import httpx
import trio

from ..text import quote
from .base import (
    CredentialsRejected,
    Forbidden,
    Grant,
    RefreshRejected,
    TransientError,
    api_message,
    check_count,
    content_type,
    describe,
    loads,
    parse_id,
    parse_retry_after,
    parse_videomanager,
    send,
    token_lifetime,
    valid_token,
)

__all__ = ["LegacyBackend", "VideoManagerApi"]


class LegacyBackend(Protocol):
    """What the keeper needs from the API's original login."""

    async def login(self, username: str, password: str) -> Grant: ...

    async def refresh(self, refresh_token: str, videomanager_id: str) -> Grant: ...


class VideoManagerApi:
    """The VideoManager Pro API's own login and refresh endpoints."""

    kind = "legacy"

    def __init__(
        self,
        http: httpx.AsyncClient,
        api_url: str,
        *,
        default_token_lifetime: float = 300.0,
    ) -> None:
        self._http = http
        self.api_url = api_url.rstrip("/")
        self.default_token_lifetime = default_token_lifetime

    async def login(self, username: str, password: str) -> Grant:
        sent = trio.current_time()
        response = await self._post(
            f"{self.api_url}/auth/login",
            {"username": username, "password": password},
            secrets=(password,),
        )
        # A 403 is the API's refusal only when it comes with the API's JSON: a proxy or a
        # firewall in between answers with a page of its own, and that passes.
        if response.status_code == 401 or (
                response.status_code == 403 and api_message(response) is not None):
            raise CredentialsRejected(
                f"the API rejected the credentials for {quote(username)}: "
                + describe(response, (password,))
            )
        return self._grant(response, (password,), sent)

    async def refresh(self, refresh_token: str, videomanager_id: str) -> Grant:
        sent = trio.current_time()
        response = await self._post(
            f"{self.api_url}/auth/refresh/{videomanager_id}",
            {"refreshToken": refresh_token},
            secrets=(refresh_token,),
        )
        if response.status_code == 401:
            raise RefreshRejected("the API rejected the refresh token: "
                                  + describe(response, (refresh_token,)))
        if response.status_code == 403:
            raise Forbidden(
                f"no rights for VideoManager {videomanager_id}: "
                + describe(response, (refresh_token,))
            )
        return self._grant(response, (refresh_token,), sent, expect=videomanager_id)

    async def _post(
        self, url: str, body: dict[str, str], *, secrets: tuple[str, ...]
    ) -> httpx.Response:
        return await send(self._http, "POST", url, secrets=secrets, json=body)

    def _grant(
        self, response: httpx.Response, secrets: tuple[str, ...], sent: float,
        expect: str | None = None,
    ) -> Grant:
        if response.status_code != 200:
            raise TransientError(
                describe(response, secrets),
                retry_after=parse_retry_after(response.headers.get("retry-after"), time.time()),
            )
        try:
            data = loads(response.content)
            if not isinstance(data, dict):
                raise TypeError
            access = valid_token(data.get("accessToken"))
            if access is None:
                raise TypeError
            # The vendor's own client reads only accessToken from a refresh: without a new
            # refresh token, the one we have stays (the keeper keeps it).
            refresh = valid_token(data.get("refreshToken"))
            # A login must say which VideoManagers there are and bring a refresh token for
            # the others; a refresh's list, if any, is not used (so not read).
            listed = data.get("videoManagerList") if expect is None else None
            if expect is None and (listed is None or refresh is None):
                raise TypeError
            if isinstance(listed, list):
                check_count(listed)
            vms = tuple(parse_videomanager(item) for item in listed or ())
            valid_for = parse_id(data.get("validForVideoManager", expect))
        except (ValueError, TypeError, KeyError):
            raise TransientError(
                f"the API answered HTTP {response.status_code} with a body that is not the "
                f"expected JSON ({content_type(response, secrets)})"
            ) from None
        if listed is not None and not vms:
            raise TransientError("the API listed no VideoManagers for this user")
        wall_now = time.time()
        lifetime = token_lifetime(access, self.default_token_lifetime, wall_now)
        return Grant(
            access_token=access,
            refresh_token=refresh,
            videomanagers=vms,
            valid_for=valid_for,
            lifetime=lifetime if lifetime is not None else self.default_token_lifetime,
            refresh_lifetime=token_lifetime(refresh, None, wall_now) if refresh else None,
            requested_at=sent,
        )
