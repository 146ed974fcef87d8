"""A stand-in VideoManager Pro API: a real HTTP server on loopback, for demos and tests.

It speaks both ways of logging in at once, as the real service does. The legacy API
({base} is {origin}/v1/vms, `url`; its tokens are HS256 JWTs, each for one VideoManager):

    POST {base}/auth/login                 {"username","password"}               "login"
    POST {base}/auth/refresh/{id}          {"refreshToken"}                      "refresh"

OpenID Connect as the vendor's Keycloak ({issuer} is {origin}/auth/realms/platform; access
and ID tokens are RS256 JWTs, valid for every VideoManager of the user; refresh tokens are
HS256 JWTs, opaque to clients; oidc.py and login.py hold the details):

    GET  /.well-known/webfinger?resource={origin}/v1/  JRD, issuer link            "webfinger"
    GET  {issuer}/.well-known/openid-configuration     discovery document          "discovery"
    GET  {issuer}/protocol/openid-connect/certs         JWK Set                     "jwks"
    POST {issuer}/protocol/openid-connect/token         every grant                 "token"
         grant_type=password                                                   "oidc_login"
         grant_type=refresh_token                                              "oidc_refresh"
         grant_type=authorization_code (+ PKCE)                                "oidc_code"
         grant_type=urn:ietf:params:oauth:grant-type:device_code               "oidc_device"
    GET  {issuer}/protocol/openid-connect/userinfo      (Bearer token)              "userinfo"
    GET  {issuer}/protocol/openid-connect/auth          login form; POST: its answer "authorize"
    POST {issuer}/protocol/openid-connect/auth/device   RFC 8628              "device_authorization"
    GET  {issuer}/device                                user-code page; POST: answer "verification"

And the API, which accepts a legacy token for its own VideoManager and an OIDC access token
for every VideoManager of the user:

    GET  {base}                            the VideoManager list   (Bearer token)     "api"
    GET  {base}/{id}/videos                a few fake videos       (Bearer token for {id})
    POST {base}/{id}/videos                "creates" one: 201      (Bearer token for {id})
    PUT  {base}/_bulk/upload               streams the body: its length and SHA-256  "bulk"
    GET  {base}/_bulk/download?bytes=N     streams N bytes (bulk_block() repeated)   "bulk"
    ANY  {base}/_bulk/redirect             307 to {upload_origin}/upload (if set)    "bulk"
    GET  {base}/_bulk/slow?seconds=S       answers after S seconds                   "bulk"

Counters (`counts`): every request under the name at its right (a token request under
"token" and its grant's name); answers that succeeded under the name plus "_ok" ("login_ok",
"refresh_ok", "oidc_login_ok", "oidc_refresh_ok", "oidc_code_ok", "oidc_device_ok",
"device_authorization_ok", "authorize_ok"); and "api_rejected", "refresh_reused" (both ways),
"sessions", "sessions_ended", "token_gone" (the old path after move_token_endpoint()),
"code_replayed", "authorize_denied", "authorize_failed", "device_approved", "device_denied",
"device_slow_down", "verification_failed", "client_secret_basic", "client_secret_post".
`requests` records (time.monotonic(), name) per auth request, a grant's name for a token
request.

Controls for tests — lifetimes, refresh token rotation (with Keycloak's reuse detection on
the OIDC side: reusing a refresh token ends its session), delay, injected failures (status,
HTML or garbage bodies, Retry-After, or one picked per request by `faults`), rewriting
answers, expiring every refresh token, revoking every access token, ending sessions, a
discovery document that claims another issuer, a token endpoint that moves — are plain
attributes and methods, and every request is counted. Fault and rewrite names are those
above: `fail(endpoints=("token",))` hits every grant, `("oidc_refresh",)` only refreshes;
`faults` and `rewrite` are called with a grant's name for token requests.

    with StandIn(access_lifetime=6) as api:
        ...  # point vm-tokend at api.url, log in as api.username / api.password
        assert api.counts["refresh"] == 1

Run it alone with `python -m standin [--legacy-only]` (it prints its URL).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import secrets
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Literal
from urllib.parse import quote

from standin.login import InteractiveGrants
from standin.oidc import DISCOVERY_PATH, WEBFINGER_PATH, OidcClient, OidcProvider

__all__ = ["LOST", "Fault", "OidcClient", "StandIn"]

DEFAULT_VIDEOMANAGERS = (("1001", "Marketing"), ("1002", "Sales"), ("1003", "Support"))
BASE_PATH = "/v1/vms"
BULK_PATH = f"{BASE_PATH}/_bulk"


def bulk_block() -> bytes:
    """What a bulk download repeats: 64 KiB that are not all one byte."""
    return hashlib.sha256(b"vm-token bulk").digest() * 2048

BodyKind = Literal["json", "html", "garbage", "empty"]
# What the OIDC token answers say of the refresh token's lifetime: "lifetime" (Keycloak's
# default, refresh_expires_in = refresh_lifetime), "zero" (offline tokens: 0 and a refresh
# token that does not expire), "absent" (no refresh_expires_in at all; the token expires).
RefreshExpiresMode = Literal["lifetime", "zero", "absent"]
Response = tuple[int, dict[str, str], bytes]
# Rewrites a successful auth answer before it is sent: (endpoint, answer) -> a new answer
# (any JSON value), bytes to send as they are, or LOST. For hostile-upstream tests.
Rewrite = Callable[[str, dict[str, Any]], Any]


class _Lost:
    """What a rewrite returns for an answer lost on the way: the request took effect (a
    refresh token was used, a session began), and the connection closes unanswered."""

    def __repr__(self) -> str:
        return "LOST"


LOST = _Lost()
# Picks an answer per auth request: endpoint -> a Fault to answer with, or None to answer
# normally. Consulted when no fail() is in effect. For hostile-upstream tests.
FaultPicker = Callable[[str], "Fault | None"]


@dataclass
class Fault:
    """An injected failure for the auth endpoints (names as in the module docstring)."""

    status: int = 503
    body: BodyKind | bytes = "json"  # bytes: sent as they are
    retry_after: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    remaining: int | None = None  # None: until heal()
    endpoints: frozenset[str] = frozenset({"login", "refresh"})


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class StandIn:
    """The stand-in API. Thread-safe: tests poke its controls while it serves."""

    def __init__(
        self,
        *,
        username: str = "demo",
        password: str = "demo-password",  # noqa: S107 - a stand-in's well-known login
        videomanagers: Iterable[tuple[str, str]] = DEFAULT_VIDEOMANAGERS,
        forbidden: Iterable[str] = (),
        access_lifetime: int = 300,
        refresh_lifetime: int = 3600,
        rotate_refresh_tokens: bool = False,
        legacy_only: bool = False,
        clients: Iterable[OidcClient] = (OidcClient(),),
        webfinger_href: Literal["document", "issuer"] = "document",
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.username = username
        self.password = password
        self.videomanagers = [(str(i), n) for i, n in videomanagers]
        # VideoManagers listed for the user but refused on refresh (403).
        self.forbidden = set(forbidden)
        self.access_lifetime = access_lifetime
        self.refresh_lifetime = refresh_lifetime
        self.rotate_refresh_tokens = rotate_refresh_tokens
        # No WebFinger, no OIDC: every endpoint of it answers 404, as a server without it.
        self.legacy_only = legacy_only
        # WebFinger's issuer link: the discovery document itself, as the vendor's, or the
        # issuer, as OpenID Connect Discovery 1.0 has it.
        self.webfinger_href = webfinger_href
        # The issuer the discovery document claims, when not its own (clients must refuse).
        self.issuer_override: str | None = None
        self.refresh_expires_mode: RefreshExpiresMode = "lifetime"
        self.code_lifetime = 60  # s, an authorization code (Keycloak's default)
        self.device_code_lifetime = 600  # s, RFC 8628 expires_in
        self.device_interval = 5  # s, RFC 8628 interval
        self.slow_down_increment = 5  # s added to the interval on slow_down (RFC 8628 3.5)
        self.delay = 0.0
        self.counts: Counter[str] = Counter()
        self.issued: list[str] = []  # every token handed out, for leak checks
        self.requests: list[tuple[float, str]] = []  # (time.monotonic(), endpoint)
        self._key = secrets.token_bytes(32)
        self._revoked: set[str] = set()  # jti
        self._used_refresh: set[str] = set()  # jti, with rotation
        self._access_jtis: set[str] = set()
        self._refresh_jtis: set[str] = set()
        self._fault: Fault | None = None
        self.rewrite: Rewrite | None = None
        self.faults: FaultPicker | None = None
        # Where `POST /{vm}/videos` sends the upload, as the real API does with a Location on
        # asset-in.video-cdn.net carrying a token of its own; None: no Location.
        self.upload_origin: str | None = None
        self._lock = threading.Lock()
        self._server = _Server((host, port), _Handler)
        self._server.standin = self
        self._thread: threading.Thread | None = None
        self.oidc = OidcProvider(self, tuple(clients))
        self.grants = InteractiveGrants(self.oidc)  # the realm's interactive half
        self.oidc.interactive = self.grants

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"{self.origin}{BASE_PATH}"

    @property
    def origin(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def api_root(self) -> str:
        """The WebFinger resource: the API root, `url` without `vms`, with a trailing slash."""
        return f"{self.origin}{BASE_PATH.rsplit('/', 1)[0]}/"

    @property
    def webfinger_url(self) -> str:
        return f"{self.origin}{WEBFINGER_PATH}?resource={quote(self.api_root, safe='')}"

    @property
    def issuer(self) -> str:
        """The realm's real issuer (whatever `issuer_override` makes the document claim)."""
        return self.oidc.issuer

    @property
    def discovery_url(self) -> str:
        return self.origin + DISCOVERY_PATH

    @property
    def token_endpoint(self) -> str:
        return self.origin + self.oidc.token_path

    def start(self) -> StandIn:
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> StandIn:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- controls -------------------------------------------------------------------------

    def fail(
        self,
        status: int = 503,
        *,
        body: BodyKind | bytes = "json",
        retry_after: str | None = None,
        headers: Iterable[tuple[str, str]] = (),
        count: int | None = None,
        endpoints: Iterable[str] = ("login", "refresh"),
    ) -> None:
        """Answer the auth endpoints with `status` (`count` times, or until heal())."""
        with self._lock:
            self._fault = Fault(status, body, retry_after, tuple(headers), count,
                                frozenset(endpoints))

    def heal(self) -> None:
        with self._lock:
            self._fault = None

    def expire_refresh_tokens(self) -> None:
        """Make every refresh token issued so far invalid (as if an hour had passed), legacy
        and OIDC ("Token is not active"); OIDC sessions stay, so a new login works."""
        with self._lock:
            self._revoked |= self._refresh_jtis

    def revoke_access_tokens(self) -> None:
        """Make every access token issued so far invalid, legacy and OIDC."""
        with self._lock:
            self._revoked |= self._access_jtis

    def end_sessions(self) -> int:
        """End every OIDC session, as Keycloak's "sign out all sessions": every access and
        refresh token of them stops working. Returns how many were active."""
        return self.oidc.end_sessions()

    def end_session(self, session_state: str) -> bool:
        """End one OIDC session (a token answer's `session_state`)."""
        return self.oidc.end_sessions(session_state) == 1

    def move_token_endpoint(self) -> str:
        """Move the OIDC token endpoint: the old path answers 404 from now on and the
        discovery document advertises the new one, which is returned."""
        return self.oidc.move_token_endpoint()

    def approve_device(self, user_code: str, *, approve: bool = True) -> bool:
        """Play the user on the device page: approve (or deny) a pending device login."""
        return self.grants.decide_device(user_code, approve=approve)

    def token_valid(self, token: str, videomanager_id: str | None = None) -> bool:
        """Whether the API would accept `token` (for `videomanager_id`, if given) now."""
        claims = self._verify(token, "access")
        if claims is None:
            return self._oidc_allows(token, videomanager_id)
        return videomanager_id is None or claims.get("vm") == str(videomanager_id)

    def _oidc_allows(self, token: str, videomanager_id: str | None) -> bool:
        if self.legacy_only or self.oidc.access_claims(token) is None:
            return False
        return videomanager_id is None or self._user_may_use(str(videomanager_id))

    def _user_may_use(self, videomanager_id: str) -> bool:
        # What the API checks for an OIDC token, which is not tied to a VideoManager: the
        # user's rights there (any VideoManager of the list, but not a `forbidden` one).
        return (videomanager_id in {i for i, _ in self.videomanagers}
                and videomanager_id not in self.forbidden)

    # -- tokens ---------------------------------------------------------------------------

    def _sign(self, claims: dict[str, Any]) -> str:
        header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
        signature = hmac.new(self._key, f"{header}.{payload}".encode(), hashlib.sha256).digest()
        return f"{header}.{payload}.{_b64(signature)}"

    def _issue(self, kind: str, videomanager_id: str, lifetime: int) -> str:
        now = int(time.time())
        jti = secrets.token_hex(8)
        token = self._sign(
            {"sub": self.username, "vm": videomanager_id, "typ": kind, "jti": jti,
             "iat": now, "exp": now + lifetime}
        )
        with self._lock:
            (self._access_jtis if kind == "access" else self._refresh_jtis).add(jti)
            self.issued.append(token)
        return token

    def _verify(self, token: str, kind: str, *, live: bool = True) -> dict[str, Any] | None:
        """The claims of our own `kind` token; with `live`, only if not revoked or expired."""
        try:
            header, payload, signature = token.split(".")
            expected = hmac.new(
                self._key, f"{header}.{payload}".encode(), hashlib.sha256
            ).digest()
            if not hmac.compare_digest(expected, _unb64(signature)):
                return None
            claims = json.loads(_unb64(payload))
        except ValueError:
            return None
        if not isinstance(claims, dict) or claims.get("typ") != kind:
            return None
        if not live:
            return claims
        with self._lock:
            if claims.get("jti") in self._revoked:
                return None
        if claims.get("exp", 0) <= time.time():
            return None
        return claims

    def _grant(self, videomanager_id: str, refresh_token: str | None) -> dict[str, Any]:
        if refresh_token is None or self.rotate_refresh_tokens:
            refresh_token = self._issue("refresh", videomanager_id, self.refresh_lifetime)
        return {
            "accessToken": self._issue("access", videomanager_id, self.access_lifetime),
            "refreshToken": refresh_token,
            "videoManagerList": [{"id": int(i) if i.isdigit() else i, "name": n}
                                 for i, n in self.videomanagers],
            "validForVideoManager": int(videomanager_id) if videomanager_id.isdigit()
            else videomanager_id,
        }

    # -- request handling (called from the server's threads) -------------------------------

    def _count(self, name: str) -> None:
        with self._lock:
            self.counts[name] += 1

    def _begin(self, endpoint: str, kind: str | None = None) -> Response | None:
        """Count an auth request, wait `delay`, and return the injected fault's answer if any.

        `kind` (a token request's grant) is counted too and is the name a fault picker
        and `requests` see; fail(endpoints=...) matches either name."""
        with self._lock:
            self.counts[endpoint] += 1
            if kind is not None:
                self.counts[kind] += 1
            self.requests.append((time.monotonic(), kind or endpoint))
        if self.delay:
            time.sleep(self.delay)
        fault = self._take_fault(kind or endpoint, endpoint)
        return None if fault is None else _fault_response(fault)

    def _answer(self, endpoint: str, answer: dict[str, Any], content_type: str,
                headers: dict[str, str]) -> Response:
        """A successful answer, through `rewrite` if set."""
        with self._lock:
            rewrite = self.rewrite
        if rewrite is not None:
            changed = rewrite(endpoint, answer)
            if changed is LOST:
                return 0, {}, b""  # the handler closes the connection without a word
            if isinstance(changed, bytes):
                return 200, {"Content-Type": content_type, **headers}, changed
            answer = changed
        return 200, {"Content-Type": content_type, **headers}, json.dumps(answer).encode()

    def _take_fault(self, endpoint: str, also: str | None = None) -> Fault | None:
        with self._lock:
            fault = self._fault
            picker = self.faults
            if fault is not None:
                if endpoint not in fault.endpoints and also not in fault.endpoints:
                    return None
                if fault.remaining is not None:
                    fault.remaining -= 1
                    if fault.remaining <= 0:
                        self._fault = None
                return fault
        return picker(endpoint) if picker is not None else None

    def handle(self, method: str, path: str, headers: dict[str, str],
               body: bytes) -> tuple[int, dict[str, str], bytes]:
        path, _, query = path.partition("?")
        path = path.rstrip("/")
        if not path.startswith(BASE_PATH):
            answer = (None if self.legacy_only
                      else self.oidc.handle(method, path, query, headers, body))
            return answer if answer is not None else _json(404, {"message": "Not found"})
        rest = path[len(BASE_PATH):].strip("/").split("/") if path != BASE_PATH else []
        if method == "POST" and rest[:2] == ["auth", "login"] and len(rest) == 2:
            return self._auth("login", body, None)
        if method == "POST" and rest[:2] == ["auth", "refresh"] and len(rest) == 3:
            return self._auth("refresh", body, rest[2])
        if method == "GET" and len(rest) <= 2 and (not rest or rest[1:] == ["videos"]):
            return self._api(headers, rest[0] if rest else None)
        if method == "POST" and len(rest) == 2 and rest[1] == "videos":
            return self._api(headers, rest[0], create=True)
        return _json(404, {"message": "Not found"})

    def _auth(self, endpoint: str, body: bytes,
              videomanager_id: str | None) -> tuple[int, dict[str, str], bytes]:
        fault = self._begin(endpoint)
        if fault is not None:
            return fault
        try:
            data = json.loads(body)
            if not isinstance(data, dict):
                raise ValueError
        except ValueError:
            return _json(400, {"message": "Malformed JSON body"})
        if endpoint == "login":
            if data.get("username") != self.username or data.get("password") != self.password:
                return _json(401, {"message": "Invalid username or password"})
            grant = self._grant(self.videomanagers[0][0], None)
        else:
            assert videomanager_id is not None
            token = data.get("refreshToken")
            claims = self._verify(token, "refresh") if isinstance(token, str) else None
            if claims is None:
                sent = self._verify(token, "refresh", live=False) \
                    if isinstance(token, str) else None
                with self._lock:
                    if sent is not None and sent.get("jti") in self._used_refresh:
                        # used before (and so revoked): a reuse, counted as the OIDC side does
                        self.counts["refresh_reused"] += 1
                        return _json(401, {"message": "Refresh token already used"})
                return _json(401, {"message": "Invalid or expired refresh token"})
            if self.rotate_refresh_tokens:
                with self._lock:
                    if claims["jti"] in self._used_refresh:
                        self.counts["refresh_reused"] += 1
                        return _json(401, {"message": "Refresh token already used"})
                    self._used_refresh.add(claims["jti"])
                    self._revoked.add(claims["jti"])
            if videomanager_id not in {i for i, _ in self.videomanagers}:
                return _json(403, {"message": "Access denied"})
            if videomanager_id in self.forbidden:
                return _json(403, {"message": "Access denied"})
            grant = self._grant(videomanager_id,
                                None if self.rotate_refresh_tokens else token)
        self._count(f"{endpoint}_ok")
        return self._answer(endpoint, grant, "application/json", {})

    def _api(self, headers: dict[str, str], videomanager_id: str | None,
             create: bool = False) -> tuple[int, dict[str, str], bytes]:
        with self._lock:
            self.counts["api"] += 1
        auth = headers.get("authorization", "")
        token = auth[7:] if auth[:7].lower() == "bearer " else ""
        claims = self._verify(token, "access") if token else None
        oidc = claims is None and bool(token) and self._oidc_allows(token, None)
        if claims is None and not oidc:
            with self._lock:
                self.counts["api_rejected"] += 1
            return _json(401, {"message": "Invalid or expired access token"})
        if videomanager_id is None:
            return _json(200, [{"id": i, "name": n} for i, n in self.videomanagers])
        if oidc and not self._user_may_use(videomanager_id):
            with self._lock:
                self.counts["api_rejected"] += 1
            return _json(403, {"message": "Access denied"})
        if not oidc and claims is not None and claims.get("vm") != videomanager_id:
            with self._lock:
                self.counts["api_rejected"] += 1
            return _json(403, {"message": "Token not valid for this VideoManager"})
        if create:
            video = secrets.token_hex(4)
            status, response_headers, body = _json(201, {"id": video})
            if self.upload_origin is not None:
                response_headers["Location"] = (f"{self.upload_origin}/upload/{video}"
                                                f"?token={secrets.token_urlsafe(16)}")
            return status, response_headers, body
        return _json(200, {"items": [{"id": f"v{n}", "title": f"Video {n}"} for n in range(3)]})


