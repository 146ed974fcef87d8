"""Choosing the way to log in from the settings: the API's own endpoints, or OpenID
Connect found through WebFinger (`auth = "auto"`), or named (`oidc_issuer`).

`auto` asks WebFinger once per session (and so again on reload): an issuer link means
OpenID Connect; a 404 or no such link means the API's own login; a network error or a 5xx
is a TransientError the keeper backs off from and asks again — never a guess.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx

from ..config.profile import Profile
from .base import ClientRejected, TransientError
from .legacy import VideoManagerApi
from .oidc import WELL_KNOWN, IssuerLink, OidcApi, WebFinger, check_url

__all__ = ["Connector"]

log = logging.getLogger(__name__)


def _link(issuer: str) -> IssuerLink:
    return IssuerLink(check_url(issuer + WELL_KNOWN, "the discovery document"), issuer)


class Connector:
    """The keeper's `connect`: a backend for the current settings (the keeper's
    LegacyBackend or OidcBackend, which these two classes are)."""

    def __init__(self, http: httpx.AsyncClient, settings: Callable[[], Profile],
                 calls: Counter[str]) -> None:
        self._http = http
        self._settings = settings
        self._calls = calls
        self._webfinger = WebFinger(http, calls)

    @staticmethod
    def key(settings: Profile) -> tuple[Any, ...]:
        """What a session's backend depends on: a change of it needs a new session."""
        secret = settings.oidc_client_secret
        return (settings.api_url, settings.auth, settings.oidc_issuer, settings.oidc_client_id,
                secret.get_secret_value() if secret else None, settings.oidc_scope,
                settings.default_token_lifetime)

    async def __call__(self) -> VideoManagerApi | OidcApi:
        settings = self._settings()
        if settings.auth == "legacy":
            return self._legacy(settings)
        link = await self.issuer(settings)
        if link is None:
            if settings.auth == "oidc":
                raise ClientRejected('auth is "oidc", but the API\'s WebFinger names no '
                                     "OpenID Connect issuer: set oidc_issuer")
            log.info("WebFinger names no OpenID Connect issuer for %s: logging in with the "
                     "API's own endpoints", settings.api_url)
            return self._legacy(settings)
        secret = settings.oidc_client_secret
        return OidcApi(self._http, settings.api_url, link,
                       client_id=settings.oidc_client_id,
                       client_secret=secret.get_secret_value() if secret else None,
                       scope=settings.oidc_scope,
                       default_token_lifetime=settings.default_token_lifetime,
                       calls=self._calls)

    async def issuer(self, settings: Profile) -> IssuerLink | None:
        """The issuer to log in with: the configured one, else what WebFinger says."""
        if settings.oidc_issuer:
            return _link(settings.oidc_issuer)
        link = await self._webfinger.lookup(settings.api_url)
        if link is not None:
            log.info("WebFinger: the OpenID Connect issuer for %s is %s", settings.api_url,
                     link.issuer)
        return link

    async def changed(self, settings: Profile, auth: str | None, issuer: str | None) -> bool:
        """Whether WebFinger now answers differently from what the running session
        (`auth`, `issuer`) was made from. Unsure (the API unreachable): no."""
        if settings.auth == "legacy" or settings.oidc_issuer:
            return False
        try:
            link = await self._webfinger.lookup(settings.api_url)
        except (TransientError, ClientRejected) as exc:
            log.warning("reload: cannot ask WebFinger again (%s); keeping the session", exc)
            return False
        if link is None:
            return auth != "legacy"
        return auth != "oidc" or issuer != link.issuer

    def _legacy(self, settings: Profile) -> VideoManagerApi:
        return VideoManagerApi(self._http, settings.api_url,
                               default_token_lifetime=settings.default_token_lifetime)
