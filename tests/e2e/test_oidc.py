"""Whole-process tests of the OpenID Connect login (issue 10) against the stand-in.

The real vm-tokend, the real socket, real HTTP to the stand-in on loopback; no mocks. What is
asserted is what a user sees (tokens the API accepts, `status`, `vm-token`'s output and exit
code) and the stand-in's counters for the "exactly one" promises. tests/e2e/test_oidc_peer_e2e.py
proves the same against django-oauth-toolkit.
"""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import pytest
import trio

import vm_token
from vm_tokend.upstream.base import CLOCK_SLACK

pytestmark = pytest.mark.timeout(90)

VMS = ("1001", "1002", "1003")
REFRESH_AT = 2 / 3  # the keeper refreshes at 2/3 of a token's life ...
JITTER = 0.05  # ... ± 5 % of it (keeper/timing.py), the life being what the server says
# less CLOCK_SLACK (vm_tokend.upstream: whole-second exp/iat, time in flight).


async def in_thread(fn, *args):
    return await trio.to_thread.run_sync(fn, *args)


def http_accepts(api_url: str, token: str, videomanager_id: str) -> bool:
    """Whether `GET {api_url}/{id}/videos` with the token answers 200, over real HTTP."""
    request = urllib.request.Request(f"{api_url}/{videomanager_id}/videos",
                                     headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - loopback
            return response.status == 200
    except urllib.error.HTTPError:
        return False


def oidc_standin(make_standin, **options):
    return make_standin(legacy_only=False, **options)


def status_json(daemon) -> dict:
    done = daemon.cli("status", "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def assert_nothing_secret_logged(daemon, secrets: list[str]) -> None:
    """No token or password in the daemon's log, whole or as its JWT payload."""
    assert daemon.stop() == 0
    log = daemon.log()
    assert daemon.env["VM_TOKEN_LOG_LEVEL"] == "debug"  # the most it ever says
    assert "vm-tokend" in log
    for secret in secrets:
        assert secret not in log
        parts = secret.split(".")
        if len(parts) == 3:
            assert parts[1] not in log


async def wait_for(condition: Callable[[], bool], interval: float = 0.05) -> None:
    """Poll until `condition()` holds (the caller's fail_after bounds it): the stand-in's
    counters are bumped by its own threads, so there is no Event to wait on."""
    while not condition():  # noqa: ASYNC110
        await trio.sleep(interval)


def refresh_period(announced: float) -> tuple[float, float]:
    """The shortest and longest time between two refreshes of a token the server says lives
    `announced` seconds."""
    life = announced - CLOCK_SLACK
    return life * (REFRESH_AT - JITTER), life * (REFRESH_AT + JITTER)


def refresh_bounds(window: float, announced: float) -> tuple[int, int]:
    """How many refreshes keeping one token fresh for `window` seconds takes: the number of
    refresh periods in it, ±1."""
    shortest, longest = refresh_period(announced)
    return math.floor(window / longest) - 1, math.ceil(window / shortest) + 1


@dataclass
class Crowd:
    """What many clients saw: per VideoManager how often they were served, every distinct
    token with when it was first seen, and anything that went wrong."""

    served: dict[str, int] = field(default_factory=lambda: dict.fromkeys(VMS, 0))
    first_seen: dict[str, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


async def run_crowd(socket, clients: int, seconds: float,
                    check: Callable[[str, str], Awaitable[str | None]],
                    pause: float = 0.2) -> Crowd:
    """`clients` clients, each its own connection, asking for VideoManager i % 3 every
    `pause` s for `seconds`; `check(token, vm)` says what is wrong with a token, or None."""
    crowd = Crowd()
    end = time.monotonic() + seconds

    async def one(i: int) -> None:
        vm = VMS[i % 3]
        async with vm_token.AsyncClient(socket, timeout=10, max_connections=1) as client:
            await trio.sleep(pause * i / clients)  # spread over the pause
            while time.monotonic() < end:
                try:
                    token = await client.get_token(vm)
                except vm_token.Error as exc:
                    crowd.failures.append(f"client {i} ({vm}): {exc!r}")
                    return
                crowd.first_seen.setdefault(token.access_token, time.monotonic())
                if token.videomanager_id != vm:
                    crowd.failures.append(f"client {i}: asked {vm}, got {token.videomanager_id}")
                problem = await check(token.access_token, vm)
                if problem:
                    crowd.failures.append(f"client {i} ({vm}): {problem}")
                crowd.served[vm] += 1
                await trio.sleep(pause)

    async with trio.open_nursery() as nursery:
        for i in range(clients):
            nursery.start_soon(one, i)
    return crowd


# -- 1. finding the way to log in -----------------------------------------------------------


async def test_webfinger_finds_oidc_and_one_token_serves_every_videomanager(make_standin,
                                                                           start_daemon):
    standin = oidc_standin(make_standin)
    daemon = start_daemon(standin)  # only api_url, username, password
    with trio.fail_after(30), daemon.client() as client:
        tokens = {vm: await in_thread(client.get_token, vm) for vm in VMS}
        for vm, token in tokens.items():
            assert token.videomanager_id == vm
            assert standin.token_valid(token.access_token, vm)
            assert await in_thread(http_accepts, standin.url, token.access_token, vm)
        # One OIDC token covers every VideoManager: one login, no per-VideoManager token.
        assert len({t.access_token for t in tokens.values()}) == 1
        status = await in_thread(client.status)
        listing = await in_thread(client.list_videomanagers)
    assert status["auth"] == "oidc"
    assert status["issuer"] == standin.issuer
    assert status["client_id"] == "anonymous"
    assert status["state"] == "logged_in"
    assert [v.id for v in listing] == list(VMS)
    assert standin.counts["webfinger"] == 1
    assert standin.counts["oidc_login"] == 1 and standin.counts["oidc_refresh"] == 0
    assert standin.counts["login"] == standin.counts["refresh"] == 0  # no legacy call
    assert status_json(daemon)["auth"] == "oidc"
    text = daemon.cli("status")
    assert text.returncode == 0
    # The issue: `status` says which way the daemon logs in, with the issuer.
    assert "oidc" in text.stdout and standin.issuer in text.stdout, text.stdout
    assert_nothing_secret_logged(daemon, [*standin.issued, standin.password])


async def test_webfinger_with_nothing_finds_the_legacy_endpoints(make_standin, start_daemon):
    standin = make_standin(legacy_only=True)
    daemon = start_daemon(standin)
    with trio.fail_after(30), daemon.client() as client:
        for vm in VMS:
            token = await in_thread(client.get_token, vm)
            assert standin.token_valid(token.access_token, vm)
        status = await in_thread(client.status)
    assert status["auth"] == "legacy"
    assert status["upstream_calls"]["webfinger"] == 1  # it asked, and heard 404
    assert standin.counts["login"] == 1
    assert standin.counts["oidc_login"] == 0


async def test_auth_legacy_skips_webfinger(make_standin, start_daemon):
    standin = oidc_standin(make_standin)  # it does speak OIDC: legacy is the setting's doing
    daemon = start_daemon(standin, env={"VM_TOKEN_AUTH": "legacy"})
    with trio.fail_after(30), daemon.client() as client:
        token = await in_thread(client.get_token, "1002")
        assert standin.token_valid(token.access_token, "1002")
        status = await in_thread(client.status)
    assert status["auth"] == "legacy"
    assert standin.counts["webfinger"] == 0
    assert standin.counts["discovery"] == standin.counts["token"] == 0
    assert standin.counts["login"] == 1


async def test_oidc_issuer_skips_webfinger(make_standin, start_daemon):
    standin = oidc_standin(make_standin)
    daemon = start_daemon(standin, env={"VM_TOKEN_OIDC_ISSUER": standin.issuer})
    with trio.fail_after(30), daemon.client() as client:
        token = await in_thread(client.get_token, "1003")
        assert standin.token_valid(token.access_token, "1003")
        status = await in_thread(client.status)
    assert status["auth"] == "oidc" and status["issuer"] == standin.issuer
    assert standin.counts["webfinger"] == 0
    assert standin.counts["discovery"] == 1 and standin.counts["oidc_login"] == 1


async def test_auth_oidc_against_a_legacy_only_api_is_a_configuration_error(make_standin,
                                                                           start_daemon):
    standin = make_standin(legacy_only=True)
    daemon = start_daemon(standin, env={"VM_TOKEN_AUTH": "oidc", "VM_TOKEN_MAX_BACKOFF": "1"})
    with trio.fail_after(30):
        token = await in_thread(daemon.cli, "token")
        assert token.returncode == 4 and token.stdout == ""  # not logged in: fix and reload
        assert "oidc" in token.stderr and "oidc_issuer" in token.stderr, token.stderr
        assert "Traceback" not in token.stderr
        before = status_json(daemon)
        assert before["state"] != "logged_in"
        assert "oidc_issuer" in before["last_error"]
        text = await in_thread(daemon.cli, "status")
        assert text.returncode == 0 and "oidc_issuer" in text.stdout, text.stdout
        await trio.sleep(2)  # a timer would have asked again by now (max_backoff 1 s)
        after = status_json(daemon)
    assert after["upstream_calls"] == before["upstream_calls"]
    assert after["upstream_calls"].get("webfinger") == 1
    assert standin.counts["login"] == 0  # no guess at the legacy login either
    assert after["last_error"] == before["last_error"]


# -- 2. many clients, rotating refresh tokens ---------------------------------------------


async def test_sixty_clients_three_videomanagers_while_refresh_tokens_rotate(make_standin,
                                                                            start_daemon):
    lifetime, window = 4, 10.0
    standin = oidc_standin(make_standin, access_lifetime=lifetime, rotate_refresh_tokens=True)
    daemon = start_daemon(standin)
    with trio.fail_after(45):
        with daemon.client() as client:
            await in_thread(client.get_token)  # logged in before the crowd arrives
        http_checked: set[tuple[str, str]] = set()

        async def check(token: str, vm: str) -> str | None:
            if not standin.token_valid(token, vm):
                return "a token the API refuses"
            if (token, vm) not in http_checked:  # and over HTTP, once per token and VM
                http_checked.add((token, vm))
                if not await in_thread(http_accepts, standin.url, token, vm):
                    return "a token the API refuses over HTTP"
            return None

        started = time.monotonic()
        crowd = await run_crowd(daemon.socket, 60, window, check)
        ended = time.monotonic()
        status = status_json(daemon)
    assert not crowd.failures, crowd.failures[:5]
    assert all(n >= 60 for n in crowd.served.values()), crowd.served
    assert standin.counts["refresh_reused"] == 0
    assert standin.counts["sessions_ended"] == 0
    assert standin.counts["oidc_login"] == 1  # never a re-login
    assert standin.counts["oidc_refresh"] == standin.counts["oidc_refresh_ok"]
    refreshes = [t for t, name in standin.requests
                 if name == "oidc_refresh" and started <= t <= ended]
    low, high = refresh_bounds(ended - started, lifetime)
    assert low <= len(refreshes) <= high, (len(refreshes), low, high)
    # One token per refresh period, not one per VideoManager: no two refreshes close
    # together (three per period would come in bursts).
    gaps = [b - a for a, b in zip(refreshes, refreshes[1:], strict=False)]
    assert min(gaps) >= refresh_period(lifetime)[0] - 0.25, gaps
    assert len(crowd.first_seen) <= len(refreshes) + 2
    assert status["state"] == "logged_in" and status["auth"] == "oidc"
    print(f"stand-in: {len(refreshes)} refreshes in {ended - started:.1f} s "
          f"(bounds {low}..{high}), gaps {[round(g, 2) for g in gaps]}, "
          f"{sum(crowd.served.values())} tokens served, {len(crowd.first_seen)} distinct")
    assert_nothing_secret_logged(daemon, [*standin.issued, standin.password])


# -- 3. a refresh token the server no longer honours -> exactly one re-login ----------------


@pytest.mark.parametrize("revoke", ["expire_refresh_tokens", "end_sessions"])
async def test_a_dead_refresh_token_leads_to_exactly_one_relogin(make_standin, start_daemon,
                                                                revoke):
    standin = oidc_standin(make_standin, access_lifetime=3, rotate_refresh_tokens=True)
    daemon = start_daemon(standin)
    with trio.fail_after(30):
        with daemon.client() as client:
            await in_thread(client.get_token)
        assert standin.counts["oidc_login"] == 1
        recovered = 0

        async def check(token: str, vm: str) -> str | None:
            # As an httpx auth does: the API refuses the token -> invalidate, ask again.
            nonlocal recovered
            if standin.token_valid(token, vm):
                return None
            async with vm_token.AsyncClient(daemon.socket) as again:
                await again.invalidate(token, vm)
                fresh = await again.get_token(vm)
                if not standin.token_valid(fresh.access_token, vm):
                    # One race is left, and no daemon can tell it: a refresh answered
                    # just before the session ended, whose token arrived before this
                    # client's report of the older one. That token is refused once too.
                    # (A refresh asked for before a report is never taken: the keeper's
                    # test_a_refresh_sent_before_a_rejection_report_does_not_answer_it.)
                    await again.invalidate(fresh, vm)
                    fresh = await again.get_token(vm)
            if not standin.token_valid(fresh.access_token, vm):
                return "still a refused token after invalidating it twice"
            recovered += 1
            return None

        async def revoke_soon() -> None:
            await trio.sleep(0.5)
            getattr(standin, revoke)()  # expire_refresh_tokens: access tokens live on

        async with trio.open_nursery() as nursery:
            nursery.start_soon(revoke_soon)
            crowd = await run_crowd(daemon.socket, 12, 4.5, check)
        logins_at_end = standin.counts["oidc_login"]
        await trio.sleep(0.5)
    assert not crowd.failures, crowd.failures[:5]
    assert all(n >= 5 for n in crowd.served.values()), crowd.served
    assert logins_at_end == standin.counts["oidc_login"] == 2  # exactly one re-login
    assert standin.counts["oidc_login_ok"] == 2
    assert standin.counts["refresh_reused"] == 0
    # The session after the re-login refreshes as before.
    after = [t for t, name in standin.requests if name == "oidc_login"][-1]
    assert any(t > after for t, name in standin.requests if name == "oidc_refresh")
    if revoke == "end_sessions":
        assert recovered >= 1  # the clients' old token died with the session
    status = status_json(daemon)
    assert status["state"] == "logged_in"
    assert_nothing_secret_logged(daemon, [*standin.issued, standin.password])


# -- 4. failure classes ---------------------------------------------------------------------


async def test_wrong_password_is_credentials_rejected_and_never_retried(make_standin,
                                                                       start_daemon):
    standin = oidc_standin(make_standin)
    wrong = "not-the-password-7731"
    daemon = start_daemon(standin, password=wrong, env={"VM_TOKEN_MAX_BACKOFF": "1"})
    with trio.fail_after(30):
        with daemon.client() as client:
            with pytest.raises(vm_token.CredentialsRejected):
                await in_thread(client.get_token)
        token = await in_thread(daemon.cli, "token")
        assert token.returncode == 4 and "credentials_rejected" in token.stderr  # log in first
        assert wrong not in token.stderr
        assert standin.counts["oidc_login"] == 1
        await trio.sleep(2)  # a timer would have tried again by now (max_backoff 1 s)
        status = status_json(daemon)
    assert standin.counts["oidc_login"] == 1 and standin.counts["token"] == 1
    assert status["state"] == "credentials_rejected"
    assert status["auth"] == "oidc"
    assert_nothing_secret_logged(daemon, [wrong, standin.password])


async def test_a_discovery_document_naming_another_issuer_is_refused(make_standin,
                                                                    start_daemon):
    standin = oidc_standin(make_standin)
    standin.issuer_override = "https://login.example.net/auth/realms/platform"
    daemon = start_daemon(standin, env={"VM_TOKEN_MAX_BACKOFF": "1"})
    with trio.fail_after(30):
        token = await in_thread(daemon.cli, "token")
        assert token.returncode == 4 and token.stdout == ""  # not logged in (and why)
        assert "login.example.net" in token.stderr and "issuer" in token.stderr, token.stderr
        await trio.sleep(2)  # a timer would have asked again by now (max_backoff 1 s)
        status = status_json(daemon)
    assert status["state"] != "logged_in"
    assert "issuer" in status["last_error"] and "login.example.net" in status["last_error"]
    assert standin.counts["token"] == 0  # not one request to the token endpoint
    assert standin.counts["discovery"] == 1  # a configuration error: not asked again


async def test_a_moved_token_endpoint_is_found_again_through_discovery(make_standin,
                                                                      start_daemon):
    standin = oidc_standin(make_standin, access_lifetime=3)
    daemon = start_daemon(standin, env={"VM_TOKEN_MAX_BACKOFF": "2"})
    with trio.fail_after(30), daemon.client() as client:
        first = await in_thread(client.get_token, "1001")
        new_endpoint = standin.move_token_endpoint()
        # The next refresh (at ~2 s) hits the old path's 404; the daemon reads discovery
        # again and carries on at the new one, by itself.
        await wait_for(lambda: standin.counts["oidc_refresh_ok"] >= 1)
        # The stand-in counts its answer as it sends it: the daemon may hold the old token
        # a moment longer, until that answer has arrived.
        token = await in_thread(client.get_token, "1001")
        while token.access_token == first.access_token:
            await trio.sleep(0.05)
            token = await in_thread(client.get_token, "1001")
        for vm in VMS:
            assert standin.token_valid((await in_thread(client.get_token, vm)).access_token, vm)
        status = await in_thread(client.status)
    assert standin.token_endpoint == new_endpoint
    assert standin.counts["token_gone"] >= 1
    assert standin.counts["discovery"] == 2
    assert standin.counts["oidc_login"] == 1  # the refresh token was never used up
    assert status["state"] == "logged_in"


@pytest.mark.parametrize("mode", ["absent", "zero"])
async def test_refresh_expires_in_absent_or_zero_still_refreshes(make_standin, start_daemon,
                                                                 mode):
    standin = oidc_standin(make_standin, access_lifetime=3, rotate_refresh_tokens=True)
    standin.refresh_expires_mode = mode
    daemon = start_daemon(standin)
    with trio.fail_after(30), daemon.client() as client:
        seen = set()
        while standin.counts["oidc_refresh_ok"] < 2:
            token = await in_thread(client.get_token, "1002")
            assert standin.token_valid(token.access_token, "1002")
            seen.add(token.access_token)
            await trio.sleep(0.2)
        status = await in_thread(client.status)
    assert len(seen) >= 2
    assert standin.counts["oidc_login"] == 1  # "unknown" is not "expired"
    assert standin.counts["refresh_reused"] == 0
    assert status["state"] == "logged_in"