def _json(status: int, data: Any) -> tuple[int, dict[str, str], bytes]:
    return status, {"Content-Type": "application/json"}, json.dumps(data).encode()


def _fault_response(fault: Fault) -> tuple[int, dict[str, str], bytes]:
    headers: dict[str, str] = dict(fault.headers)
    if fault.retry_after is not None:
        headers["Retry-After"] = fault.retry_after
    if isinstance(fault.body, bytes):
        headers.setdefault("Content-Type", "application/json")
        return fault.status, headers, fault.body
    if fault.body == "json":
        status, json_headers, body = _json(fault.status, {"message": "Injected failure"})
        return status, {**json_headers, **headers}, body
    if fault.body == "html":
        headers["Content-Type"] = "text/html"
        return fault.status, headers, b"<html><body><h1>Bad Gateway</h1></body></html>"
    if fault.body == "garbage":
        headers["Content-Type"] = "application/json"
        return fault.status, headers, b"\x00\xff{{not json"
    return fault.status, headers, b""


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # socketserver listens with a backlog of 5: a burst of new connections (a proxy opening
    # a hundred at once) then waits for SYN retransmissions, 1, 3, 7, 15 s. A real server's.
    request_queue_size = 128
    standin: StandIn

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            return  # a client that hung up (hostile tests make the daemon do so): no news
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the real API
    # Headers and body leave in two writes; with Nagle's algorithm the body waits for the
    # client's delayed ACK, 40 ms on every request on Linux loopback.
    disable_nagle_algorithm = True
    server: _Server

    def _serve(self) -> None:
        if self.path.startswith(BULK_PATH):
            self._bulk()
            return
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        status, response_headers, payload = self.server.standin.handle(
            self.command, self.path, headers, body
        )
        if status == 0:  # LOST
            self.close_connection = True
            return
        self.send_response(status)
        for name, value in response_headers.items():
            # http.server sends headers as Latin-1 and fails on anything else; a sloppy
            # server sends UTF-8, and so does this one (hostile tests send odd values).
            self.send_header(name, value.encode("utf-8").decode("latin-1"))
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = _serve
    do_POST = _serve
    do_PUT = _serve

    # -- bulk transfers, streamed: never the whole body in memory -------------------------

    def _bulk(self) -> None:
        """`PUT|POST {BULK_PATH}/upload` (Content-Length): the body's length and SHA-256;
        `GET {BULK_PATH}/download?bytes=N`: N bytes of `bulk_block()` repeated. Both want
        a token the API accepts; counted as "bulk"."""
        standin = self.server.standin
        standin._count("bulk")
        token = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
        path, _, query = self.path.partition("?")
        if not standin.token_valid(token):
            standin._count("api_rejected")
            self._bulk_answer(401, {"message": "Unauthorized"}, close=True)  # body unread
            return
        if path == f"{BULK_PATH}/upload" and self.command in ("PUT", "POST"):
            length = int(self.headers.get("Content-Length") or 0)
            digest = hashlib.sha256()
            left = length
            while left:
                chunk = self.rfile.read(min(left, 1 << 16))
                if not chunk:
                    break
                digest.update(chunk)
                left -= len(chunk)
            self._bulk_answer(200, {"bytes": length - left, "sha256": digest.hexdigest()})
        elif path == f"{BULK_PATH}/download" and self.command == "GET":
            size = int(query.removeprefix("bytes=") or 0)
            block = bulk_block()
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size))
            self.end_headers()
            left = size
            while left:
                piece = block[:left]
                self.wfile.write(piece)
                left -= len(piece)
        elif path == f"{BULK_PATH}/slow" and self.command == "GET":
            time.sleep(float(query.removeprefix("seconds=") or 1))  # an API thinking long
            self._bulk_answer(200, {"slow": True})
        elif path == f"{BULK_PATH}/redirect" and standin.upload_origin is not None:
            # what the API does with uploads: elsewhere, with a token of that host's own
            self.rfile.read(int(self.headers.get("Content-Length") or 0))  # keep-alive
            self.send_response(307)
            self.send_header("Location", f"{standin.upload_origin}/upload?token=upload-own")
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self._bulk_answer(404, {"message": "Not found"}, close=True)

    def _bulk_answer(self, status: int, body: dict[str, Any], *, close: bool = False) -> None:
        payload = json.dumps(body).encode()
        self.send_response(status)
        if close:  # the request's body was not read: this connection cannot go on
            self.send_header("Connection", "close")
            self.close_connection = True
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass  # quiet: tests and the demo have their own output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m standin",
        description="Run the stand-in VideoManager Pro API on loopback until interrupted.",
    )
    parser.add_argument("--port", type=int, default=0, help="TCP port (default: any free one)")
    parser.add_argument("--username", default="demo")
    parser.add_argument("--password", default="demo-password",
                        help="the password it accepts (a stand-in's, not a real one)")
    parser.add_argument("--access-lifetime", type=int, default=300, metavar="S")
    parser.add_argument("--refresh-lifetime", type=int, default=3600, metavar="S")
    parser.add_argument("--rotate-refresh-tokens", action="store_true")
    parser.add_argument("--legacy-only", action="store_true",
                        help="serve the legacy login only: no WebFinger, no OpenID Connect")
    parser.add_argument("--device-interval", type=int, default=5, metavar="S",
                        help="the polling interval the device login asks for")
    args = parser.parse_args(argv)
    standin = StandIn(
        username=args.username,
        password=args.password,
        access_lifetime=args.access_lifetime,
        refresh_lifetime=args.refresh_lifetime,
        rotate_refresh_tokens=args.rotate_refresh_tokens,
        legacy_only=args.legacy_only,
        port=args.port,
    )
    standin.device_interval = args.device_interval
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with standin:
        print(standin.url, flush=True)
        stop.wait()
    return 0

