"""The OIDC peer (django-oauth-toolkit on loopback) behaves as the interop tests assume.

Plain httpx against the real server, no mocks: if one of these fails, the end-to-end tests
built on the peer would prove nothing.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from tests.oidc_peer.fixture import OidcPeer, start_peer

ISSUER_REL = "http://openid.net/specs/connect/1.0/issuer"


@pytest.fixture(scope="module")
def peer(oidc_peer_template: Path) -> Iterator[OidcPeer]:
    """One server for this module's tests (each test makes its own tokens)."""
    data_dir = Path(tempfile.mkdtemp(prefix="oidc-peer-"))
    started = start_peer(data_dir, oidc_peer_template, access_lifetime=60)
    try:
        yield started
    finally:
        started.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def _b64decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def _verified_claims(peer: OidcPeer, id_token: str) -> dict[str, Any]:
    """The ID token's claims, after checking its RS256 signature against the peer's JWKS."""
    header_b64, claims_b64, signature_b64 = id_token.split(".")
    header = json.loads(_b64decode(header_b64))
    assert header["alg"] == "RS256"
    jwks = httpx.get(peer.discovery["jwks_uri"]).json()
    [jwk] = [key for key in jwks["keys"] if key["kid"] == header["kid"]]
    public_key = rsa.RSAPublicNumbers(
        int.from_bytes(_b64decode(jwk["e"])), int.from_bytes(_b64decode(jwk["n"]))
    ).public_key()
    public_key.verify(_b64decode(signature_b64), f"{header_b64}.{claims_b64}".encode(),
                      padding.PKCS1v15(), hashes.SHA256())
    claims: dict[str, Any] = json.loads(_b64decode(claims_b64))
    return claims


