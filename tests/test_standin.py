"""The stand-in over real HTTP: WebFinger, OIDC discovery, the token endpoint and its grants,
Keycloak's sessions and rotation, interactive logins, the API with both kinds of token, and
the legacy endpoints unchanged. Plain httpx; signatures checked with nothing but pow()."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, quote, urlencode, urlsplit

import httpx
import pytest

from standin.jose import RsaKey
from standin.server import LOST, Fault, OidcClient, StandIn

FORM = "application/x-www-form-urlencoded"
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
_KEY: list[RsaKey] = []
_REAL_GENERATE = RsaKey.generate


@pytest.fixture(autouse=True)
def one_key(monkeypatch):
    """One RSA key for the whole module: generating one per stand-in would cost ~0.2 s each.
    test_key_generation makes a fresh one."""
    def cached(cls=None, bits=2048):
        if not _KEY:
            _KEY.append(_REAL_GENERATE())
        return _KEY[0]
    monkeypatch.setattr(RsaKey, "generate", classmethod(cached))


@pytest.fixture
def make_standin(make_standin):
    """The stand-in as the real service is: both logins (the suite's default is legacy)."""
    def make(**options):
        options.setdefault("legacy_only", False)
        return make_standin(**options)
    return make


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as client:
        yield client


# -- helpers ----------------------------------------------------------------------------------

def b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def claims(token: str) -> dict:
    return json.loads(b64d(token.split(".")[1]))


def header(token: str) -> dict:
    return json.loads(b64d(token.split(".")[0]))


def verify_rs256(token: str, jwks: dict) -> bool:
    """RFC 7515 + RFC 8017 8.2.2, by hand: the signature raised to e mod n is the padded hash."""
    signing_input, _, signature = token.rpartition(".")
    (jwk,) = [k for k in jwks["keys"] if k["kid"] == header(token)["kid"]]
    n = int.from_bytes(b64d(jwk["n"]), "big")
    e = int.from_bytes(b64d(jwk["e"]), "big")
    size = (n.bit_length() + 7) // 8
    em = pow(int.from_bytes(b64d(signature), "big"), e, n).to_bytes(size, "big")
    digest_info = bytes.fromhex("3031300d060960864801650304020105000420")
    t = digest_info + hashlib.sha256(signing_input.encode()).digest()
    return em == b"\x00\x01" + b"\xff" * (size - len(t) - 3) + b"\x00" + t


def token_request(http: httpx.Client, api: StandIn, data: dict, **kwargs) -> httpx.Response:
    return http.post(api.token_endpoint, data=data, **kwargs)


def password_login(http: httpx.Client, api: StandIn, scope: str = "openid",
                   client_id: str = "anonymous", **kwargs) -> dict:
    response = token_request(http, api, {
        "grant_type": "password", "client_id": client_id, "username": api.username,
        "password": api.password, "scope": scope}, **kwargs)
    assert response.status_code == 200, response.text
    return response.json()


def refresh(http: httpx.Client, api: StandIn, refresh_token: str,
            client_id: str = "anonymous") -> httpx.Response:
    return token_request(http, api, {"grant_type": "refresh_token", "client_id": client_id,
                                     "refresh_token": refresh_token})


def oauth_error(response: httpx.Response) -> tuple[int, str, str]:
    body = response.json()
    return response.status_code, body["error"], body["error_description"]


def videos(http: httpx.Client, api: StandIn, token: str, vm: str) -> int:
    return http.get(f"{api.url}/{vm}/videos",
                    headers={"Authorization": f"Bearer {token}"}).status_code


def pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(
        hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


# -- the key and its signatures ---------------------------------------------------------------

def test_key_generation_is_rsa_2048_and_quick():
    started = time.perf_counter()
    key = _REAL_GENERATE()
    elapsed = time.perf_counter() - started
    assert key.n.bit_length() == 2048 and key.n == key.p * key.q and key.e == 65537
    assert key.p.bit_length() == key.q.bit_length() == 1024 and key.p != key.q
    assert key.e * key.d % ((key.p - 1) * (key.q - 1)) == 1
    assert all(pow(a, key.p - 1, key.p) == 1 == pow(a, key.q - 1, key.q) for a in (2, 3, 5))
    message = b"header.payload"
    signature = int.from_bytes(key.sign(message), "big")
    assert pow(signature, key.e, key.n) == key.encoded_digest(message)
    jwk = key.jwk()
    thumbprint = json.dumps({"e": jwk["e"], "kty": "RSA", "n": jwk["n"]},
                            separators=(",", ":"))
    assert jwk["kid"] == base64.urlsafe_b64encode(
        hashlib.sha256(thumbprint.encode()).digest()).rstrip(b"=").decode()  # RFC 7638
    assert elapsed < 5  # generous on a shared machine; typically ~0.2 s


def test_jwks_and_rs256_signatures_verify_with_pow(make_standin, http):
    api = make_standin()
    answer = password_login(http, api)
    jwks = http.get(f"{api.issuer}/protocol/openid-connect/certs").json()
    (jwk,) = jwks["keys"]
    assert jwk["kty"] == "RSA" and jwk["alg"] == "RS256" and jwk["use"] == "sig"
    assert jwk["e"] == "AQAB" and len(b64d(jwk["n"])) == 256 and jwk["kid"]
    for token in (answer["access_token"], answer["id_token"]):
        assert header(token) == {"alg": "RS256", "typ": "JWT", "kid": jwk["kid"]}
        assert verify_rs256(token, jwks)
        head, payload, signature = token.split(".")
        forged = base64.urlsafe_b64encode(json.dumps(
            {**claims(token), "sub": "mallory"}).encode()).rstrip(b"=").decode()
        assert not verify_rs256(f"{head}.{forged}.{signature}", jwks)
    assert api.counts["jwks"] == 1


# -- WebFinger and discovery ------------------------------------------------------------------

def test_webfinger_answers_as_the_vendor(make_standin, http):
    api = make_standin()
    root = f"{api.origin}/v1/"
    response = http.get(f"{api.origin}/.well-known/webfinger", params={"resource": root})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/jrd+json"
    assert response.headers["cache-control"] == "max-age=300"
    assert response.json() == {
        "subject": root,
        "properties": {f"{root}keycloak/realm": "platform",
                       f"{root}keycloak/auth-server-url": f"{api.origin}/auth/"},
        "links": [{"rel": "http://openid.net/specs/connect/1.0/issuer",
                   "href": f"{api.origin}/auth/realms/platform/.well-known/openid-configuration"}],
    }
    assert http.get(api.webfinger_url).json() == response.json()
    assert root == api.api_root and api.url == f"{root}vms"
    # RFC 7033 4.3: rel filters the links.
    other = http.get(api.webfinger_url + "&rel=" + quote("http://webfinger.net/rel/avatar"))
    assert other.json()["links"] == []
    for resource in (f"{api.origin}/v1", f"{api.origin}/v1/vms", "acct:demo@example.com"):
        missing = http.get(f"{api.origin}/.well-known/webfinger",
                           params={"resource": resource})
        assert missing.status_code == 404
        assert missing.headers["content-type"] == "application/jrd+json"
    assert http.get(f"{api.origin}/.well-known/webfinger").status_code == 400
    assert api.counts["webfinger"] == 7


def test_webfinger_can_point_at_the_issuer_instead(make_standin, http):
    api = make_standin(webfinger_href="issuer")
    (link,) = http.get(api.webfinger_url).json()["links"]
    assert link["href"] == api.issuer == f"{api.origin}/auth/realms/platform"
    assert http.get(link["href"] + "/.well-known/openid-configuration").status_code == 200


def test_discovery_document(make_standin, http):
    api = make_standin()
    href = http.get(api.webfinger_url).json()["links"][0]["href"]
    response = http.get(href)
    assert response.status_code == 200 and href == api.discovery_url
    assert response.headers["cache-control"] == "max-age=300"
    doc = response.json()
    issuer = f"{api.origin}/auth/realms/platform"
    assert doc["issuer"] == issuer == api.issuer
    oidc = f"{issuer}/protocol/openid-connect"
    assert doc["token_endpoint"] == f"{oidc}/token" == api.token_endpoint
    assert doc["authorization_endpoint"] == f"{oidc}/auth"
    assert doc["device_authorization_endpoint"] == f"{oidc}/auth/device"
    assert doc["jwks_uri"] == f"{oidc}/certs"
    assert doc["userinfo_endpoint"] == f"{oidc}/userinfo"
    assert set(doc["grant_types_supported"]) == {
        "password", "refresh_token", "authorization_code", DEVICE_GRANT}
    assert doc["code_challenge_methods_supported"] == ["S256"]
    assert doc["id_token_signing_alg_values_supported"] == ["RS256"]
    assert doc["response_types_supported"] == ["code"]
    assert doc["subject_types_supported"] == ["public"]
    assert "openid" in doc["scopes_supported"] and "offline_access" in doc["scopes_supported"]
    assert api.counts["discovery"] == 1


def test_issuer_override_is_claimed_by_the_document_only(make_standin, http):
    api = make_standin()
    api.issuer_override = "https://login.example.com/auth/realms/platform"
    doc = http.get(api.discovery_url).json()
    assert doc["issuer"] == "https://login.example.com/auth/realms/platform"
    assert doc["token_endpoint"] == api.token_endpoint  # still reachable: clients must refuse
    assert claims(password_login(http, api)["access_token"])["iss"] == api.issuer


def test_legacy_only_answers_404_to_all_of_oidc(make_standin, http):
    api = make_standin(legacy_only=True)
    issuer = f"{api.origin}/auth/realms/platform"
    oidc = f"{issuer}/protocol/openid-connect"
    assert http.get(api.webfinger_url).status_code == 404
    for url in (f"{issuer}/.well-known/openid-configuration", f"{oidc}/certs",
                f"{oidc}/userinfo", f"{oidc}/auth?client_id=anonymous", f"{issuer}/device"):
        assert http.get(url).status_code == 404, url
    for url in (f"{oidc}/token", f"{oidc}/auth/device"):
        assert http.post(url, data={"grant_type": "password"}).status_code == 404, url
    assert http.post(f"{api.url}/auth/login",
                     json={"username": api.username, "password": api.password}).status_code == 200
    assert "webfinger" not in api.counts and "token" not in api.counts


def test_move_token_endpoint(make_standin, http):
    api = make_standin()
    old = api.token_endpoint
    first = password_login(http, api)
    new = api.move_token_endpoint()
    assert new != old and new == api.token_endpoint
    gone = http.post(old, data={"grant_type": "refresh_token", "client_id": "anonymous",
                                "refresh_token": first["refresh_token"]})
    assert gone.status_code == 404 and api.counts["token_gone"] == 1
    assert http.get(api.discovery_url).json()["token_endpoint"] == new
    assert refresh(http, api, first["refresh_token"]).status_code == 200


# -- the token endpoint -----------------------------------------------------------------------

def test_password_grant_answers_as_keycloak(make_standin, http):
    api = make_standin(access_lifetime=300, refresh_lifetime=3600)
    before = int(time.time())
    response = token_request(http, api, {
        "grant_type": "password", "client_id": "anonymous", "username": "demo",
        "password": "demo-password", "scope": "openid"})
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    answer = response.json()
    assert set(answer) == {"access_token", "expires_in", "refresh_expires_in", "refresh_token",
                           "token_type", "id_token", "not-before-policy", "session_state",
                           "scope"}
    assert answer["expires_in"] == 300 and answer["refresh_expires_in"] == 3600
    assert answer["token_type"] == "Bearer" and answer["scope"] == "openid profile email"
    access = claims(answer["access_token"])
    assert access["iss"] == api.issuer and access["typ"] == "Bearer"
    assert access["azp"] == "anonymous" and access["aud"] == "account"
    assert access["scope"] == answer["scope"] and access["sid"] == answer["session_state"]
    assert access["jti"] and access["sub"] and "vm" not in access
    assert before <= access["iat"] <= time.time() and access["exp"] == access["iat"] + 300
    id_token = claims(answer["id_token"])
    assert id_token["typ"] == "ID" and id_token["aud"] == "anonymous"
    assert id_token["sub"] == access["sub"] and "nonce" not in id_token
    refresh_claims = claims(answer["refresh_token"])
    assert refresh_claims["typ"] == "Refresh" and refresh_claims["exp"] == access["iat"] + 3600
    assert api.token_valid(answer["access_token"])
    assert all(t in api.issued for t in (answer["access_token"], answer["refresh_token"]))
    assert api.counts["token"] == api.counts["oidc_login"] == api.counts["oidc_login_ok"] == 1
    assert api.requests[-1][1] == "oidc_login"
    # Without openid: no ID token.
    plain = password_login(http, api, scope="")
    assert "id_token" not in plain and plain["scope"] == "profile email"
    # Each login is its own session.
    assert plain["session_state"] != answer["session_state"]
    userinfo = http.get(f"{api.issuer}/protocol/openid-connect/userinfo",
                        headers={"Authorization": f"Bearer {answer['access_token']}"})
    assert userinfo.json() == {"sub": access["sub"], "preferred_username": "demo"}


@pytest.mark.parametrize(("data", "expected"), [
    ({"password": "wrong"}, (401, "invalid_grant", "Invalid user credentials")),
    ({"username": "eve"}, (401, "invalid_grant", "Invalid user credentials")),
    ({"client_id": "nobody"},
     (401, "invalid_client", "Invalid client or Invalid client credentials")),
    ({"client_id": "codes-only"},
     (400, "unauthorized_client", "Client not allowed the password grant")),
    ({"grant_type": "client_credentials"},
     (400, "unsupported_grant_type", "Unsupported grant_type")),
    ({"scope": "openid admin"}, (400, "invalid_scope", "Invalid scopes: openid admin")),
])
def test_token_errors(make_standin, http, data, expected):
    api = make_standin(clients=[OidcClient(), OidcClient("codes-only",
                                                         grants=frozenset({"authorization_code"}))])
    form = {"grant_type": "password", "client_id": "anonymous", "username": api.username,
            "password": api.password, "scope": "openid", **data}
    assert oauth_error(token_request(http, api, form)) == expected
    assert "oidc_login_ok" not in api.counts


def test_malformed_token_requests(make_standin, http):
    api = make_standin()
    response = http.post(api.token_endpoint, json={"grant_type": "password"})
    assert oauth_error(response)[:2] == (400, "invalid_request")
    twice = http.post(api.token_endpoint, content="grant_type=password&grant_type=password",
                      headers={"Content-Type": FORM})
    assert oauth_error(twice)[:2] == (400, "invalid_request")
    no_token = token_request(http, api, {"grant_type": "refresh_token", "client_id": "anonymous"})
    assert oauth_error(no_token)[:2] == (400, "invalid_request")


def test_confidential_client_with_basic_authentication(make_standin, http):
    client_id, secret = "vm token:ci", "s3cr:t/+&=é"
    api = make_standin(clients=[OidcClient(client_id, secret=secret)])

    def basic(user: str, password: str) -> dict:
        # RFC 6749 2.3.1: form-urlencode each, then Basic.
        raw = f"{quote(user, safe='')}:{quote(password, safe='')}".encode()
        return {"Authorization": "Basic " + base64.b64encode(raw).decode()}

    form = {"grant_type": "password", "username": api.username, "password": api.password,
            "scope": "openid"}
    ok = token_request(http, api, form, headers=basic(client_id, secret))
    assert ok.status_code == 200 and claims(ok.json()["access_token"])["azp"] == client_id
    assert api.counts["client_secret_basic"] == 1
    wrong = token_request(http, api, form, headers=basic(client_id, "guess"))
    assert oauth_error(wrong)[:2] == (401, "invalid_client")
    assert wrong.headers["www-authenticate"].startswith("Basic")
    no_secret = token_request(http, api, {**form, "client_id": client_id})
    assert oauth_error(no_secret)[:2] == (401, "invalid_client")
    post = token_request(http, api, {**form, "client_id": client_id, "client_secret": secret})
    assert post.status_code == 200 and api.counts["client_secret_post"] == 1
    answer = ok.json()
    again = http.post(api.token_endpoint, headers=basic(client_id, secret), data={
        "grant_type": "refresh_token", "refresh_token": answer["refresh_token"]})
    assert again.status_code == 200
    # The anonymous client is not registered here, and a refresh token is bound to its client.
    assert oauth_error(refresh(http, api, answer["refresh_token"]))[1] == "invalid_client"


def test_refresh_without_rotation_keeps_old_refresh_tokens_working(make_standin, http):
    api = make_standin()
    first = password_login(http, api)
    second = refresh(http, api, first["refresh_token"]).json()
    assert second["refresh_token"] != first["refresh_token"]  # Keycloak always sends one
    assert second["session_state"] == first["session_state"]
    assert claims(second["id_token"])["sid"] == first["session_state"]
    assert refresh(http, api, first["refresh_token"]).status_code == 200
    assert api.counts["oidc_refresh"] == api.counts["oidc_refresh_ok"] == 2
    assert api.counts["token"] == 3 and "refresh_reused" not in api.counts


def test_rotation_reuse_ends_the_whole_session(make_standin, http):
    api = make_standin(rotate_refresh_tokens=True)
    first = password_login(http, api)
    bystander = password_login(http, api)  # another login: another session
    second = refresh(http, api, first["refresh_token"]).json()
    third = refresh(http, api, second["refresh_token"]).json()
    assert api.token_valid(third["access_token"], "1002")
    reused = refresh(http, api, first["refresh_token"])
    assert oauth_error(reused) == (400, "invalid_grant",
                                   "Maximum allowed refresh token reuse exceeded")
    assert api.counts["refresh_reused"] == 1
    # Every token of that login stops working...
    for answer in (first, second, third):
        assert not api.token_valid(answer["access_token"])
        assert videos(http, api, answer["access_token"], "1001") == 401
    assert oauth_error(refresh(http, api, third["refresh_token"])) == (
        400, "invalid_grant", "Session not active")
    # ...and the other session goes on.
    assert api.token_valid(bystander["access_token"], "1001")
    assert refresh(http, api, bystander["refresh_token"]).status_code == 200


def test_refresh_token_failures(make_standin, http):
    api = make_standin()
    first = password_login(http, api)
    assert oauth_error(refresh(http, api, "not.a.token")) == (
        400, "invalid_grant", "Invalid refresh token")
    assert oauth_error(refresh(http, api, first["access_token"])) == (
        400, "invalid_grant", "Invalid refresh token")  # an access token is no refresh token
    api.expire_refresh_tokens()
    assert oauth_error(refresh(http, api, first["refresh_token"])) == (
        400, "invalid_grant", "Token is not active")
    assert api.token_valid(first["access_token"])  # only refresh tokens were expired


def test_refresh_token_expiry_in_time(make_standin, http):
    api = make_standin(refresh_lifetime=0)  # expires the second it is issued
    first = password_login(http, api)
    assert claims(first["refresh_token"])["exp"] <= time.time()
    assert oauth_error(refresh(http, api, first["refresh_token"])) == (
        400, "invalid_grant", "Token is not active")


def test_end_sessions_and_end_session(make_standin, http):
    api = make_standin()
    one, two, three = (password_login(http, api) for _ in range(3))
    assert api.end_session(one["session_state"])
    assert not api.end_session(one["session_state"])  # already ended
    assert not api.token_valid(one["access_token"])
    assert oauth_error(refresh(http, api, one["refresh_token"])) == (
        400, "invalid_grant", "Session not active")
    assert api.token_valid(two["access_token"])
    assert api.end_sessions() == 2
    for answer in (two, three):
        assert videos(http, api, answer["access_token"], "1001") == 401
        assert oauth_error(refresh(http, api, answer["refresh_token"]))[2] == "Session not active"
    assert api.counts["sessions"] == 3 and api.counts["sessions_ended"] == 3
    assert password_login(http, api)["access_token"]  # a new login works


def test_revoke_access_tokens_covers_oidc_tokens(make_standin, http):
    api = make_standin()
    answer = password_login(http, api)
    api.revoke_access_tokens()
    assert not api.token_valid(answer["access_token"])
    fresh = refresh(http, api, answer["refresh_token"]).json()
    assert api.token_valid(fresh["access_token"])


@pytest.mark.parametrize(("mode", "scope", "expires_in", "typ"), [
    ("zero", "openid", 0, "Offline"),
    ("absent", "openid", None, "Refresh"),
    ("lifetime", "openid offline_access", 0, "Offline"),
])
def test_refresh_expires_in_modes(make_standin, http, mode, scope, expires_in, typ):
    api = make_standin(refresh_lifetime=3600)
    api.refresh_expires_mode = mode
    answer = password_login(http, api, scope=scope)
    assert answer.get("refresh_expires_in") == expires_in
    refresh_claims = claims(answer["refresh_token"])
    assert refresh_claims["typ"] == typ
    assert ("exp" in refresh_claims) == (typ == "Refresh")
    assert refresh(http, api, answer["refresh_token"]).status_code == 200


# -- faults, rewrites and counters on the OIDC side -------------------------------------------

def test_fail_applies_to_named_oidc_endpoints_only(make_standin, http):
    api = make_standin()
    first = password_login(http, api)
    api.fail(503, retry_after="7", count=2, endpoints=("token",))
    assert http.get(api.discovery_url).status_code == 200
    failed = refresh(http, api, first["refresh_token"])
    assert failed.status_code == 503 and failed.headers["retry-after"] == "7"
    assert token_request(http, api, {"grant_type": "password"}).status_code == 503
    assert refresh(http, api, first["refresh_token"]).status_code == 200  # count used up
    api.fail(502, body="html", endpoints=("oidc_refresh",))
    assert refresh(http, api, first["refresh_token"]).status_code == 502
    assert password_login(http, api)["access_token"]
    api.heal()
    api.fail(500, body="garbage", endpoints=("webfinger", "discovery"))
    assert http.get(api.webfinger_url).status_code == 500
    assert http.get(api.discovery_url).content == b"\x00\xff{{not json"
    assert password_login(http, api)["access_token"]
    api.heal()
    api.fail(503)  # the default: the legacy endpoints only, as before
    assert password_login(http, api)["access_token"]
    assert http.post(f"{api.url}/auth/login", json={}).status_code == 503
    assert api.counts["token"] == 8 and api.counts["oidc_refresh"] == 3
    assert api.counts["oidc_refresh_ok"] == 1 and api.counts["oidc_login"] == 5


def test_fault_picker_and_rewrite_see_oidc_names(make_standin, http):
    api = make_standin()
    seen: list[str] = []

    def picker(endpoint: str) -> Fault | None:
        seen.append(endpoint)
        return Fault(429, retry_after="3") if endpoint == "oidc_refresh" else None

    api.faults = picker
    answer = password_login(http, api)
    assert refresh(http, api, answer["refresh_token"]).status_code == 429
    http.get(api.webfinger_url)
    http.get(api.discovery_url)
    assert seen == ["oidc_login", "oidc_refresh", "webfinger", "discovery"]
    api.faults = None
    rewritten: list[str] = []

    def rewrite(endpoint: str, answer: dict):
        rewritten.append(endpoint)
        if endpoint == "oidc_refresh":
            return {k: v for k, v in answer.items() if k != "refresh_token"}
        if endpoint == "discovery":
            return {k: v for k, v in answer.items() if k != "device_authorization_endpoint"}
        return b"<html>" if endpoint == "webfinger" else answer

    api.rewrite = rewrite
    assert "refresh_token" not in refresh(http, api, answer["refresh_token"]).json()
    assert "device_authorization_endpoint" not in http.get(api.discovery_url).json()
    assert http.get(api.webfinger_url).content == b"<html>"
    assert rewritten == ["oidc_refresh", "discovery", "webfinger"]


def test_delay_applies_to_the_token_endpoint(make_standin, http):
    api = make_standin()
    api.delay = 0.2
    started = time.monotonic()
    password_login(http, api)
    assert time.monotonic() - started >= 0.2


# -- the API with both kinds of token ---------------------------------------------------------

def test_api_accepts_one_oidc_token_for_every_videomanager(make_standin, http):
    api = make_standin(forbidden=["1003"])
    token = password_login(http, api)["access_token"]
    listing = http.get(api.url, headers={"Authorization": f"Bearer {token}"})
    assert [vm["id"] for vm in listing.json()] == ["1001", "1002", "1003"]
    assert videos(http, api, token, "1001") == videos(http, api, token, "1002") == 200
    created = http.post(f"{api.url}/1002/videos", headers={"Authorization": f"Bearer {token}"})
    assert created.status_code == 201
    assert videos(http, api, token, "1003") == 403  # the user has no rights there
    assert videos(http, api, token, "9999") == 403  # not the user's VideoManager
    assert api.token_valid(token) and api.token_valid(token, "1002")
    assert not api.token_valid(token, "1003") and not api.token_valid(token, "9999")
    assert api.counts["api"] == 6 and api.counts["api_rejected"] == 2


def test_legacy_tokens_still_cover_their_own_videomanager_only(make_standin, http):
    api = make_standin()
    login = http.post(f"{api.url}/auth/login",
                      json={"username": api.username, "password": api.password}).json()
    token = login["accessToken"]
    assert header(token)["alg"] == "HS256" and claims(token)["vm"] == "1001"
    assert videos(http, api, token, "1001") == 200 and videos(http, api, token, "1002") == 403
    assert api.token_valid(token, "1001") and not api.token_valid(token, "1002")
    sales = http.post(f"{api.url}/auth/refresh/1002",
                      json={"refreshToken": login["refreshToken"]}).json()
    assert sales["validForVideoManager"] == 1002 and sales["refreshToken"] == login["refreshToken"]
    assert api.counts["login"] == api.counts["refresh"] == 1
    assert api.counts["login_ok"] == api.counts["refresh_ok"] == 1
    assert "token" not in api.counts and api._oidc_allows(token, None) is False
    # The legacy refresh does not take an OIDC refresh token, nor the reverse.
    oidc = password_login(http, api)
    assert http.post(f"{api.url}/auth/refresh/1001",
                     json={"refreshToken": oidc["refresh_token"]}).status_code == 401
    assert refresh(http, api, login["refreshToken"]).status_code == 400
    assert [kind for _, kind in api.requests] == ["login", "refresh", "oidc_login",
                                                   "refresh", "oidc_refresh"]


def test_legacy_rotation_counts_a_reused_refresh_token(make_standin, http):
    api = make_standin(rotate_refresh_tokens=True)
    login = http.post(f"{api.url}/auth/login",
                      json={"username": api.username, "password": api.password}).json()
    first = http.post(f"{api.url}/auth/refresh/1002", json={"refreshToken": login["refreshToken"]})
    assert first.status_code == 200 and first.json()["refreshToken"] != login["refreshToken"]
    again = http.post(f"{api.url}/auth/refresh/1002", json={"refreshToken": login["refreshToken"]})
    # used, so revoked, and still a reuse: counted, as on the OIDC side (make soak's check)
    assert again.status_code == 401 and api.counts["refresh_reused"] == 1
    assert again.json()["message"] == "Refresh token already used"
    api.expire_refresh_tokens()  # revoked, never used: not a reuse
    expired = http.post(f"{api.url}/auth/refresh/1002",
                        json={"refreshToken": first.json()["refreshToken"]})
    assert expired.status_code == 401 and api.counts["refresh_reused"] == 1
    api.fail(503, count=1, endpoints=("refresh",))
    assert http.post(f"{api.url}/auth/refresh/1002", json={}).status_code == 503


# -- authorization code + PKCE ----------------------------------------------------------------

def authorize(http: httpx.Client, api: StandIn, **params: str) -> httpx.Response:
    base = {"response_type": "code", "client_id": "anonymous",
            "redirect_uri": "http://127.0.0.1:53682/callback", "state": "st-1",
            "nonce": "n-1", "scope": "openid"}
    return http.get(f"{api.issuer}/protocol/openid-connect/auth",
                    params={k: v for k, v in {**base, **params}.items() if v is not None})


def submit_login(http: httpx.Client, api: StandIn, page: httpx.Response, action: str = "login",
                 password: str | None = None) -> httpx.Response:
    form = dict(re.findall(r'<input type="hidden" name="(\w+)" value="([^"]*)"', page.text))
    found = re.search(r'<form id="kc-form-login" method="post" action="([^"]+)"', page.text)
    assert found is not None
    action_url = found.group(1)
    return http.post(api.origin + action_url, data={
        **form, "username": api.username, "password": password or api.password,
        "action": action})


def redirect_params(response: httpx.Response) -> tuple[str, dict[str, str]]:
    assert response.status_code == 302, response.text
    location = urlsplit(response.headers["location"])
    return (f"{location.scheme}://{location.netloc}{location.path}",
            {k: v[0] for k, v in parse_qs(location.query).items()})


def exchange(http: httpx.Client, api: StandIn, code: str, verifier: str | None,
             redirect_uri: str = "http://127.0.0.1:53682/callback") -> httpx.Response:
    data = {"grant_type": "authorization_code", "client_id": "anonymous", "code": code,
            "redirect_uri": redirect_uri}
    if verifier is not None:
        data["code_verifier"] = verifier
    return token_request(http, api, data)


def test_authorization_code_with_pkce(make_standin, http):
    api = make_standin()
    verifier, challenge = pkce()
    page = authorize(http, api, code_challenge=challenge, code_challenge_method="S256")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for field in ('id="username"', 'id="password"', ">Log in</button>", ">Deny</button>"):
        assert field in page.text
    # A wrong password shows the form again, with a message.
    retry = submit_login(http, api, page, password="wrong")
    assert retry.status_code == 200 and "Invalid username or password." in retry.text
    where, params = redirect_params(submit_login(http, api, retry))
    assert where == "http://127.0.0.1:53682/callback" and params["state"] == "st-1"
    assert params["iss"] == api.issuer and params["code"]
    assert exchange(http, api, params["code"], verifier + "x").status_code == 400
    # A failed exchange used the code up (single use); start again, and get it right.
    page = authorize(http, api, code_challenge=challenge, code_challenge_method="S256")
    _, params = redirect_params(submit_login(http, api, page))
    answer = exchange(http, api, params["code"], verifier)
    assert answer.status_code == 200, answer.text
    tokens = answer.json()
    assert claims(tokens["id_token"])["nonce"] == "n-1"
    assert tokens["session_state"] == params["session_state"]
    assert api.token_valid(tokens["access_token"], "1003")
    # Refreshing keeps the nonce of the login in the ID token, as Keycloak does.
    assert claims(refresh(http, api, tokens["refresh_token"]).json()["id_token"])["nonce"] == "n-1"
    # A replayed code: refused, and what it gave is revoked (RFC 6749 4.1.2).
    replay = exchange(http, api, params["code"], verifier)
    assert oauth_error(replay) == (400, "invalid_grant", "Code not valid")
    assert not api.token_valid(tokens["access_token"]) and api.counts["code_replayed"] == 1
    assert api.counts["oidc_code"] == 3 and api.counts["oidc_code_ok"] == 1
    assert api.counts["authorize_ok"] == 2 and api.counts["authorize_failed"] == 1


@pytest.mark.parametrize(("change", "description"), [
    ({"verifier": None}, "PKCE code verifier not specified"),
    ({"verifier": "short"}, "PKCE verification failed: Invalid code verifier"),
    ({"verifier": "a" * 43}, "PKCE verification failed: Code mismatch"),
    ({"redirect_uri": "http://127.0.0.1:53683/callback"}, "Incorrect redirect_uri"),
    ({"code": "made-up"}, "Code not valid"),
])
def test_code_exchange_checks(make_standin, http, change, description):
    api = make_standin()
    verifier, challenge = pkce()
    page = authorize(http, api, code_challenge=challenge, code_challenge_method="S256")
    _, params = redirect_params(submit_login(http, api, page))
    response = exchange(http, api, change.get("code", params["code"]),
                        change.get("verifier", verifier),
                        change.get("redirect_uri", "http://127.0.0.1:53682/callback"))
    assert oauth_error(response) == (400, "invalid_grant", description)


def test_code_expires(make_standin, http):
    api = make_standin()
    api.code_lifetime = 0
    _, params = redirect_params(submit_login(http, api, authorize(http, api)))
    assert oauth_error(exchange(http, api, params["code"], None))[2] == "Code is expired"


def test_authorization_request_errors(make_standin, http):
    strict = OidcClient("strict", pkce_required=True,
                        redirect_uris=("https://app.example.com/cb",), loopback_redirects=False)
    api = make_standin(clients=[OidcClient(), strict])
    # Who the client is or where to send it back is in doubt: a page, never a redirect.
    assert authorize(http, api, client_id="nobody").status_code == 400
    assert authorize(http, api, redirect_uri="https://evil.example/cb").status_code == 400
    assert authorize(http, api, redirect_uri="http://localhost:5000/cb").status_code == 400
    assert authorize(http, api, client_id="strict").status_code == 400  # no loopback for it
    # Any loopback port for the public client (RFC 8252 7.3), IPv6 too.
    for uri in ("http://127.0.0.1:1/", "http://127.0.0.1:65000/x?y=1", "http://[::1]:8080/cb"):
        assert authorize(http, api, redirect_uri=uri).status_code == 200, uri
    where, params = redirect_params(authorize(http, api, client_id="strict",
                                              redirect_uri="https://app.example.com/cb"))
    assert where == "https://app.example.com/cb" and params["error"] == "invalid_request"
    assert params["state"] == "st-1"
    _, params = redirect_params(authorize(http, api, code_challenge=pkce()[1],
                                          code_challenge_method="plain"))
    assert params["error"] == "invalid_request"
    _, params = redirect_params(authorize(http, api, response_type="token"))
    assert params["error"] == "unsupported_response_type"
    # With PKCE the strict client gets its form.
    assert authorize(http, api, client_id="strict", redirect_uri="https://app.example.com/cb",
                     code_challenge=pkce()[1], code_challenge_method="S256").status_code == 200


def test_user_denies(make_standin, http):
    api = make_standin()
    page = authorize(http, api, redirect_uri="http://127.0.0.1:40000/cb?keep=1")
    where, params = redirect_params(submit_login(http, api, page, action="deny"))
    assert where == "http://127.0.0.1:40000/cb"
    assert params["error"] == "access_denied" and params["state"] == "st-1"
    assert params["keep"] == "1" and "code" not in params
    assert api.counts["authorize_denied"] == 1
    # The login request is used up.
    assert submit_login(http, api, page).status_code == 400


# -- device code ------------------------------------------------------------------------------

def device_start(http: httpx.Client, api: StandIn, client_id: str = "anonymous") -> dict:
    response = http.post(f"{api.issuer}/protocol/openid-connect/auth/device",
                         data={"client_id": client_id, "scope": "openid"})
    assert response.status_code == 200, response.text
    return response.json()


def poll(http: httpx.Client, api: StandIn, device_code: str) -> httpx.Response:
    return token_request(http, api, {"grant_type": DEVICE_GRANT, "client_id": "anonymous",
                                     "device_code": device_code})


def test_device_flow_with_the_verification_page(make_standin, http):
    api = make_standin()
    api.device_interval = 0
    start = device_start(http, api)
    assert set(start) == {"device_code", "user_code", "verification_uri",
                          "verification_uri_complete", "expires_in", "interval"}
    assert start["verification_uri"] == f"{api.issuer}/device"
    assert start["verification_uri_complete"] == (
        f"{api.issuer}/device?{urlencode({'user_code': start['user_code']})}")
    assert re.fullmatch(r"[B-DF-HJ-NP-TV-XZ]{4}-[B-DF-HJ-NP-TV-XZ]{4}", start["user_code"])
    assert start["expires_in"] == 600 and start["interval"] == 0
    assert oauth_error(poll(http, api, start["device_code"]))[:2] == (
        400, "authorization_pending")
    page = http.get(start["verification_uri_complete"])
    assert page.status_code == 200 and start["user_code"] in page.text
    for field in ('id="username"', 'id="password"', ">Log in</button>", ">Deny</button>"):
        assert field in page.text
    # The user types the code in lower case without the dash, and a wrong password first.
    typed = start["user_code"].replace("-", "").lower()
    wrong = http.post(start["verification_uri"], data={
        "user_code": typed, "username": api.username, "password": "no", "action": "login"})
    assert "Invalid username or password." in wrong.text
    bad_code = http.post(start["verification_uri"], data={
        "user_code": "BBBB-BBBB", "username": api.username, "password": api.password,
        "action": "login"})
    assert "Invalid code" in bad_code.text
    done = http.post(start["verification_uri"], data={
        "user_code": typed, "username": api.username, "password": api.password,
        "action": "login"})
    assert done.status_code == 200 and "You can return to your device." in done.text
    tokens = poll(http, api, start["device_code"])
    assert tokens.status_code == 200 and api.token_valid(tokens.json()["access_token"], "1002")
    assert oauth_error(poll(http, api, start["device_code"]))[:2] == (400, "invalid_grant")
    assert api.counts["device_authorization"] == 1 and api.counts["device_approved"] == 1
    assert api.counts["oidc_device"] == 3 and api.counts["oidc_device_ok"] == 1


def test_device_flow_denied_and_approved_by_control(make_standin, http):
    api = make_standin()
    api.device_interval = 0
    denied = device_start(http, api)
    page = http.post(denied["verification_uri"],
                     data={"user_code": denied["user_code"], "action": "deny"})
    assert "Access denied" in page.text
    assert oauth_error(poll(http, api, denied["device_code"]))[:2] == (400, "access_denied")
    approved = device_start(http, api)
    assert api.approve_device(approved["user_code"])
    assert not api.approve_device(approved["user_code"])  # no longer pending
    assert poll(http, api, approved["device_code"]).status_code == 200
    assert not api.approve_device("ZZZZ-ZZZZ")


def test_device_flow_slow_down_and_expiry(make_standin, http):
    api = make_standin()
    api.device_interval = 1
    api.slow_down_increment = 2
    start = device_start(http, api)
    assert start["interval"] == 1
    assert oauth_error(poll(http, api, start["device_code"]))[1] == "authorization_pending"
    assert oauth_error(poll(http, api, start["device_code"]))[1] == "slow_down"
    assert api.counts["device_slow_down"] == 1
    time.sleep(1.1)  # the interval is 3 s now: still too fast
    assert oauth_error(poll(http, api, start["device_code"]))[1] == "slow_down"
    api.device_code_lifetime = 0
    expired = device_start(http, api)
    assert oauth_error(poll(http, api, expired["device_code"])) == (
        400, "expired_token", "Device code is expired")


def test_device_authorization_errors(make_standin, http):
    api = make_standin(clients=[OidcClient(), OidcClient("no-device",
                                                         grants=frozenset({"password"}))])
    url = f"{api.issuer}/protocol/openid-connect/auth/device"
    assert oauth_error(http.post(url, data={"client_id": "nobody"}))[:2] == (
        401, "invalid_client")
    assert oauth_error(http.post(url, data={"client_id": "no-device"}))[:2] == (
        400, "unauthorized_client")
    api.fail(503, count=1, endpoints=("device_authorization",))
    assert http.post(url, data={"client_id": "anonymous"}).status_code == 503
    other = device_start(http, api)
    stolen = token_request(http, api, {"grant_type": DEVICE_GRANT, "client_id": "no-device",
                                       "device_code": other["device_code"]})
    assert oauth_error(stolen)[:2] == (400, "unauthorized_client")


# -- running alone ----------------------------------------------------------------------------

@pytest.mark.parametrize("legacy_only", [False, True])
def test_python_m_standin_prints_its_url(legacy_only):
    argv = [sys.executable, "-m", "standin", "--device-interval", "1"]
    proc = subprocess.Popen(argv + (["--legacy-only"] if legacy_only else []),
                            stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/v1/vms", url)
        origin = url.removesuffix("/v1/vms")
        with httpx.Client(timeout=10) as http:
            finger = http.get(f"{origin}/.well-known/webfinger",
                              params={"resource": f"{origin}/v1/"})
            assert finger.status_code == (404 if legacy_only else 200)
            login = http.post(f"{url}/auth/login",
                              json={"username": "demo", "password": "demo-password"})
            assert login.status_code == 200
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0
        assert proc.stdout is not None
        proc.stdout.close()


def test_interactive_pages_take_faults_and_count(make_standin, http):
    api = make_standin()
    api.fail(503, count=2, endpoints=("authorize", "verification"))
    assert authorize(http, api).status_code == 503
    assert http.get(f"{api.issuer}/device").status_code == 503
    assert authorize(http, api).status_code == 200
    assert http.get(f"{api.issuer}/device").status_code == 200
    assert api.counts["authorize"] == api.counts["verification"] == 2


def test_a_lost_answer_takes_effect_and_never_comes(make_standin, http):
    """`rewrite` returning LOST (make soak's lost answers): the refresh is done — its
    refresh token used, a new one issued — and the client gets no answer at all."""
    api = make_standin(rotate_refresh_tokens=True)
    login = http.post(f"{api.url}/auth/login",
                      json={"username": api.username, "password": api.password}).json()
    api.rewrite = lambda endpoint, answer: LOST if endpoint == "refresh" else answer
    with pytest.raises(httpx.RemoteProtocolError):
        http.post(f"{api.url}/auth/refresh/1002", json={"refreshToken": login["refreshToken"]})
    assert api.counts["refresh_ok"] == 1
    api.rewrite = None  # sending it again is a reuse
    again = http.post(f"{api.url}/auth/refresh/1002", json={"refreshToken": login["refreshToken"]})
    assert again.status_code == 401 and api.counts["refresh_reused"] == 1
