"""The ID token of an interactive login, checked before anyone is logged in (issue 15,
point 2): `azp` when `aud` has several entries (OpenID Connect Core 3.1.3.7), and who it
names, for a profile's `username`."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import pytest

from vm_tokend.upstream.base import Grant
from vm_tokend.upstream.interactive_grants import LoginFailed, identity

ISSUER = "https://login.example/realms/platform"
CLIENT = "vm-token"


class Api:
    """What identity() asks of the OIDC backend."""

    issuer = ISSUER
    client_id = CLIENT

    async def userinfo(self, access_token: str) -> dict[str, Any]:
        return {}


def id_token(**claims: Any) -> str:
    body = {"iss": ISSUER, "aud": CLIENT, "sub": "f0e1", "nonce": "n",
            "exp": int(time.time()) + 300, "preferred_username": "demo", **claims}
    body = {k: v for k, v in body.items() if v is not None}

    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()
    return f"{part({'alg': 'RS256'})}.{part(body)}.signature"


def grant(token: str) -> Grant:
    return Grant(access_token="at", refresh_token="rt", videomanagers=(), valid_for=None,
                 lifetime=300, refresh_lifetime=None, requested_at=0.0, id_token=token)


async def who(**claims: Any) -> str:
    found = await identity(grant(id_token(**claims)), Api(), "n")  # type: ignore[arg-type]
    return found.name


async def test_one_audience_without_azp_is_fine():
    assert await who() == "demo"
    assert await who(aud=[CLIENT]) == "demo"


async def test_several_audiences_need_azp_naming_us():
    assert await who(aud=[CLIENT, "account"], azp=CLIENT) == "demo"
    with pytest.raises(LoginFailed, match="several audiences.*no azp"):
        await who(aud=[CLIENT, "account"])
    with pytest.raises(LoginFailed, match="issued to the client 'other'"):
        await who(aud=[CLIENT, "account"], azp="other")


async def test_an_azp_that_is_there_must_be_us():
    with pytest.raises(LoginFailed, match=r"issued to the client 'other' \(azp\)"):
        await who(azp="other")
    assert await who(azp=CLIENT) == "demo"


async def test_a_profile_username_matches_any_of_the_names_without_case():
    found = await identity(grant(id_token(email="Demo@Example.com", email_verified=True)),
                           Api(), "n")  # type: ignore[arg-type]
    assert found.is_user("DEMO") and found.is_user("demo@example.com")
    assert not found.is_user("mallory")
    nobody = await identity(grant(id_token(preferred_username=None, sub=None)), Api(), "n")  # type: ignore[arg-type]
    assert nobody.name == "(unknown user)" and not nobody.is_user("demo")


class ApiWithUserinfo(Api):
    def __init__(self, info: dict[str, Any]) -> None:
        self.info = info

    async def userinfo(self, access_token: str) -> dict[str, Any]:
        return self.info


async def test_userinfo_adds_names_of_the_same_subject_only():
    """An ID token without email; the profile's username is the email: userinfo says it,
    but only for the very subject the ID token names."""
    found = await identity(grant(id_token()), Api(), "n")  # type: ignore[arg-type]
    assert not found.is_user("demo@example.com")
    same = ApiWithUserinfo({"sub": "f0e1", "email": "demo@example.com", "email_verified": True})
    assert (await found.with_userinfo(grant(id_token()), same)).is_user(  # type: ignore[arg-type]
        "demo@example.com")
    other = ApiWithUserinfo({"sub": "someone-else", "email": "demo@example.com",
                             "email_verified": True})
    assert not (await found.with_userinfo(grant(id_token()), other)).is_user(  # type: ignore[arg-type]
        "demo@example.com")


async def test_an_unverified_email_proves_no_username():
    """Anyone may type the victim's address into their own profile: unverified, it is shown
    but never matched against the profile's username."""
    for verified in (None, False, "true"):
        claims: dict[str, Any] = {"email": "demo@example.com", "preferred_username": "mallory"}
        if verified is not None:
            claims["email_verified"] = verified
        found = await identity(grant(id_token(**claims)), Api(), "n")  # type: ignore[arg-type]
        assert not found.is_user("demo@example.com") and found.is_user("mallory")
    unverified = ApiWithUserinfo({"sub": "f0e1", "email": "demo@example.com"})
    found = await identity(grant(id_token()), Api(), "n")  # type: ignore[arg-type]
    assert not (await found.with_userinfo(grant(id_token()), unverified)).is_user(  # type: ignore[arg-type]
        "demo@example.com")


async def test_a_username_that_is_an_address_still_counts_when_the_email_is_unverified():
    """Keycloak's "email as username": preferred_username is the address, and it proves."""
    found = await identity(grant(id_token(preferred_username="demo@example.com",
                                          email="demo@example.com")), Api(), "n")  # type: ignore[arg-type]
    assert found.is_user("demo@example.com")
