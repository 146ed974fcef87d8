"""OpenID Connect as the vendor speaks it: the issuer found through WebFinger, Keycloak's
discovery document, and the password and refresh grants.

    WebFinger.lookup(api_url)   which issuer logs the API's users in, or None (legacy)
    OidcApi                     discovery (cached per its headers, read again when the
                                token endpoint answers 404), the grants, and the user's
                                VideoManagers from the API itself

An access token from here covers every VideoManager of the user: the VideoManager is the
`{id}` in `/v1/vms/{id}/…` and the API checks the user's rights. Errors are upstream's
(see its docstring), and messages never carry a secret we sent.
"""

from __future__ import annotations

import base64
import email.utils
import logging
import time
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any, Final
from urllib.parse import quote as urlquote
from urllib.parse import urlsplit, urlunsplit

import httpx
import trio

from ..config.settings import host_is_loopback
from ..text import quote, shorten
from .base import (
    CLOCK_SLACK,
    MAX_LIFETIME,
    ClientRejected,
    CredentialsRejected,
    Grant,
    RefreshRejected,
    TransientError,
    VideoManagerRef,
    check_count,
    content_type,
    describe,
    loads,
    number,
    parse_retry_after,
    parse_videomanager,
    scrub,
    send,
    token_lifetime,
    valid_token,
)

log = logging.getLogger(__name__)

__all__ = ["ISSUER_REL", "IssuerLink", "OidcApi", "TokenRejected", "WebFinger", "api_root"]

ISSUER_REL: Final = "http://openid.net/specs/connect/1.0/issuer"
WELL_KNOWN: Final = "/.well-known/openid-configuration"
# How long a discovery answer is used when its headers say nothing; and at most. Guesses:
# an identity provider's endpoints move with a migration, not by the hour.
DEFAULT_CACHE: Final = 3600.0
MAX_CACHE: Final = 86400.0
# A discovery document is read again at most this often, whatever its headers say
# (Keycloak may send no-cache): not a request before every token request. And when
# reading it again fails, the one we have is used for this long more.
MIN_DISCOVERY_CACHE: Final = 60.0
# OAuth error codes that mean our client is not set up as the provider expects: a
# configuration error, not worth retrying on a timer.
CLIENT_ERRORS: Final = frozenset({"invalid_client", "unauthorized_client",
                                  "unsupported_grant_type"})


class TokenRejected(TransientError):
    """The API refused the access token itself (401): it must be replaced."""


def check_url(url: str, what: str) -> str:
    """`url` if it is https (or http to this machine) and plain (no spaces, no control
    characters: it reaches logs and status); else ClientRejected."""
    if not url.isprintable() or any(ch.isspace() for ch in url) or len(url) > 2048:
        raise ClientRejected(f"{what} {quote(url)} is not a URL: refusing to use it")
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return url
    if parts.scheme == "http" and parts.hostname and host_is_loopback(parts.hostname):
        return url
    raise ClientRejected(f"{what} {quote(url)} is not an https URL: refusing to use it")


def api_root(api_url: str) -> str:
    """The resource WebFinger is asked about: the API root, `api_url` without its last
    segment, with a trailing slash (`https://api.video-cdn.net/v1/vms` → `…/v1/`)."""
    parts = urlsplit(api_url)
    path = parts.path.rstrip("/").rsplit("/", 1)[0] + "/"
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def cache_seconds(response: httpx.Response) -> float:
    """How long an answer may be used, from Cache-Control max-age or Expires."""
    control = response.headers.get("cache-control", "").lower()
    directives = [part.strip() for part in control.split(",")]
    if "no-store" in directives or "no-cache" in directives:
        return 0.0  # wherever they stand (RFC 9111)
    for directive in directives:
        name, _, value = directive.partition("=")
        if name.strip() == "max-age" and value.strip().isascii() and value.strip().isdigit():
            return min(float(value.strip()), MAX_CACHE)
    expires = response.headers.get("expires")
    if expires:
        try:
            return max(0.0, min(email.utils.parsedate_to_datetime(expires).timestamp()
                                - time.time(), MAX_CACHE))
        except (TypeError, ValueError, IndexError, OverflowError):
            return 0.0  # RFC 9111: an invalid Expires means "already expired"
    return DEFAULT_CACHE


@dataclass(frozen=True)
class IssuerLink:
    """Where to read the discovery document, and the issuer it must name."""

    document_url: str
    issuer: str

    @classmethod
    def from_href(cls, href: str) -> IssuerLink:
        """The vendor's WebFinger names the discovery document itself; OpenID Connect
        Discovery would name the issuer. Both are taken."""
        trimmed = href.rstrip("/")
        if trimmed.endswith(WELL_KNOWN):
            return cls(check_url(href, "the discovery document"), trimmed[: -len(WELL_KNOWN)])
        return cls(check_url(trimmed + WELL_KNOWN, "the discovery document"), trimmed)


