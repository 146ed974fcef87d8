"""Whole-process tests of the OpenID Connect login (issue 10) against a real authorization
server written by others: django-oauth-toolkit (tests/oidc_peer/), with refresh-token
rotation and reuse protection on.

vm-tokend gets only `api_url`, a username and a password; it must find the issuer through the
peer's WebFinger, log in, and keep one token fresh for every VideoManager. The peer deletes
the previous access token at each refresh (unlike Keycloak), so a client that got a token just
before a refresh may find it refused: the check below then asks again and counts it, and the
token it gets then must be accepted.
"""

from __future__ import annotations

import sqlite3
import time
from contextlib import closing

import httpx
import pytest
import trio

import vm_token
from tests.e2e.test_oidc import (
    VMS,
    assert_nothing_secret_logged,
    in_thread,
    refresh_bounds,
    refresh_period,
    run_crowd,
    status_json,
)
from tests.oidc_peer.fixture import DB_NAME

pytestmark = pytest.mark.timeout(120)


def peer_env(peer) -> dict[str, str]:
    return {"VM_TOKEN_API_URL": peer.api_url, "VM_TOKEN_USERNAME": peer.username,
            "VM_TOKEN_PASSWORD": peer.password}


def videos(peer, token: str, vm: str) -> httpx.Response:
    return httpx.get(f"{peer.api_url}/{vm}/videos", headers={"Authorization": f"Bearer {token}"},
                     timeout=10)


def peer_tokens(peer) -> list[str]:
    """Every access and refresh token the peer still knows (rotated refresh tokens stay,
    marked revoked), read from its database."""
    with closing(sqlite3.connect(peer.data_dir / DB_NAME)) as db:
        rows = [*db.execute("SELECT token FROM oauth2_provider_accesstoken"),
                *db.execute("SELECT token FROM oauth2_provider_refreshtoken")]
    return [token for (token,) in rows]


def token_checker(peer, daemon):
    """check(token, vm) for run_crowd: each (token, VideoManager) is shown to the API once;
    a refusal is forgiven only if the daemon has moved on to a token the API accepts."""
    verdicts: dict[tuple[str, str], bool] = {}
    raced: list[str] = []

    async def check(token: str, vm: str) -> str | None:
        key = (token, vm)
        if key not in verdicts:
            verdicts[key] = False  # other clients with it wait for the verdict below
            response = await in_thread(videos, peer, token, vm)
            verdicts[key] = response.status_code == 200
            if response.status_code != 200:
                async with vm_token.AsyncClient(daemon.socket) as again:
                    fresh = await again.get_token(vm)
                if fresh.access_token == token:
                    return f"the API refuses the daemon's current token ({response.status_code})"
                if (await in_thread(videos, peer, fresh.access_token, vm)).status_code != 200:
                    return "the API refuses the token after a refresh too"
                raced.append(vm)
        return None

    return check, raced


async def test_webfinger_finds_the_peer_and_one_token_serves_every_videomanager(
        oidc_peer, start_daemon):
    peer = oidc_peer
    daemon = start_daemon(None, env=peer_env(peer))
    with trio.fail_after(30), daemon.client() as client:
        tokens = {vm: await in_thread(client.get_token, vm) for vm in VMS}
        for vm, token in tokens.items():
            assert token.videomanager_id == vm
            assert await in_thread(peer.token_valid, token.access_token)
            response = await in_thread(videos, peer, token.access_token, vm)
            assert response.status_code == 200
            assert response.json()["user"] == peer.username
        assert len({t.access_token for t in tokens.values()}) == 1
        listing = await in_thread(client.list_videomanagers)
        status = await in_thread(client.status)
    assert [(v.id, v.name) for v in listing] == [("1001", "Marketing"), ("1002", "Sales"),
                                                  ("1003", "Support")]
    assert status["auth"] == "oidc"
    assert status["issuer"] == peer.issuer
    assert status["client_id"] == peer.client_id == "anonymous"
    assert status["state"] == "logged_in"
    assert peer.grants("password") == 1 and peer.grants("refresh_token") == 0
    assert peer.counts()["token"]["error"] == {}
    text = daemon.cli("status")
    assert "oidc" in text.stdout and peer.issuer in text.stdout, text.stdout
    assert_nothing_secret_logged(daemon, [*peer_tokens(peer), peer.password])