def test_webfinger_answers_like_the_vendor(peer: OidcPeer) -> None:
    response = httpx.get(peer.webfinger_url, params={"resource": f"{peer.url}/v1/"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/jrd+json"
    assert response.headers["cache-control"] == "max-age=300"
    jrd = response.json()
    assert jrd["subject"] == f"{peer.url}/v1/"
    assert jrd["properties"] == {
        f"{peer.url}/v1/keycloak/realm": "oidc-peer",
        f"{peer.url}/v1/keycloak/auth-server-url": f"{peer.url}/o/",
    }
    [link] = jrd["links"]
    assert link == {"rel": ISSUER_REL, "href": peer.discovery_url}
    # the href is the discovery document itself, as the vendor's is
    assert link["href"] == f"{peer.issuer}/.well-known/openid-configuration"

    unknown = httpx.get(peer.webfinger_url, params={"resource": f"{peer.url}/v2/"})
    assert unknown.status_code == 404
    assert httpx.get(peer.webfinger_url).status_code == 400


def test_discovery_document(peer: OidcPeer) -> None:
    document = httpx.get(peer.discovery_url).json()
    assert document["issuer"] == peer.issuer == f"{peer.url}/o"
    assert document["token_endpoint"] == f"{peer.url}/o/token/"
    assert document["authorization_endpoint"] == f"{peer.url}/o/authorize/"
    assert document["jwks_uri"] == f"{peer.url}/o/.well-known/jwks.json"
    assert document["device_authorization_endpoint"] == f"{peer.url}/o/device-authorization/"
    assert "S256" in document["code_challenge_methods_supported"]
    assert {"openid", "offline_access"} <= set(document["scopes_supported"])
    # DOT also answers the deprecated form with a trailing slash, with the same document
    assert httpx.get(peer.discovery_url + "/").json() == document
    jwks = httpx.get(document["jwks_uri"]).json()
    assert [key["kty"] for key in jwks["keys"]] == ["RSA"]


def test_password_grant_as_the_vendor_client_sends_it(peer: OidcPeer) -> None:
    response = peer.password_grant()
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    token = response.json()
    assert token["token_type"] == "Bearer"
    assert token["expires_in"] == 60
    assert token["scope"] == "openid"
    assert token["access_token"] and token["refresh_token"]
    # what a client must do without: DOT sends no refresh_expires_in, and no id_token for
    # the password grant (oauthlib's password grant is plain OAuth 2)
    assert "refresh_expires_in" not in token
    assert "id_token" not in token
    assert peer.token_valid(token["access_token"])


@pytest.mark.parametrize(("fields", "status", "error"), [
    ({"password": "wrong"}, 400, "invalid_grant"),
    ({"username": "nobody"}, 400, "invalid_grant"),
    ({"client_id": "no-such-client"}, 401, "invalid_client"),
    ({"client_id": "vm-token-code"}, 400, "unauthorized_client"),  # its grant is the code
    ({"grant_type": "client_credentials"}, 400, "unauthorized_client"),
    ({"grant_type": "urn:example:nothing"}, 400, "unsupported_grant_type"),
    ({"scope": "openid bogus"}, 400, "invalid_scope"),
])
def test_token_endpoint_errors(peer: OidcPeer, fields: dict[str, str], status: int,
                               error: str) -> None:
    response = peer.password_grant(**fields)
    assert (response.status_code, response.json()["error"]) == (status, error)


def test_refresh_rotates_and_reuse_ends_the_family(peer: OidcPeer) -> None:
    first = peer.password_grant().json()
    second_response = peer.refresh_grant(first["refresh_token"])
    assert second_response.status_code == 200, second_response.text
    second = second_response.json()
    assert second["refresh_token"] != first["refresh_token"]
    assert second["access_token"] != first["access_token"]
    assert second["expires_in"] == 60
    # DOT deletes the previous access token when it rotates (Keycloak lets it live on)
    assert not peer.token_valid(first["access_token"])
    assert peer.token_valid(second["access_token"])
    # the refresh grant does carry an ID token (scope openid), signed with the JWKS key
    claims = _verified_claims(peer, second["id_token"])
    assert claims["iss"] == peer.issuer
    assert claims["aud"] == peer.client_id

    reused = peer.refresh_grant(first["refresh_token"])
    assert (reused.status_code, reused.json()) == (400, {"error": "invalid_grant"})
    # reuse protection: the whole family is revoked, the newest refresh token too
    newest = peer.refresh_grant(second["refresh_token"])
    assert (newest.status_code, newest.json()) == (400, {"error": "invalid_grant"})
    assert not peer.token_valid(second["access_token"])


def test_api_stand_in_accepts_tokens_and_refuses_garbage(peer: OidcPeer) -> None:
    token = peer.password_grant().json()["access_token"]
    bearer = {"Authorization": f"Bearer {token}"}
    vms = httpx.get(peer.api_url, headers=bearer)
    assert vms.status_code == 200
    assert vms.json() == [{"id": "1001", "name": "Marketing"}, {"id": "1002", "name": "Sales"},
                          {"id": "1003", "name": "Support"}]
    videos = httpx.get(f"{peer.api_url}/1002/videos", headers=bearer)
    assert videos.status_code == 200
    assert videos.json()["videos"][0]["id"] == "video-1002-1"
    assert httpx.get(f"{peer.api_url}/9999/videos", headers=bearer).status_code == 403

    for headers in ({}, {"Authorization": "Bearer garbage"}, {"Authorization": token}):
        refused = httpx.get(peer.api_url, headers=headers)
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"] == 'Bearer error="invalid_token"'
        assert "message" in refused.json()
    assert httpx.get(f"{peer.api_url}/1001/videos").status_code == 401


def test_revoke_refresh_tokens(peer: OidcPeer) -> None:
    token = peer.password_grant().json()
    assert peer.revoke_refresh_tokens() >= 1
    refused = peer.refresh_grant(token["refresh_token"])
    assert (refused.status_code, refused.json()["error"]) == (400, "invalid_grant")
    # access tokens live on until they expire, and a new login works
    assert peer.token_valid(token["access_token"])
    assert peer.password_grant().status_code == 200


def test_counters_count(peer: OidcPeer) -> None:
    peer.reset_counts()
    token = peer.password_grant().json()
    peer.refresh_grant(token["refresh_token"])
    peer.refresh_grant(token["refresh_token"])  # reused: invalid_grant
    peer.password_grant(password="wrong")
    peer.token_valid("garbage")
    counts = peer.counts()
    assert counts["token"] == {
        "requests": 4,
        "grant_type": {"password": 2, "refresh_token": 2},
        "error": {"invalid_grant": 2},
        "grant_type_error": {"refresh_token invalid_grant": 1, "password invalid_grant": 1},
    }
    assert counts["paths"] == {"/o/token/ 200": 2, "/o/token/ 400": 2, "api 401": 1}
    assert (peer.grants("refresh_token"), peer.errors("invalid_grant")) == (2, 2)
    peer.reset_counts()
    assert peer.counts()["token"]["requests"] == 0


def test_code_flow_with_pkce_through_the_login_page(peer: OidcPeer) -> None:
    """What a browser does, step by step; any loopback port is accepted (RFC 8252)."""
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(
        hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    redirect_uri = "http://127.0.0.1:54321/callback"  # registered without a port
    params = {"response_type": "code", "client_id": peer.code_client_id,
              "redirect_uri": redirect_uri, "scope": "openid", "state": "s-1", "nonce": "n-1",
              "code_challenge": challenge, "code_challenge_method": "S256"}
    with httpx.Client(base_url=peer.url) as browser:
        to_login = browser.get("/o/authorize/", params=params)
        assert to_login.status_code == 302
        assert to_login.headers["location"].startswith("/accounts/login/?next=")
        page = browser.get(to_login.headers["location"])
        csrf = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
        next_url = re.search(r'name="next" value="([^"]*)"', page.text)
        assert csrf and next_url
        logged_in = browser.post(page.url, data={
            "csrfmiddlewaretoken": csrf[1], "username": peer.username,
            "password": peer.password, "next": next_url[1].replace("&amp;", "&")})
        assert logged_in.status_code == 302
        back = browser.get(logged_in.headers["location"])
        assert back.status_code == 302  # no consent page: straight to the client
        callback = httpx.URL(back.headers["location"])
        assert str(callback.copy_with(query=None)) == redirect_uri
        assert callback.params["state"] == "s-1"
        code = callback.params["code"]

        without_pkce = browser.get("/o/authorize/", params={
            k: v for k, v in params.items() if not k.startswith("code_challenge")})
        assert "error=invalid_request" in without_pkce.headers["location"]

    exchange = {"grant_type": "authorization_code", "client_id": peer.code_client_id,
                "code": code, "redirect_uri": redirect_uri, "code_verifier": verifier}
    wrong_verifier = httpx.post(peer.token_endpoint,
                                data={**exchange, "code_verifier": secrets.token_urlsafe(48)})
    assert wrong_verifier.json()["error"] == "invalid_grant"
    # a failed exchange does not burn the code
    token = httpx.post(peer.token_endpoint, data=exchange)
    assert token.status_code == 200, token.text
    claims = _verified_claims(peer, token.json()["id_token"])
    assert (claims["nonce"], claims["iss"], claims["aud"]) == ("n-1", peer.issuer,
                                                               peer.code_client_id)
    assert peer.token_valid(token.json()["access_token"])
    replayed = httpx.post(peer.token_endpoint, data=exchange)
    assert replayed.json()["error"] == "invalid_grant"


def test_device_flow_approved_through_the_providers_pages(peer: OidcPeer) -> None:
    started = httpx.post(peer.device_authorization_endpoint,
                         data={"client_id": peer.device_client_id, "scope": "openid"})
    assert started.status_code == 200, started.text
    grant = started.json()
    assert grant["verification_uri"] == f"{peer.url}/o/device/"
    poll = {"grant_type": "urn:ietf:params:oauth:grant-type:device_code",
            "client_id": peer.device_client_id, "device_code": grant["device_code"]}
    pending = httpx.post(peer.token_endpoint, data=poll)
    assert (pending.status_code, pending.json()["error"]) == (400, "authorization_pending")

    with httpx.Client(base_url=peer.url, follow_redirects=True) as browser:
        def submit(page: httpx.Response, **fields: str) -> httpx.Response:
            csrf = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
            assert csrf, page.text
            return browser.post(page.url, data={"csrfmiddlewaretoken": csrf[1], **fields})

        login = browser.get(grant["verification_uri"])
        assert "/accounts/login/" in str(login.url)
        next_url = re.search(r'name="next" value="([^"]*)"', login.text)
        assert next_url
        code_page = submit(login, username=peer.username, password=peer.password,
                           next=next_url[1])
        confirm = submit(code_page, user_code=grant["user_code"])
        done = submit(confirm, action="accept")
        assert done.status_code == 200

    # no pause of `interval` here: DOT never answers slow_down (a TODO in its views/base.py)
    token = httpx.post(peer.token_endpoint, data=poll)
    assert token.status_code == 200, token.text
    assert peer.token_valid(token.json()["access_token"])


def test_access_lifetime_is_a_parameter(oidc_peer_factory: Any) -> None:
    peer = oidc_peer_factory(access_lifetime=1)
    token = peer.password_grant().json()
    assert token["expires_in"] == 1
    assert peer.token_valid(token["access_token"])
    time.sleep(1.2)
    assert not peer.token_valid(token["access_token"])
    # the refresh token outlives its access token
    assert peer.refresh_grant(token["refresh_token"]).status_code == 200
