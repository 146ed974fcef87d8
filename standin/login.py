"""The stand-in's interactive logins: authorization code + PKCE, device code (package-private).

    GET  {issuer}/protocol/openid-connect/auth          checks the request, shows a login form
    POST {issuer}/protocol/openid-connect/auth          the form: "Log in" redirects with code
                                                         and state, "Deny" with access_denied
    POST {issuer}/protocol/openid-connect/auth/device   RFC 8628 device authorization
    GET  {issuer}/device[?user_code=…]                   the page where a user enters the code,
    POST {issuer}/device                                 logs in, and approves or denies

The token endpoint (`oidc`) hands the authorization_code and device_code grants here.
`StandIn` composes the two: this module builds on `oidc`, never the other way round.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from standin.jose import b64url
from standin.oidc import (
    AUTH_PATH,
    DEVICE_AUTH_PATH,
    DEVICE_GRANT,
    DEVICE_PAGE_PATH,
    KeycloakSession,
    OAuthError,
    OidcClient,
    OidcProvider,
    Response,
    parse_form,
)

# How long a login form stays usable (Keycloak's "Login timeout" is 30 minutes).
LOGIN_REQUEST_LIFETIME = 1800
# RFC 8628 6.1: 8 characters of 20 consonants, shown as XXXX-XXXX.
USER_CODE_ALPHABET = "BCDFGHJKLMNPQRSTVWXZ"
_PKCE_VERIFIER = re.compile(r"[A-Za-z0-9\-._~]{43,128}")
_PKCE_CHALLENGE = re.compile(r"[A-Za-z0-9\-_]{43}")


@dataclass
class LoginRequest:
    client_id: str
    redirect_uri: str
    state: str | None
    nonce: str | None
    challenge: str | None
    scope: str
    expires: float


@dataclass
class Code:
    client_id: str
    redirect_uri: str
    challenge: str | None
    session: KeycloakSession
    expires: float
    used: bool = False


@dataclass
class DeviceRequest:
    client_id: str
    scope: str
    user_code: str
    expires: float
    interval: float
    last_poll: float | None = None
    status: str = "pending"  # → approved / denied; done once answered for good
    session: KeycloakSession | None = None
    done: bool = False


class _Redirect(Exception):
    """An authorization error sent back to the client's redirect URI (RFC 6749 4.1.2.1)."""

    def __init__(self, error: str, description: str) -> None:
        super().__init__(error)
        self.error, self.description = error, description


def _html(status: int, title: str, body: str) -> Response:
    page = (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}"
            f"</title></head><body><h1>{html.escape(title)}</h1>{body}</body></html>")
    return status, {"Content-Type": "text/html; charset=utf-8",
                    "Cache-Control": "no-store"}, page.encode()


def _redirect(uri: str, params: dict[str, str | None]) -> Response:
    query = urlencode({k: v for k, v in params.items() if v is not None})
    return 302, {"Location": f"{uri}{'&' if urlsplit(uri).query else '?'}{query}",
                 "Cache-Control": "no-store"}, b""


def _single(query: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(query, keep_blank_values=True).items()}


def _user_code() -> str:
    code = "".join(secrets.choice(USER_CODE_ALPHABET) for _ in range(8))
    return f"{code[:4]}-{code[4:]}"


def _normal_user_code(text: str) -> str:
    return "".join(c for c in text.upper() if c.isalnum())


