"""The interactive grants: a person logs in, the daemon never sees a password.

    CodeFlow      Authorization Code with PKCE (RFC 7636) for a native app (RFC 8252): the
                  browser is sent to the provider and back to a loopback listener that
                  `vm-token` opened; the daemon keeps `state`, `nonce` and the verifier,
                  checks them, and exchanges the code itself.
    DeviceFlow    the Device Authorization Grant (RFC 8628): the user enters a short code
                  on another device while the daemon polls the token endpoint.

Everything secret — the verifier, the device code, the code — stays in the daemon's memory
and out of every repr and message. An authorization response is taken only with this
login's `state` and, when it names one (RFC 9207), our issuer's `iss`; an ID token only with
our issuer, our client (`aud`, and `azp` when it is there or `aud` has several entries),
this login's nonce.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlencode

import trio

from ..text import quote, shorten
from .base import (
    ClientRejected,
    Grant,
    TransientError,
    UpstreamError,
    describe,
    jwt_claims,
    loads,
    number,
    valid_token,
)
from .oidc import CLIENT_ERRORS, OidcApi, check_url, oauth_error

__all__ = ["CodeFlow", "DeviceFlow", "Identity", "LoginFailed", "identity"]

DEVICE_GRANT: Final = "urn:ietf:params:oauth:grant-type:device_code"
# RFC 8628 3.5: without an interval the client waits 5 s; slow_down adds 5 s.
DEFAULT_INTERVAL: Final = 5.0
SLOW_DOWN: Final = 5.0
# An interval beyond this is taken as this: polling stays responsive. A guess.
MAX_INTERVAL: Final = 60.0
# A device code lives at most this long, whatever the provider says: a code on a screen
# nobody looks at any more should not stay good for logging this daemon in (issue 15).
MAX_DEVICE_LIFETIME: Final = 900.0
# Without expires_in (RFC 8628 says it is required), this: Keycloak's default.
DEFAULT_DEVICE_LIFETIME: Final = 600.0
# How far our clock may be ahead of the provider's when we look at the ID token's exp.
ID_TOKEN_SKEW: Final = 60.0
# The token endpoint's refusals of our client's settings (oidc.py), and of its scope.
REFUSED_CLIENT: Final = CLIENT_ERRORS | {"invalid_scope"}


class LoginFailed(UpstreamError):
    """The interactive login ended without tokens; the message says why, for the user."""


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _refusal(api: OidcApi, response: Any, secrets_: tuple[str, ...], what: str) -> Exception:
    """The exception for a refused exchange of `what` (a code, a device code)."""
    error, text = oauth_error(response, secrets_)
    said = f"{error} ({text})" if text else (error or "")
    if error in REFUSED_CLIENT:
        return ClientRejected(f"the identity provider refused the client "
                              f"{quote(api.client_id)} (oidc_client_id): {said}")
    if error is not None and response.status_code < 500:
        return LoginFailed(f"the identity provider refused {what}: {said}")
    return TransientError(f"the identity provider answered {describe(response, secrets_)}")


@dataclass(frozen=True)
class Identity:
    """Who logged in: the name we show, and every name a profile's `username` may give
    for them (preferred_username, email, sub; compared without case)."""

    name: str
    names: frozenset[str]
    subject: str | None = None

    def is_user(self, username: str) -> bool:
        return username.casefold() in self.names

    async def with_userinfo(self, grant: Grant, api: OidcApi) -> Identity:
        """Also the names the provider's userinfo gives for the same subject: an ID token
        may carry fewer (no email claim without the email scope)."""
        try:
            more = _identity(await api.userinfo(grant.access_token))
        except UpstreamError:
            return self
        if self.subject is None or more.subject != self.subject:  # OIDC Core 5.3.2
            return self
        return Identity(self.name, self.names | more.names, self.subject)


async def identity(grant: Grant, api: OidcApi, nonce: str | None) -> Identity:
    """Who logged in, from the ID token, checked: our issuer, our client, our nonce. A
    device login's answer may carry no ID token: then the provider's userinfo says.

    The ID token came straight from the token endpoint over TLS, so OpenID Connect Core
    3.1.3.7 lets us skip its signature; its claims we do check."""
    claims = jwt_claims(grant.id_token) if grant.id_token else None
    if claims is None:
        if nonce is not None:
            raise LoginFailed("the identity provider sent no ID token: cannot check the "
                              "login's nonce")
        try:
            return _identity(await api.userinfo(grant.access_token))
        except UpstreamError:
            return _identity({})
    issuer = claims.get("iss")
    audience = claims.get("aud")
    audiences = audience if isinstance(audience, list) else [audience]
    if not isinstance(issuer, str) or issuer.rstrip("/") != api.issuer.rstrip("/"):
        raise LoginFailed(f"the ID token was issued by {quote(str(issuer))}, not "
                          f"{quote(api.issuer)}")
    if api.client_id not in audiences:
        raise LoginFailed("the ID token is not for this client (oidc_client_id)")
    # OpenID Connect Core 3.1.3.7, 4 and 5: a token for several audiences must say which
    # of them it was issued to, and that must be us; so must an azp that is there at all.
    authorized = claims.get("azp")
    if len(audiences) > 1 and authorized is None:
        raise LoginFailed("the ID token is for several audiences and does not say which "
                          "client it was issued to (no azp): refusing it")
    if authorized is not None and authorized != api.client_id:
        raise LoginFailed(f"the ID token was issued to the client {quote(str(authorized))} "
                          f"(azp), not {quote(api.client_id)} (oidc_client_id)")
    if nonce is not None and not hmac.compare_digest(str(claims.get("nonce", "")), nonce):
        raise LoginFailed("the ID token does not carry this login's nonce: refusing it")
    expires = number(claims.get("exp"))
    if expires is not None and expires < time.time() - ID_TOKEN_SKEW:
        raise LoginFailed("the ID token has expired")
    return _identity(claims)


def _identity(claims: dict[str, Any]) -> Identity:
    names = [value for key in ("preferred_username", "email", "sub")
             if isinstance(value := claims.get(key), str) and value.strip()]
    shown = shorten("".join(ch for ch in names[0] if ch.isprintable()), 200) if names \
        else "(unknown user)"
    # An address the provider has not verified is whatever the user typed into their
    # profile (Keycloak lets users edit it): it names nobody, so it proves no username.
    proof = [value for key in ("preferred_username", "email", "sub")
             if (key != "email" or claims.get("email_verified") is True)
             and isinstance(value := claims.get(key), str) and value.strip()]
    subject = claims.get("sub")
    return Identity(shown, frozenset(name.casefold() for name in proof),
                    subject if isinstance(subject, str) else None)


@dataclass
class CodeFlow:
    """One browser login: what only the daemon knows, and the URL to send the user to."""

    redirect_uri: str
    url: str
    state: str = field(repr=False)
    nonce: str = field(repr=False)
    verifier: str | None = field(repr=False)  # None: the provider does not do S256
    # The provider's discovery said it names itself in every authorization response
    # (RFC 9207): then an answer without `iss` is not its answer. Read once, at the start.
    iss_required: bool = False

    @classmethod
    async def start(cls, api: OidcApi, redirect_uri: str) -> CodeFlow:
        provider = await api.provider()
        if provider.authorization_endpoint is None:
            raise ClientRejected("the identity provider names no authorization endpoint: "
                                 "no browser login")
        state, nonce = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        params = {"response_type": "code", "client_id": api.client_id,
                  "redirect_uri": redirect_uri, "scope": api.scope, "state": state,
                  "nonce": nonce}
        methods = provider.code_challenge_methods
        verifier = None
        if methods is None or "S256" in methods:  # listed, or the document does not say
            verifier = secrets.token_urlsafe(64)  # 86 characters, RFC 7636: 43 to 128
            params["code_challenge"] = _b64url(hashlib.sha256(verifier.encode()).digest())
            params["code_challenge_method"] = "S256"
        endpoint = provider.authorization_endpoint
        url = endpoint + ("&" if "?" in endpoint else "?") + urlencode(params)
        return cls(redirect_uri, url, state, nonce, verifier,
                   iss_required=provider.iss_parameter_supported)

    def answers(self, state: str) -> bool:
        """Whether a redirect carrying `state` is the answer to this login."""
        return hmac.compare_digest(state.encode(), self.state.encode())

    async def finish(self, api: OidcApi, code: str, state: str, iss: str | None) -> Grant:
        """Exchange `code` if `state` is this flow's and `iss` (RFC 9207) our issuer;
        LoginFailed otherwise."""
        if not self.answers(state):
            raise LoginFailed("the login's state does not match: this is not the answer to "
                              "the login we started (nothing was exchanged)")
        # RFC 9207 2.4. The issuer is compared as everywhere in this daemon (discovery, the
        # ID token): a trailing slash aside, the very string.
        if iss is not None and iss.rstrip("/") != api.issuer.rstrip("/"):
            raise LoginFailed(f"the authorization response comes from the issuer "
                              f"{quote(iss)} (its iss), not {quote(api.issuer)}: refusing it "
                              "(nothing was exchanged)")
        if iss is None and self.iss_required:
            raise LoginFailed("the authorization response names no issuer (iss), which this "
                              "identity provider always does (RFC 9207): refusing it "
                              "(nothing was exchanged)")
        form = {"grant_type": "authorization_code", "code": code,
                "redirect_uri": self.redirect_uri}
        hidden: tuple[str, ...] = (code,)
        if self.verifier is not None:
            form["code_verifier"] = self.verifier
            hidden += (self.verifier,)
        response, sent, hidden = await api.post_token(form, hidden)
        if response.status_code != 200:
            raise _refusal(api, response, hidden, "the authorization code")
        return api.parse_grant(response, sent, hidden)


@dataclass
class DeviceFlow:
    """One device-code login: the code the user types, and the one only we send."""

    user_code: str
    verification_uri: str
    verification_uri_complete: str | None
    expires_at: float  # trio clock
    interval: float
    device_code: str = field(repr=False)

    @classmethod
    async def start(cls, api: OidcApi) -> DeviceFlow:
        provider = await api.provider()
        endpoint = provider.device_authorization_endpoint
        if endpoint is None:
            raise ClientRejected("the identity provider does not offer device login; use "
                                 "`vm-token login --no-browser` instead")
        sent = trio.current_time()
        response = await api.post_form(endpoint, {"scope": api.scope})
        if response.status_code != 200:
            raise _refusal(api, response, (), "a device login")
        try:
            data = loads(response.content)
            if not isinstance(data, dict):
                raise TypeError
            device_code = valid_token(data.get("device_code"))
            user_code = data.get("user_code")
            uri = data.get("verification_uri") or data.get("verification_url")
            complete = data.get("verification_uri_complete")
            if device_code is None or not isinstance(user_code, str) or not user_code \
                    or len(user_code) > 64 or not isinstance(uri, str):
                raise TypeError
        except (ValueError, TypeError):
            raise TransientError("the identity provider's device authorization is not the "
                                 "expected JSON") from None
        expires_in = min(number(data.get("expires_in")) or DEFAULT_DEVICE_LIFETIME,
                         MAX_DEVICE_LIFETIME)
        interval = number(data.get("interval")) or DEFAULT_INTERVAL
        return cls(
            user_code=shorten("".join(ch for ch in user_code if ch.isprintable()), 64),
            verification_uri=check_url(uri, "the verification URI"),
            verification_uri_complete=check_url(complete, "the verification URI")
            if isinstance(complete, str) else None,
            expires_at=sent + max(1.0, expires_in),
            interval=min(max(interval, 1.0), MAX_INTERVAL),
            device_code=device_code,
        )

    async def wait(self, api: OidcApi) -> Grant:
        """Poll until the user approved, denied, or the code expired (RFC 8628 3.5)."""
        while True:
            # Not past the code's end: its expiry is said when it comes, not a poll later.
            await trio.sleep_until(min(trio.current_time() + self.interval, self.expires_at))
            if trio.current_time() >= self.expires_at:
                raise LoginFailed("the device code expired before the login was approved: "
                                  "start again")
            form = {"grant_type": DEVICE_GRANT, "device_code": self.device_code}
            try:
                response, sent, hidden = await api.post_token(form, (self.device_code,))
            except TransientError:
                continue  # keep polling at the interval until the code expires
            if response.status_code == 200:
                return api.parse_grant(response, sent, hidden)
            error, _ = oauth_error(response, hidden)
            if error is None or error == "authorization_pending" \
                    or response.status_code >= 500:
                continue  # not an answer about this code (yet): poll on until it expires
            if error == "slow_down":
                self.interval = min(self.interval + SLOW_DOWN, MAX_INTERVAL)
                continue
            if error == "access_denied":
                raise LoginFailed("the login was denied (access_denied)")
            if error == "expired_token":
                raise LoginFailed("the device code expired before the login was approved "
                                  "(expired_token): start again")
            raise _refusal(api, response, hidden, "the device code")