class WebFinger:
    """Asks the API's host which OpenID Connect issuer logs its users in."""

    def __init__(self, http: httpx.AsyncClient, calls: Counter[str]) -> None:
        self._http = http
        self._calls = calls
        self._cache: dict[str, tuple[float, IssuerLink | None]] = {}

    async def lookup(self, api_url: str) -> IssuerLink | None:
        """The issuer link; None when the host has none (404, or no such link: the API's
        own login); TransientError when it cannot tell now (never a guess)."""
        resource = api_root(api_url)
        cached = self._cache.get(resource)
        if cached is not None and cached[0] > trio.current_time():
            return cached[1]
        parts = urlsplit(api_url)
        url = urlunsplit((parts.scheme, parts.netloc, "/.well-known/webfinger", "", ""))
        self._calls["webfinger"] += 1
        sent = trio.current_time()
        response = await send(self._http, "GET", url, peer="the API's WebFinger",
                              params={"resource": resource},
                              headers={"Accept": "application/jrd+json"})
        if response.status_code in (404, 410):
            link = None
        elif response.status_code == 200:
            link = self._link(response, url)
        else:
            raise TransientError(
                f"WebFinger at {url} answered {describe(response, ())}",
                retry_after=parse_retry_after(response.headers.get("retry-after"), time.time()))
        self._cache[resource] = (sent + cache_seconds(response), link)
        return link

    @staticmethod
    def _link(response: httpx.Response, url: str) -> IssuerLink | None:
        try:
            data = loads(response.content)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise TransientError(
                f"WebFinger at {url} answered with {content_type(response)}, not JRD; "
                "if the API's host always does, set auth = \"legacy\" (or oidc_issuer)")
        links = data.get("links")
        for link in links if isinstance(links, list) else ():
            if isinstance(link, dict) and link.get("rel") == ISSUER_REL \
                    and isinstance(link.get("href"), str):
                return IssuerLink.from_href(link["href"])
        return None


@dataclass(frozen=True)
class Provider:
    """What we use of a discovery document."""

    issuer: str
    token_endpoint: str
    authorization_endpoint: str | None
    device_authorization_endpoint: str | None
    userinfo_endpoint: str | None
    code_challenge_methods: tuple[str, ...] | None  # None: the document does not say
    expires_at: float  # trio clock
    # RFC 9207: the provider names itself (iss) in every authorization response.
    iss_parameter_supported: bool = False


def _same_issuer(a: str, b: str) -> bool:
    return a.rstrip("/") == b.rstrip("/")