async def test_sixty_clients_while_the_peer_rotates_refresh_tokens(oidc_peer_factory,
                                                                  start_daemon):
    lifetime, window = 4, 10.0
    peer = oidc_peer_factory(access_lifetime=lifetime)
    daemon = start_daemon(None, env=peer_env(peer))
    with trio.fail_after(60):
        with daemon.client() as client:
            await in_thread(client.get_token)
        assert peer.grants("password") == 1
        refreshes_before = peer.grants("refresh_token")
        check, raced = token_checker(peer, daemon)
        started = time.monotonic()
        crowd = await run_crowd(daemon.socket, 60, window, check)
        ended = time.monotonic()
        refreshes = peer.grants("refresh_token") - refreshes_before
        status = status_json(daemon)
    assert not crowd.failures, crowd.failures[:5]
    assert all(n >= 60 for n in crowd.served.values()), crowd.served
    assert peer.errors("invalid_grant") == 0  # reuse protection never tripped
    assert peer.counts()["token"]["error"] == {}
    assert peer.grants("password") == 1  # never a re-login
    # One refresh per refresh period (DOT's tokens are opaque: expires_in alone says), ±1.
    elapsed = ended - started
    low, high = refresh_bounds(elapsed, lifetime)
    assert low <= refreshes <= high, (refreshes, low, high)
    # Each refresh shows as a new token: they come one per period, not three at once.
    firsts = sorted(crowd.first_seen.values())
    gaps = [b - a for a, b in zip(firsts, firsts[1:], strict=False)]
    assert len(crowd.first_seen) <= refreshes + 2
    # (first seen by clients that ask every 0.2 s: up to ~0.3 s late)
    assert not gaps or min(gaps) >= refresh_period(lifetime)[0] - 0.5, gaps
    assert status["state"] == "logged_in" and status["auth"] == "oidc"
    print(f"DOT: {refreshes} refreshes in {elapsed:.1f} s (bounds {low}..{high}), new tokens "
          f"{[round(g, 2) for g in gaps]} s apart, {sum(crowd.served.values())} served, "
          f"{len(raced)} refused-at-rotation re-asks")
    assert_nothing_secret_logged(daemon, [*peer_tokens(peer), *crowd.first_seen,
                                          peer.password])


async def test_a_revoked_refresh_token_leads_to_exactly_one_relogin(oidc_peer_factory,
                                                                    start_daemon):
    peer = oidc_peer_factory(access_lifetime=3)
    daemon = start_daemon(None, env=peer_env(peer))
    with trio.fail_after(60):
        with daemon.client() as client:
            await in_thread(client.get_token)
        assert peer.grants("password") == 1
        check, _ = token_checker(peer, daemon)
        revoked: list[int] = []

        async def revoke_soon() -> None:
            await trio.sleep(0.3)
            # Between two token requests (the peer serializes them); access tokens live on.
            revoked.append(await in_thread(peer.revoke_refresh_tokens))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(revoke_soon)
            crowd = await run_crowd(daemon.socket, 12, 6.0, check, pause=0.3)
        counts = peer.counts()["token"]
        status = status_json(daemon)
    assert revoked and revoked[0] >= 1
    assert not crowd.failures, crowd.failures[:5]
    assert all(n >= 5 for n in crowd.served.values()), crowd.served
    assert counts["grant_type"].get("password") == 2  # exactly one re-login
    # The one refresh that found its token gone; nothing else failed.
    assert counts["error"] == {"invalid_grant": 1}, counts
    assert counts["grant_type_error"] == {"refresh_token invalid_grant": 1}, counts
    assert status["state"] == "logged_in"
    assert_nothing_secret_logged(daemon, [*peer_tokens(peer), *crowd.first_seen,
                                          peer.password])
