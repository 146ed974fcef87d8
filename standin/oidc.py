"""The stand-in's OpenID Connect side, shaped like the vendor's Keycloak (package-private).

WebFinger, the discovery document, the JWK Set, userinfo and the token endpoint with the
password and refresh grants, Keycloak's sessions and its refresh-token reuse detection. The
interactive grants (authorization code, device code) live in `login`, which builds on this
module: `StandIn` (server.py) hands them to the provider as its `interactive` part. Everything
public is reached through `StandIn`; this module holds the realm's state and rules.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qs, unquote_plus

from standin.jose import RsaKey, b64url, decode_jwt, encode_jwt

if TYPE_CHECKING:
    from standin.server import StandIn

Response = tuple[int, dict[str, str], bytes]

REALM = "platform"
REALM_PATH = f"/auth/realms/{REALM}"
OIDC_PATH = f"{REALM_PATH}/protocol/openid-connect"
WEBFINGER_PATH = "/.well-known/webfinger"
DISCOVERY_PATH = f"{REALM_PATH}/.well-known/openid-configuration"
TOKEN_PATH = f"{OIDC_PATH}/token"
AUTH_PATH = f"{OIDC_PATH}/auth"
DEVICE_AUTH_PATH = f"{OIDC_PATH}/auth/device"
DEVICE_PAGE_PATH = f"{REALM_PATH}/device"
JWKS_PATH = f"{OIDC_PATH}/certs"
USERINFO_PATH = f"{OIDC_PATH}/userinfo"
ISSUER_REL = "http://openid.net/specs/connect/1.0/issuer"
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
ALL_GRANTS = frozenset({"password", "refresh_token", "authorization_code", DEVICE_GRANT})
SCOPES = ("openid", "profile", "email", "offline_access")
# Scopes Keycloak adds to every token as the realm's defaults.
DEFAULT_SCOPES = ("profile", "email")
CACHE_CONTROL = "max-age=300"  # what the stand-in tells clients to cache WebFinger/discovery
# Counter and fault names of the token endpoint's grants.
GRANT_NAMES = {"password": "oidc_login", "refresh_token": "oidc_refresh",
               "authorization_code": "oidc_code", DEVICE_GRANT: "oidc_device"}


@dataclass(frozen=True)
class OidcClient:
    """A client registered in the stand-in's realm.

    `secret` set: a confidential client, authenticated with HTTP Basic (client_secret_basic,
    RFC 6749 2.3.1) or form fields (client_secret_post). `redirect_uris` are matched
    exactly; `loopback_redirects` also accepts http://127.0.0.1 or http://[::1] with any
    port and path (RFC 8252 7.3).
    """

    client_id: str = "anonymous"
    secret: str | None = None
    grants: frozenset[str] = ALL_GRANTS
    redirect_uris: tuple[str, ...] = ()
    loopback_redirects: bool = True
    pkce_required: bool = False


@dataclass
class KeycloakSession:
    """One login (Keycloak's user session): every token of it ends with it."""

    sid: str
    client_id: str
    scope: str
    offline: bool
    nonce: str | None = None
    auth_time: int = field(default_factory=lambda: int(time.time()))
    active: bool = True


class OAuthError(Exception):
    """An error answer of the token endpoint, as Keycloak sends it."""

    def __init__(self, status: int, error: str, description: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(error)
        self.status, self.error, self.description = status, error, description
        self.headers = headers or {}

    def response(self) -> Response:
        status, headers, body = json_response(
            self.status, {"error": self.error, "error_description": self.description})
        return status, {**headers, **self.headers}, body


def json_response(status: int, data: Any, content_type: str = "application/json",
                  headers: dict[str, str] | None = None) -> Response:
    return status, {"Content-Type": content_type, **(headers or {})}, json.dumps(data).encode()


def parse_form(body: bytes) -> dict[str, str]:
    """A form body as single values; a repeated parameter is an error (RFC 6749 3.2)."""
    try:
        pairs = parse_qs(body.decode("utf-8"), keep_blank_values=True)
    except (UnicodeDecodeError, ValueError) as exc:
        raise OAuthError(400, "invalid_request", "Malformed form body") from exc
    repeated = sorted(name for name, values in pairs.items() if len(values) > 1)
    if repeated:
        raise OAuthError(400, "invalid_request", f"Duplicated parameter: {repeated[0]}")
    return {name: values[0] for name, values in pairs.items()}


class InteractiveGrantHandler(Protocol):
    """The interactive half of the realm (`login.InteractiveGrants`): its pages and endpoints,
    and the two grants the token endpoint hands it."""

    def handle(self, method: str, path: str, query: str, headers: dict[str, str],
               body: bytes) -> Response | None: ...

    def code_grant(self, client: OidcClient, form: dict[str, str]) -> dict[str, Any]: ...

    def device_grant(self, client: OidcClient, form: dict[str, str]) -> dict[str, Any]: ...


class OidcProvider:
    """The realm: keys, clients, sessions, and the non-interactive endpoints; the interactive
    ones are its `interactive` part, set by whoever composes the two (StandIn)."""

    def __init__(self, standin: StandIn, clients: tuple[OidcClient, ...]) -> None:
        self.standin = standin
        self.clients = {client.client_id: client for client in clients}
        self.subject = str(uuid.uuid5(uuid.NAMESPACE_URL, f"vm-token-standin:{standin.username}"))
        self.token_path = TOKEN_PATH
        self.moved_token_paths: set[str] = set()
        self.sessions: dict[str, KeycloakSession] = {}
        self._used_refresh: set[str] = set()  # jti, with rotation
        self._hmac_key = secrets.token_bytes(32)  # refresh tokens: HS256, as Keycloak's
        self._rsa: RsaKey | None = None
        self._rsa_lock = threading.Lock()
        self.interactive: InteractiveGrantHandler | None = None

    # -- addresses ------------------------------------------------------------------------

    @property
    def origin(self) -> str:
        return self.standin.origin

    @property
    def issuer(self) -> str:
        return self.origin + REALM_PATH

    @property
    def advertised_issuer(self) -> str:
        return self.standin.issuer_override or self.issuer

    # -- keys -----------------------------------------------------------------------------

    @property
    def rsa(self) -> RsaKey:
        """The realm's signing key, made when first needed (legacy-only tests never pay)."""
        with self._rsa_lock:
            if self._rsa is None:
                self._rsa = RsaKey.generate()
            return self._rsa

    def access_claims(self, token: str) -> dict[str, Any] | None:
        """The claims of a live OIDC access token of this realm, else None."""
        if self._rsa is None:
            return None  # no key yet: no OIDC token was ever issued
        claims = decode_jwt(token, rsa=self._rsa)
        if claims is None or claims.get("typ") != "Bearer" or claims.get("iss") != self.issuer:
            return None
        return claims if self._live(claims) else None

    def _live(self, claims: dict[str, Any]) -> bool:
        exp = claims.get("exp")
        with self.standin._lock:
            session = self.sessions.get(str(claims.get("sid")))
            return (claims.get("jti") not in self.standin._revoked
                    and session is not None and session.active
                    and (exp is None or (isinstance(exp, int) and exp > time.time())))

    # -- sessions -------------------------------------------------------------------------

    def new_session(self, client_id: str, scope: str, nonce: str | None = None) -> KeycloakSession:
        session = KeycloakSession(str(uuid.uuid4()), client_id, scope,
                          offline="offline_access" in scope.split()
                          or self.standin.refresh_expires_mode == "zero", nonce=nonce)
        with self.standin._lock:
            self.sessions[session.sid] = session
            self.standin.counts["sessions"] += 1
        return session

    def end_sessions(self, sid: str | None = None) -> int:
        with self.standin._lock:
            ended = [s for s in self.sessions.values()
                     if s.active and (sid is None or s.sid == sid)]
            for session in ended:
                session.active = False
            self.standin.counts["sessions_ended"] += len(ended)
        return len(ended)

    def tokens(self, session: KeycloakSession, client: OidcClient) -> dict[str, Any]:
        """A token answer for `session`, as Keycloak's."""
        standin = self.standin
        # The realm's RSA key is made on first use, in pure Python: seconds on a loaded
        # machine. Made before the clock is read, or the first tokens are issued already
        # partly (with 3-second tokens, wholly) expired.
        key = self.rsa
        now = int(time.time())
        common = {"iat": now, "auth_time": session.auth_time, "iss": self.issuer,
                  "sub": self.subject, "azp": client.client_id, "sid": session.sid,
                  "session_state": session.sid}
        access_jti, refresh_jti = str(uuid.uuid4()), str(uuid.uuid4())
        access = encode_jwt({**common, "exp": now + standin.access_lifetime, "jti": access_jti,
                             "typ": "Bearer", "aud": "account", "scope": session.scope,
                             "preferred_username": standin.username}, rsa=key)
        refresh_claims: dict[str, Any] = {
            **common, "jti": refresh_jti, "aud": self.issuer, "scope": session.scope,
            "typ": "Offline" if session.offline else "Refresh"}
        if not session.offline:
            refresh_claims["exp"] = now + standin.refresh_lifetime
        refresh = encode_jwt(refresh_claims, hmac_key=self._hmac_key)
        answer: dict[str, Any] = {
            "access_token": access, "expires_in": standin.access_lifetime,
            "refresh_expires_in": 0 if session.offline else standin.refresh_lifetime,
            "refresh_token": refresh, "token_type": "Bearer",
        }
        if standin.refresh_expires_mode == "absent":
            del answer["refresh_expires_in"]
        issued = [access, refresh]
        if "openid" in session.scope.split():
            id_claims = {**common, "exp": now + standin.access_lifetime,
                         "jti": str(uuid.uuid4()), "typ": "ID", "aud": client.client_id,
                         "at_hash": b64url(hashlib.sha256(access.encode()).digest()[:16]),
                         "preferred_username": standin.username}
            if session.nonce is not None:
                id_claims["nonce"] = session.nonce
            answer["id_token"] = encode_jwt(id_claims, rsa=key)
            issued.append(answer["id_token"])
        answer.update({"not-before-policy": 0, "session_state": session.sid,
                       "scope": session.scope})
        with standin._lock:
            standin._access_jtis.add(access_jti)
            standin._refresh_jtis.add(refresh_jti)
            standin.issued.extend(issued)
        return answer

    def granted_scope(self, requested: str | None) -> str:
        asked = (requested or "").split()
        unknown = [s for s in asked if s not in SCOPES]
        if unknown:
            raise OAuthError(400, "invalid_scope", f"Invalid scopes: {' '.join(asked)}")
        return " ".join(dict.fromkeys([*asked, *DEFAULT_SCOPES]))

    # -- routing --------------------------------------------------------------------------

    def handle(self, method: str, path: str, query: str, headers: dict[str, str],
               body: bytes) -> Response | None:
        if path == WEBFINGER_PATH and method == "GET":
            return self._webfinger(query)
        if path == DISCOVERY_PATH and method == "GET":
            return self._document("discovery", self.discovery_document, CACHE_CONTROL)
        if path == JWKS_PATH and method == "GET":
            return self._document("jwks", lambda: {"keys": [self.rsa.jwk()]}, None)
        if path == self.token_path and method == "POST":
            return self._token(headers, body)
        if path in self.moved_token_paths:
            with self.standin._lock:
                self.standin.counts["token_gone"] += 1
            return json_response(404, {"error": "RESTEASY003210: Could not find resource"})
        if path == USERINFO_PATH and method in ("GET", "POST"):
            return self._userinfo(headers)
        if self.interactive is None:
            return None
        return self.interactive.handle(method, path, query, headers, body)

    def _document(self, endpoint: str, make: Callable[[], dict[str, Any]],
                  cache_control: str | None) -> Response:
        fault = self.standin._begin(endpoint)
        if fault is not None:
            return fault
        extra = {"Cache-Control": cache_control} if cache_control else {}
        return self.standin._answer(endpoint, make(), "application/json", extra)

    # -- WebFinger and discovery ----------------------------------------------------------

    def _webfinger(self, query: str) -> Response:
        fault = self.standin._begin("webfinger")
        if fault is not None:
            return fault
        params = parse_qs(query, keep_blank_values=True)
        resource = params.get("resource", [])
        jrd = "application/jrd+json"
        if len(resource) != 1:
            return json_response(400, {"error": "exactly one resource parameter is required"},
                                 jrd)
        if resource[0] != self.standin.api_root:
            return json_response(404, {"error": f"no such resource: {resource[0]}"}, jrd)
        href = (self.advertised_issuer if self.standin.webfinger_href == "issuer"
                else self.origin + DISCOVERY_PATH)
        links = [{"rel": ISSUER_REL, "href": href}]
        rels = params.get("rel")
        if rels:  # RFC 7033 4.3: only the link relations asked for
            links = [link for link in links if link["rel"] in rels]
        root = self.standin.api_root
        answer = {"subject": root,
                  "properties": {f"{root}keycloak/realm": REALM,
                                 f"{root}keycloak/auth-server-url": f"{self.origin}/auth/"},
                  "links": links}
        return self.standin._answer("webfinger", answer, jrd, {"Cache-Control": CACHE_CONTROL})

    def discovery_document(self) -> dict[str, Any]:
        issuer = self.issuer  # where the endpoints are, whatever the document claims
        return {
            "issuer": self.advertised_issuer,
            "authorization_endpoint": self.origin + AUTH_PATH,
            "token_endpoint": self.origin + self.token_path,
            "device_authorization_endpoint": self.origin + DEVICE_AUTH_PATH,
            "jwks_uri": self.origin + JWKS_PATH,
            "userinfo_endpoint": self.origin + USERINFO_PATH,
            "grant_types_supported": sorted(ALL_GRANTS),
            "response_types_supported": ["code"],
            "response_modes_supported": ["query"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "code_challenge_methods_supported": ["S256"],
            # RFC 9207, as Keycloak: every authorization response names its issuer.
            "authorization_response_iss_parameter_supported": True,
            "scopes_supported": list(SCOPES),
            "token_endpoint_auth_methods_supported": ["client_secret_basic",
                                                      "client_secret_post"],
            "claims_supported": ["iss", "sub", "aud", "exp", "iat", "auth_time", "nonce",
                                 "sid", "preferred_username"],
            "check_session_iframe": f"{issuer}/protocol/openid-connect/login-status-iframe.html",
        }

    def move_token_endpoint(self) -> str:
        with self.standin._lock:
            self.moved_token_paths.add(self.token_path)
            self.token_path = f"{OIDC_PATH}/token-v{len(self.moved_token_paths) + 1}"
            return self.origin + self.token_path

    # -- userinfo -------------------------------------------------------------------------

    def _userinfo(self, headers: dict[str, str]) -> Response:
        self.standin._count("userinfo")
        auth = headers.get("authorization", "")
        claims = self.access_claims(auth[7:]) if auth[:7].lower() == "bearer " else None
        if claims is None:
            return json_response(401, {"error": "invalid_token",
                                       "error_description": "Token verification failed"},
                                 headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
        return json_response(200, {"sub": self.subject,
                                   "preferred_username": self.standin.username})

    # -- the token endpoint ---------------------------------------------------------------

    def authenticate_client(self, headers: dict[str, str], form: dict[str, str]) -> OidcClient:
        """The client of a request (RFC 6749 2.3.1), or OAuthError as Keycloak answers."""
        auth = headers.get("authorization", "")
        secret: str | None
        if auth[:6].lower() == "basic ":
            try:
                decoded = base64.b64decode(auth[6:].strip(), validate=True).decode("utf-8")
                raw_id, raw_secret = decoded.split(":", 1)
            except ValueError as exc:  # binascii.Error, UnicodeDecodeError, unpacking
                raise self._bad_client(basic=True) from exc
            client_id, secret, method = unquote_plus(raw_id), unquote_plus(raw_secret), "basic"
            if form.get("client_id", client_id) != client_id:
                raise OAuthError(400, "invalid_request", "Client ids do not match")
        else:
            client_id, secret, method = form.get("client_id", ""), form.get("client_secret"), "post"
        client = self.clients.get(client_id)
        if client is None:
            raise self._bad_client(basic=method == "basic")
        if client.secret is not None:
            if secret is None or not hmac.compare_digest(secret.encode(), client.secret.encode()):
                raise self._bad_client(basic=method == "basic")
            self.standin._count(f"client_secret_{method}")
        return client

    def _bad_client(self, *, basic: bool) -> OAuthError:
        headers = {"WWW-Authenticate": f'Basic realm="{REALM}"'} if basic else None
        return OAuthError(401, "invalid_client", "Invalid client or Invalid client credentials",
                          headers)

    def _token(self, headers: dict[str, str], body: bytes) -> Response:
        try:
            form: dict[str, str] | None = parse_form(body)
        except OAuthError:
            form = None
        grant = (form or {}).get("grant_type", "")
        name = GRANT_NAMES.get(grant)
        fault = self.standin._begin("token", name)
        if fault is not None:
            return fault
        try:
            if form is None:
                form = parse_form(body)  # raises the error again
            if "x-www-form-urlencoded" not in headers.get("content-type", ""):
                raise OAuthError(400, "invalid_request", "Expected a form-encoded body")
            client = self.authenticate_client(headers, form)
            if name is None:
                raise OAuthError(400, "unsupported_grant_type", "Unsupported grant_type")
            if grant not in client.grants:
                raise OAuthError(400, "unauthorized_client",
                                 f"Client not allowed the {grant} grant")
            if grant == "password":
                answer = self._password_grant(client, form)
            elif grant == "refresh_token":
                answer = self._refresh_grant(client, form)
            elif self.interactive is None:
                raise OAuthError(400, "unsupported_grant_type", "Unsupported grant_type")
            elif grant == "authorization_code":
                answer = self.interactive.code_grant(client, form)
            else:
                answer = self.interactive.device_grant(client, form)
        except OAuthError as error:
            return error.response()
        self.standin._count(f"{name}_ok")
        return self.standin._answer(name, answer, "application/json",
                                    {"Cache-Control": "no-store", "Pragma": "no-cache"})

    def _password_grant(self, client: OidcClient, form: dict[str, str]) -> dict[str, Any]:
        standin = self.standin
        if not (hmac.compare_digest(form.get("username", "").encode(), standin.username.encode())
                and hmac.compare_digest(form.get("password", "").encode(),
                                        standin.password.encode())):
            raise OAuthError(401, "invalid_grant", "Invalid user credentials")
        session = self.new_session(client.client_id, self.granted_scope(form.get("scope")))
        return self.tokens(session, client)

    def _refresh_grant(self, client: OidcClient, form: dict[str, str]) -> dict[str, Any]:
        token = form.get("refresh_token")
        if not token:
            raise OAuthError(400, "invalid_request", "Missing parameter: refresh_token")
        claims = decode_jwt(token, hmac_key=self._hmac_key)
        if claims is None or claims.get("typ") not in ("Refresh", "Offline"):
            raise OAuthError(400, "invalid_grant", "Invalid refresh token")
        if claims.get("azp") != client.client_id:
            raise OAuthError(400, "invalid_grant", "Unmatching clients")
        standin = self.standin
        with standin._lock:
            session = self.sessions.get(str(claims.get("sid")))
            if session is None or not session.active:
                raise OAuthError(400, "invalid_grant", "Session not active")
            exp = claims.get("exp")
            if claims.get("jti") in standin._revoked or (exp is not None and exp <= time.time()):
                raise OAuthError(400, "invalid_grant", "Token is not active")
            if standin.rotate_refresh_tokens:
                if claims["jti"] in self._used_refresh:
                    standin.counts["refresh_reused"] += 1
                    session.active = False  # Keycloak ends the session: every token of it
                    standin.counts["sessions_ended"] += 1
                    raise OAuthError(400, "invalid_grant",
                                     "Maximum allowed refresh token reuse exceeded")
                self._used_refresh.add(claims["jti"])
        return self.tokens(session, client)