class OidcApi:
    """The password and refresh grants against the issuer, and the VideoManager list."""

    kind = "oidc"

    def __init__(
        self,
        http: httpx.AsyncClient,
        api_url: str,
        link: IssuerLink,
        *,
        client_id: str = "anonymous",
        client_secret: str | None = None,
        scope: str = "openid",
        default_token_lifetime: float = 300.0,
        calls: Counter[str] | None = None,
    ) -> None:
        self._http = http
        self.api_url = api_url.rstrip("/")
        self.link = link
        self.client_id = client_id
        self._client_secret = client_secret
        self.scope = scope
        self.default_token_lifetime = default_token_lifetime
        self._calls = calls if calls is not None else Counter()
        self._provider: Provider | None = None

    @property
    def issuer(self) -> str:
        return self.link.issuer

    # -- discovery ----------------------------------------------------------------------

    async def provider(self) -> Provider:
        """The discovery document, read when missing or stale."""
        provider = self._provider
        if provider is not None and provider.expires_at > trio.current_time():
            return provider
        try:
            return await self._discover()
        except TransientError as exc:
            if provider is None:
                raise
            # Stale beats nothing: the endpoints rarely move, and when the token endpoint
            # does, its 404 makes us forget this one.
            log.warning("cannot read the discovery document again (%s); using the one "
                        "read before", exc)
            self._provider = provider = replace(
                provider, expires_at=trio.current_time() + MIN_DISCOVERY_CACHE)
            return provider

    async def _discover(self) -> Provider:
        url = self.link.document_url
        self._calls["discovery"] += 1
        sent = trio.current_time()
        response = await send(self._http, "GET", url, peer="the identity provider",
                              headers={"Accept": "application/json"})
        if response.status_code != 200:
            raise TransientError(
                f"the discovery document at {url} could not be read: "
                + describe(response, ()),
                retry_after=parse_retry_after(response.headers.get("retry-after"), time.time()))
        try:
            data = loads(response.content)
            if not isinstance(data, dict) or not isinstance(data.get("issuer"), str) \
                    or not isinstance(data.get("token_endpoint"), str):
                raise ValueError
        except ValueError:
            raise TransientError(f"the discovery document at {url} is not the expected JSON "
                                 f"({content_type(response)})") from None
        if not _same_issuer(data["issuer"], self.link.issuer):
            raise ClientRejected(
                f"the discovery document at {url} names the issuer {quote(data['issuer'])}, "
                f"not {quote(self.link.issuer)} where we were sent: refusing it")
        methods = data.get("code_challenge_methods_supported")
        self._provider = provider = Provider(
            issuer=self.link.issuer,
            token_endpoint=check_url(data["token_endpoint"], "the token endpoint"),
            authorization_endpoint=_optional_url(data, "authorization_endpoint"),
            device_authorization_endpoint=_optional_url(data, "device_authorization_endpoint"),
            userinfo_endpoint=_optional_url(data, "userinfo_endpoint"),
            code_challenge_methods=tuple(m for m in methods if isinstance(m, str))
            if isinstance(methods, list) else None,
            expires_at=sent + max(MIN_DISCOVERY_CACHE, cache_seconds(response)),
            iss_parameter_supported=data.get("authorization_response_iss_parameter_supported")
            is True,
        )
        return provider

    def forget_provider(self) -> None:
        self._provider = None

    # -- grants --------------------------------------------------------------------------

    async def login(self, username: str, password: str) -> Grant:
        """The password grant, as the vendor's own client sends it."""
        form = {"grant_type": "password", "username": username, "password": password,
                "scope": self.scope}
        return await self._token(form, "password", (password,), who=username)

    async def refresh(self, refresh_token: str) -> Grant:
        form = {"grant_type": "refresh_token", "refresh_token": refresh_token}
        return await self._token(form, "refresh_token", (refresh_token,))

    async def _token(self, form: dict[str, str], grant: str, secrets: tuple[str, ...],
                     who: str | None = None) -> Grant:
        response, sent, secrets = await self.post_token(form, secrets)
        if response.status_code == 200:
            return self.parse_grant(response, sent, secrets)
        raise self._error(response, grant, secrets, who)

    async def post_token(self, form: dict[str, str], secrets: tuple[str, ...]
                         ) -> tuple[httpx.Response, float, tuple[str, ...]]:
        """POST `form` to the token endpoint, authenticated as our client: the answer,
        when it was sent, and the secrets to keep out of messages (ours included)."""
        provider = await self.provider()
        form, headers, mine = self._authenticated(form)
        secrets += mine
        sent = trio.current_time()
        response = await send(self._http, "POST", provider.token_endpoint, data=form,
                              headers=headers, peer="the identity provider", secrets=secrets)
        if response.status_code == 404:
            self.forget_provider()  # it moved? read the discovery document again
        return response, sent, secrets

    async def post_form(self, url: str, form: dict[str, str]) -> httpx.Response:
        """POST `form` to another endpoint of the provider (device authorization)."""
        form, headers, secrets = self._authenticated(form)
        return await send(self._http, "POST", url, data=form, headers=headers,
                          peer="the identity provider", secrets=secrets)

    def _authenticated(self, form: dict[str, str]
                       ) -> tuple[dict[str, str], dict[str, str], tuple[str, ...]]:
        """`form` and headers as our client sends them: with a secret, HTTP Basic (RFC
        6749 2.3.1: id and secret form-urlencoded first); without, client_id in the form.
        Also the secrets to keep out of messages, the Basic value included."""
        headers = {"Accept": "application/json"}
        if not self._client_secret:
            return {**form, "client_id": self.client_id}, headers, ()
        pair = f"{urlquote(self.client_id, safe='')}:{urlquote(self._client_secret, safe='')}"
        basic = base64.b64encode(pair.encode()).decode()
        headers["Authorization"] = "Basic " + basic
        return form, headers, (self._client_secret, basic)

    def _error(self, response: httpx.Response, grant: str, secrets: tuple[str, ...],
               who: str | None) -> Exception:
        """The exception for a token endpoint's refusal (RFC 6749 5.2)."""
        retry_after = parse_retry_after(response.headers.get("retry-after"), time.time())
        error, text = oauth_error(response, secrets)
        if error is None:
            return TransientError(f"the identity provider answered {describe(response, secrets)}",
                                  retry_after=retry_after)
        said = f"{error} ({text})" if text else error
        if error == "invalid_grant" and grant == "password":
            return CredentialsRejected(
                f"the identity provider rejected the credentials for {quote(who or '')}: {said}")
        if error == "invalid_grant":
            return RefreshRejected(f"the identity provider refused the refresh token: {said}")
        if error in CLIENT_ERRORS:
            return ClientRejected(f"the identity provider refused the client "
                                  f"{quote(self.client_id)} (oidc_client_id): {said}")
        if error == "invalid_scope":
            return ClientRejected(f"the identity provider refused the scope "
                                  f"{quote(self.scope)} (oidc_scope): {said}")
        return TransientError(f"the identity provider answered HTTP {response.status_code}: "
                              f"{said}", retry_after=retry_after)

    def parse_grant(self, response: httpx.Response, sent: float,
                    secrets: tuple[str, ...]) -> Grant:
        """The Grant of a token endpoint's 200 answer; TransientError if it is not one."""
        try:
            data = loads(response.content)
            if not isinstance(data, dict):
                raise TypeError
            access = valid_token(data.get("access_token"))
            token_type = data.get("token_type", "Bearer")
            if access is None or not isinstance(token_type, str) \
                    or token_type.lower() != "bearer":
                raise TypeError
            refresh = valid_token(data.get("refresh_token"))
            id_token = valid_token(data.get("id_token"))
        except (ValueError, TypeError):
            raise TransientError("the identity provider answered HTTP 200 with a body that is "
                                 f"not the expected JSON ({content_type(response, secrets)})"
                                 ) from None
        wall_now = time.time()
        expires_in = number(data.get("expires_in"))
        candidates = [t for t in (
            # A lifetime of a second or two, less our slack, is still a short one.
            max(expires_in - CLOCK_SLACK, expires_in / 2)
            if expires_in is not None and expires_in > 0 else None,
            token_lifetime(access, None, wall_now),
        ) if t is not None and t > 0]
        lifetime = min(candidates) if candidates else self.default_token_lifetime
        # Keycloak says 0, or nothing, for offline tokens: unknown, not expired.
        refresh_in = number(data.get("refresh_expires_in"))
        refresh_lifetime = (refresh_in - CLOCK_SLACK if refresh_in is not None and refresh_in > 0
                            else token_lifetime(refresh, None, wall_now) if refresh else None)
        return Grant(
            access_token=access,
            refresh_token=refresh,
            videomanagers=(),
            valid_for=None,
            lifetime=min(lifetime, MAX_LIFETIME),
            refresh_lifetime=refresh_lifetime,
            requested_at=sent,
            id_token=id_token,
        )

    async def userinfo(self, access_token: str) -> dict[str, Any]:
        """The provider's userinfo for `access_token` ({} when it has none to give)."""
        provider = await self.provider()
        if provider.userinfo_endpoint is None:
            return {}
        response = await send(self._http, "GET", provider.userinfo_endpoint,
                              peer="the identity provider", secrets=(access_token,),
                              headers={"Authorization": f"Bearer {access_token}",
                                       "Accept": "application/json"})
        try:
            data = loads(response.content) if response.status_code == 200 else {}
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}

    # -- the API ------------------------------------------------------------------------

    async def videomanagers(self, access_token: str) -> tuple[VideoManagerRef, ...]:
        """The user's VideoManagers: `GET {api_url}` with the token."""
        secrets = (access_token,)
        response = await send(self._http, "GET", self.api_url, secrets=secrets,
                              headers={"Authorization": f"Bearer {access_token}",
                                       "Accept": "application/json"})
        if response.status_code == 401:
            raise TokenRejected("the API rejected the access token when listing "
                                "VideoManagers: " + describe(response, secrets))
        if response.status_code != 200:
            raise TransientError(
                "cannot list the VideoManagers: " + describe(response, secrets),
                retry_after=parse_retry_after(response.headers.get("retry-after"), time.time()))
        try:
            data = loads(response.content)
            if not isinstance(data, list):
                raise TypeError
            check_count(data)
            listed = tuple(parse_videomanager(item) for item in data)
        except (ValueError, TypeError):
            raise TransientError("the API listed VideoManagers in a body that is not the "
                                 f"expected JSON ({content_type(response, secrets)})") from None
        if not listed:
            raise TransientError("the API listed no VideoManagers for this user")
        return listed


def _optional_url(data: dict[str, Any], key: str) -> str | None:
    value = data.get(key)
    return check_url(value, key.replace("_", " ")) if isinstance(value, str) else None


def oauth_error(response: httpx.Response, secrets: tuple[str, ...]) -> tuple[str | None, str]:
    """(error, error_description) of an OAuth error body; (None, "") if it is not one."""
    try:
        data = loads(response.content)
    except ValueError:
        return None, ""
    if not isinstance(data, dict) or not isinstance(data.get("error"), str):
        return None, ""
    error = shorten(scrub(data["error"], secrets), 60)
    text = data.get("error_description")
    return error, scrub(text, secrets) if isinstance(text, str) else ""
