"""The interactive grants: a person logs in, the daemon never sees a password.

    CodeFlow      Authorization Code with PKCE (RFC 7636) for a native app (RFC 8252): the
                  browser is sent to the provider and back to a loopback listener that
                  `vm-token` opened; the daemon keeps `state`, `nonce` and the verifier,
                  checks them, and exchanges the code itself.
    DeviceFlow    the Device Authorization Grant (RFC 8628): the user enters a short code
                  on another device while the daemon polls the token endpoint.

Everything secret — the verifier, the device code, the code — stays in the daemon's memory
and out of every repr and message.
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

from .oidc import CLIENT_ERRORS, OidcApi, check_url, oauth_error
from .text import quote, shorten
from .upstream import (
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

__all__ = ["CodeFlow", "DeviceFlow", "LoginFailed", "identity"]

DEVICE_GRANT: Final = "urn:ietf:params:oauth:grant-type:device_code"
# RFC 8628 3.5: without an interval the client waits 5 s; slow_down adds 5 s.
DEFAULT_INTERVAL: Final = 5.0
SLOW_DOWN: Final = 5.0
# An interval beyond this is taken as this: polling stays responsive. A guess.
MAX_INTERVAL: Final = 60.0
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


async def identity(grant: Grant, api: OidcApi, nonce: str | None) -> str:
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
            return _name(await api.userinfo(grant.access_token))
        except UpstreamError:
            return "(unknown user)"
    issuer = claims.get("iss")
    audience = claims.get("aud")
    audiences = audience if isinstance(audience, list) else [audience]
    if not isinstance(issuer, str) or issuer.rstrip("/") != api.issuer.rstrip("/"):
        raise LoginFailed(f"the ID token was issued by {quote(str(issuer))}, not "
                          f"{quote(api.issuer)}")
    if api.client_id not in audiences:
        raise LoginFailed("the ID token is not for this client (oidc_client_id)")
    if nonce is not None and not hmac.compare_digest(str(claims.get("nonce", "")), nonce):
        raise LoginFailed("the ID token does not carry this login's nonce: refusing it")
    expires = number(claims.get("exp"))
    if expires is not None and expires < time.time() - ID_TOKEN_SKEW:
        raise LoginFailed("the ID token has expired")
    return _name(claims)


def _name(claims: dict[str, Any]) -> str:
    for key in ("preferred_username", "email", "sub"):
        value = claims.get(key)
        if isinstance(value, str) and value.strip():
            return shorten("".join(ch for ch in value if ch.isprintable()), 200)
    return "(unknown user)"


@dataclass
class CodeFlow:
    """One browser login: what only the daemon knows, and the URL to send the user to."""

    redirect_uri: str
    url: str
    state: str = field(repr=False)
    nonce: str = field(repr=False)
    verifier: str | None = field(repr=False)  # None: the provider does not do S256

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
        return cls(redirect_uri, url, state, nonce, verifier)

    async def finish(self, api: OidcApi, code: str, state: str) -> Grant:
        """Exchange `code` if `state` is this flow's; LoginFailed otherwise."""
        if not hmac.compare_digest(state.encode(), self.state.encode()):
            raise LoginFailed("the login's state does not match: this is not the answer to "
                              "the login we started (nothing was exchanged)")
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
        expires_in = number(data.get("expires_in")) or 600.0
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
            await trio.sleep(self.interval)
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