class InteractiveGrants:
    """Login requests, authorization codes and device codes of one realm."""

    def __init__(self, provider: OidcProvider) -> None:
        self.provider = provider
        self.standin = provider.standin
        self._requests: dict[str, LoginRequest] = {}
        self._codes: dict[str, Code] = {}
        self._devices: dict[str, DeviceRequest] = {}  # by device_code

    def handle(self, method: str, path: str, query: str, headers: dict[str, str],
               body: bytes) -> Response | None:
        if path == DEVICE_AUTH_PATH and method == "POST":
            fault = self.standin._begin("device_authorization")
            if fault is not None:
                return fault
            try:
                answer = self._device_authorization(headers, parse_form(body))
            except OAuthError as error:
                return error.response()
            return self.standin._answer("device_authorization", answer, "application/json",
                                        {"Cache-Control": "no-store"})
        if path not in (AUTH_PATH, DEVICE_PAGE_PATH) or method not in ("GET", "POST"):
            return None
        endpoint = "authorize" if path == AUTH_PATH else "verification"
        fault = self.standin._begin(endpoint)
        if fault is not None:
            return fault
        try:
            form = parse_form(body) if method == "POST" else {}
        except OAuthError:
            return _html(400, "Bad request", "<p>The form could not be read.</p>")
        if path == AUTH_PATH:
            if method == "GET":
                return self._authorize(_single(query))
            return self._login_form_posted(form)
        return self._device_page(_single(query) if method == "GET" else form, method == "POST")

    # -- authorization code ---------------------------------------------------------------

    def _redirect_allowed(self, client: OidcClient, uri: str) -> bool:
        if uri in client.redirect_uris:
            return True
        if not client.loopback_redirects:
            return False
        parts = urlsplit(uri)
        try:
            port = parts.port
        except ValueError:
            return False
        return (parts.scheme == "http" and parts.hostname in ("127.0.0.1", "::1")
                and port is not None and not parts.fragment and not parts.username)

    def _authorize(self, params: dict[str, str]) -> Response:
        client = self.provider.clients.get(params.get("client_id", ""))
        if client is None:
            return _html(400, "We are sorry...", "<p>Client not found.</p>")
        redirect_uri = params.get("redirect_uri", "")
        if not self._redirect_allowed(client, redirect_uri):
            return _html(400, "We are sorry...", "<p>Invalid parameter: redirect_uri</p>")
        state = params.get("state")
        try:
            if params.get("response_type") != "code":
                raise _Redirect("unsupported_response_type", "Unsupported response_type")
            if "authorization_code" not in client.grants:
                raise _Redirect("unauthorized_client", "Client is not allowed the code flow")
            challenge = params.get("code_challenge")
            method = params.get("code_challenge_method")
            if challenge is None and method is None and client.pkce_required:
                raise _Redirect("invalid_request", "Missing parameter: code_challenge_method")
            if challenge is not None or method is not None:
                if method != "S256":
                    raise _Redirect("invalid_request", "Invalid parameter: code challenge "
                                    "method is not matching the configured one")
                if challenge is None or not _PKCE_CHALLENGE.fullmatch(challenge):
                    raise _Redirect("invalid_request", "Invalid parameter: code_challenge")
            try:
                scope = self.provider.granted_scope(params.get("scope"))
            except OAuthError as exc:
                raise _Redirect(exc.error, exc.description) from exc
        except _Redirect as error:
            return _redirect(redirect_uri, {"error": error.error,
                                            "error_description": error.description,
                                            "state": state, "iss": self.provider.issuer})
        request_id = secrets.token_urlsafe(24)
        with self.standin._lock:
            self._requests[request_id] = LoginRequest(
                client.client_id, redirect_uri, state, params.get("nonce"), challenge, scope,
                time.monotonic() + LOGIN_REQUEST_LIFETIME)
        return self._login_page(request_id, client.client_id)

    def _login_page(self, request_id: str, client_id: str, error: str | None = None) -> Response:
        return _html(200, "Sign in to VideoManager Pro", (
            (f'<p id="error" class="error">{html.escape(error)}</p>' if error else "")
            + f"<p>Client <code>{html.escape(client_id)}</code> asks to sign you in.</p>"
            f'<form id="kc-form-login" method="post" action="{AUTH_PATH}">'
            f'<input type="hidden" name="login_request" value="{html.escape(request_id)}">'
            '<label for="username">Username</label> '
            '<input id="username" name="username" type="text" autofocus><br>'
            '<label for="password">Password</label> '
            '<input id="password" name="password" type="password"><br>'
            '<button id="kc-login" type="submit" name="action" value="login">Log in</button> '
            '<button id="kc-deny" type="submit" name="action" value="deny">Deny</button>'
            "</form>"))

    def _credentials_ok(self, form: dict[str, str]) -> bool:
        return (hmac.compare_digest(form.get("username", "").encode(),
                                    self.standin.username.encode())
                and hmac.compare_digest(form.get("password", "").encode(),
                                        self.standin.password.encode()))

    def _login_form_posted(self, form: dict[str, str]) -> Response:
        request_id = form.get("login_request", "")
        with self.standin._lock:
            request = self._requests.get(request_id)
            if request is not None and request.expires <= time.monotonic():
                del self._requests[request_id]
                request = None
        if request is None:
            return _html(400, "We are sorry...",
                         "<p>Your login attempt timed out. Login will start from the "
                         "beginning.</p>")
        if form.get("action") == "deny":
            with self.standin._lock:
                self._requests.pop(request_id, None)
                self.standin.counts["authorize_denied"] += 1
            return _redirect(request.redirect_uri, {
                "error": "access_denied", "error_description": "The user denied the request",
                "state": request.state, "iss": self.provider.issuer})
        if not self._credentials_ok(form):
            self.standin._count("authorize_failed")
            return self._login_page(request_id, request.client_id,
                                    "Invalid username or password.")
        with self.standin._lock:
            if self._requests.pop(request_id, None) is None:
                return _html(400, "We are sorry...", "<p>This login was already used.</p>")
        session = self.provider.new_session(request.client_id, request.scope, request.nonce)
        code = secrets.token_urlsafe(32)
        with self.standin._lock:
            self._codes[code] = Code(request.client_id, request.redirect_uri, request.challenge,
                                     session, time.monotonic() + self.standin.code_lifetime)
            self.standin.counts["authorize_ok"] += 1
        return _redirect(request.redirect_uri, {
            "state": request.state, "session_state": session.sid, "iss": self.provider.issuer,
            "code": code})

    def code_grant(self, client: OidcClient, form: dict[str, str]) -> dict[str, Any]:
        code = form.get("code")
        if not code:
            raise OAuthError(400, "invalid_request", "Missing parameter: code")
        with self.standin._lock:
            record = self._codes.get(code)
            replayed = record is not None and record.used
            if record is not None:
                record.used = True
                if replayed:
                    self.standin.counts["code_replayed"] += 1
        if record is None:
            raise OAuthError(400, "invalid_grant", "Code not valid")
        if replayed:  # RFC 6749 4.1.2: revoke what the code gave
            self.provider.end_sessions(record.session.sid)
            raise OAuthError(400, "invalid_grant", "Code not valid")
        if record.expires <= time.monotonic():
            raise OAuthError(400, "invalid_grant", "Code is expired")
        if record.client_id != client.client_id:
            raise OAuthError(400, "invalid_grant", "Auth error")
        if form.get("redirect_uri") != record.redirect_uri:
            raise OAuthError(400, "invalid_grant", "Incorrect redirect_uri")
        if record.challenge is not None:
            verifier = form.get("code_verifier")
            if not verifier:
                raise OAuthError(400, "invalid_grant", "PKCE code verifier not specified")
            if not _PKCE_VERIFIER.fullmatch(verifier):
                raise OAuthError(400, "invalid_grant", "PKCE verification failed: Invalid "
                                 "code verifier")
            if b64url(hashlib.sha256(verifier.encode()).digest()) != record.challenge:
                raise OAuthError(400, "invalid_grant", "PKCE verification failed: Code "
                                 "mismatch")
        if not record.session.active:
            raise OAuthError(400, "invalid_grant", "Session not active")
        return self.provider.tokens(record.session, client)

    # -- device code ----------------------------------------------------------------------

    def _device_authorization(self, headers: dict[str, str],
                              form: dict[str, str]) -> dict[str, Any]:
        client = self.provider.authenticate_client(headers, form)
        if DEVICE_GRANT not in client.grants:
            raise OAuthError(400, "unauthorized_client",
                             "Client is not allowed to initiate OAuth 2.0 Device Authorization "
                             "Grant. The flow is disabled for the client.")
        scope = self.provider.granted_scope(form.get("scope"))
        device_code = secrets.token_urlsafe(32)
        user_code = _user_code()
        lifetime = self.standin.device_code_lifetime
        interval = self.standin.device_interval
        with self.standin._lock:
            self._devices[device_code] = DeviceRequest(
                client.client_id, scope, user_code, time.monotonic() + lifetime, interval)
            self.standin.counts["device_authorization_ok"] += 1
        verification_uri = self.provider.origin + DEVICE_PAGE_PATH
        complete = f"{verification_uri}?{urlencode({'user_code': user_code})}"
        return {"device_code": device_code, "user_code": user_code,
                "verification_uri": verification_uri, "verification_uri_complete": complete,
                "expires_in": lifetime, "interval": interval}

    def _device_by_user_code(self, user_code: str) -> DeviceRequest | None:
        wanted = _normal_user_code(user_code)
        now = time.monotonic()
        with self.standin._lock:
            for device in self._devices.values():
                if (_normal_user_code(device.user_code) == wanted and device.status == "pending"
                        and device.expires > now):
                    return device
        return None

    def decide_device(self, user_code: str, *, approve: bool = True) -> bool:
        """Approve (as the stand-in's user) or deny a pending device login; False if none."""
        device = self._device_by_user_code(user_code)
        if device is None:
            return False
        session = (self.provider.new_session(device.client_id, device.scope) if approve
                   else None)
        with self.standin._lock:
            if device.status != "pending":
                return False
            device.status, device.session = ("approved" if approve else "denied"), session
            self.standin.counts["device_approved" if approve else "device_denied"] += 1
        return True

    def _device_page(self, params: dict[str, str], posted: bool) -> Response:
        user_code = params.get("user_code", "")
        error = None
        if posted:
            action = params.get("action")
            if self._device_by_user_code(user_code) is None:
                error = "Invalid code, please try again."
            elif action == "deny":
                self.decide_device(user_code, approve=False)
                return _html(200, "Access denied",
                             '<p id="result">You denied the device. You can close this '
                             "page.</p>")
            elif not self._credentials_ok(params):
                self.standin._count("verification_failed")
                error = "Invalid username or password."
            elif self.decide_device(user_code, approve=True):
                return _html(200, "Device login successful",
                             '<p id="result">You can return to your device.</p>')
            else:
                error = "Invalid code, please try again."
        return _html(200, "Sign in a device to VideoManager Pro", (
            (f'<p id="error" class="error">{html.escape(error)}</p>' if error else "")
            + f'<form id="kc-device-form" method="post" action="{DEVICE_PAGE_PATH}">'
            '<label for="user_code">Code shown on your device</label> '
            f'<input id="user_code" name="user_code" type="text" '
            f'value="{html.escape(user_code)}"><br>'
            '<label for="username">Username</label> '
            '<input id="username" name="username" type="text"><br>'
            '<label for="password">Password</label> '
            '<input id="password" name="password" type="password"><br>'
            '<button id="kc-login" type="submit" name="action" value="login">Log in</button> '
            '<button id="kc-deny" type="submit" name="action" value="deny">Deny</button>'
            "</form>"))

    def device_grant(self, client: OidcClient, form: dict[str, str]) -> dict[str, Any]:
        device_code = form.get("device_code")
        if not device_code:
            raise OAuthError(400, "invalid_request", "Missing parameter: device_code")
        now = time.monotonic()
        with self.standin._lock:
            device = self._devices.get(device_code)
            if device is None or device.done or device.client_id != client.client_id:
                raise OAuthError(400, "invalid_grant", "Device code not valid")
            if device.expires <= now:
                device.done = True
                raise OAuthError(400, "expired_token", "Device code is expired")
            too_fast = device.last_poll is not None and now - device.last_poll < device.interval
            device.last_poll = now
            if too_fast:  # RFC 8628 3.5: and the interval grows for every later request
                device.interval += self.standin.slow_down_increment
                self.standin.counts["device_slow_down"] += 1
                raise OAuthError(400, "slow_down", "Slow down")
            if device.status == "pending":
                raise OAuthError(400, "authorization_pending",
                                 "The authorization request is still pending")
            device.done = True
            session = device.session
        if session is None:
            raise OAuthError(400, "access_denied", "The end user denied the authorization request")
        if not session.active:
            raise OAuthError(400, "invalid_grant", "Session not active")
        return self.provider.tokens(session, client)
