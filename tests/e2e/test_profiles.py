"""Several accounts in one daemon: two stand-in APIs (one legacy, one OpenID Connect) as
two profiles, a third added by reload; isolation; and the daemon's own view of them."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import trio

import vm_token
from tests.e2e.test_hostile import in_thread
from vm_token import protocol


def write_config(private_dir: Path, text: str) -> None:
    config = private_dir / "config" / "vm-token" / "config.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(text)


def profile_table(name: str, standin, password: str | None = None) -> str:
    return (f'[profiles.{name}]\napi_url = "{standin.url}"\nusername = "{standin.username}"\n'
            f'password = "{password or standin.password}"\nauth = "auto"\n')


def request(daemon, op: str, **fields):
    with daemon.client(timeout=10) as client:
        return client.request(op, **fields)


@pytest.fixture
def two_apis(make_standin):
    legacy = make_standin()  # legacy-only
    oidc = make_standin(legacy_only=False, username="agency", password="agency-pw")
    return legacy, oidc


async def wait_for(check, seconds: float = 15.0):
    with trio.fail_after(seconds):
        while True:
            result = await in_thread(check)
            if result:
                return result
            await trio.sleep(0.05)


async def test_two_profiles_two_apis_two_ways_of_logging_in(two_apis, start_daemon,
                                                            private_dir):
    legacy, oidc = two_apis
    write_config(private_dir, profile_table("customer", oidc))
    daemon = start_daemon(legacy)  # the top level (env): the default profile
    with trio.fail_after(30):
        default = await in_thread(request, daemon, protocol.GET)
        customer = await in_thread(request, daemon, protocol.GET, profile="customer",
                                   vm="Sales")
        assert default["profile"] == "default" and customer["profile"] == "customer"
        assert legacy.token_valid(default["token"], "1001")
        assert oidc.token_valid(customer["token"], "1002")
        assert not legacy.token_valid(customer["token"]) and not oidc.token_valid(
            default["token"])
        assert customer["username"] == "agency"
        status = await in_thread(request, daemon, protocol.STATUS)
        profiles = {p["name"]: p for p in status["profiles"]}
        assert profiles["default"]["auth"] == "legacy" and profiles["default"]["default"]
        assert profiles["customer"]["auth"] == "oidc"
        assert profiles["customer"]["api_url"] == oidc.url
        assert profiles["customer"]["username"] == "agency"
        assert all(p["state"] == "logged_in" for p in profiles.values())
        assert status["username"] == legacy.username  # the top level: the default's
        listing = await in_thread(request, daemon, protocol.LIST)
        assert {(vm["profile"], vm["id"]) for vm in listing["videomanagers"]} == {
            (p, i) for p in ("default", "customer") for i in ("1001", "1002", "1003")}
        only = await in_thread(request, daemon, protocol.LIST, profile="customer")
        assert {vm["profile"] for vm in only["videomanagers"]} == {"customer"}
        with pytest.raises(vm_token.UnknownProfile, match="no profile 'nope'; configured: "
                                                          "customer, default"):
            await in_thread(request, daemon, protocol.GET, profile="nope")
        # git's host picks the profile
        host = oidc.url.split("/")[2]
        by_host = await in_thread(request, daemon, protocol.GET, host=host,
                                  protocol="http")
        assert by_host["profile"] == "customer" and oidc.token_valid(by_host["token"])


async def test_one_profiles_trouble_never_delays_another(two_apis, make_standin,
                                                         start_daemon, private_dir):
    legacy, oidc = two_apis
    slow = make_standin(username="slow", password="slow-pw")
    slow.delay = 4.0  # every answer of this API takes 4 s: its profile is still logging in
    write_config(private_dir, profile_table("broken", oidc, password="wrong")
                 + profile_table("slow", slow))
    daemon = start_daemon(legacy)
    with trio.fail_after(30):
        await in_thread(request, daemon, protocol.GET)  # the default is logged in
        with pytest.raises(vm_token.CredentialsRejected):
            await in_thread(request, daemon, protocol.GET, profile="broken")
        status = await in_thread(request, daemon, protocol.STATUS)
        states = {p["name"]: p["state"] for p in status["profiles"]}
        assert states == {"default": "logged_in", "broken": "credentials_rejected",
                          "slow": "logging_in"}
        # The default profile's clients are served at once, many times over, while one
        # profile is refused and another waits on a slow API.
        started = time.monotonic()
        for _ in range(50):
            await in_thread(request, daemon, protocol.GET)
        assert time.monotonic() - started < 2.0
        assert oidc.counts["oidc_login"] == 1  # the wrong password: tried once


async def test_reload_adds_changes_and_removes_profiles_and_leaves_the_rest_alone(
        two_apis, make_standin, start_daemon, private_dir):
    legacy, oidc = two_apis
    third = make_standin(username="third", password="third-pw")
    write_config(private_dir, profile_table("customer", oidc))
    daemon = start_daemon(legacy)
    with trio.fail_after(40):
        before_default = await in_thread(request, daemon, protocol.GET)
        before_customer = await in_thread(request, daemon, protocol.GET, profile="customer")
        counts = (dict(legacy.counts), dict(oidc.counts))
        # Add a third profile; the other two are unchanged.
        write_config(private_dir, profile_table("customer", oidc)
                     + profile_table("third", third))
        daemon.signal(signal.SIGHUP)

        def third_served():
            try:
                return request(daemon, protocol.GET, profile="third")
            except vm_token.UnknownProfile:
                return None
        got = await wait_for(third_served)
        assert third.token_valid(got["token"], "1001")
        # Unchanged profiles: the same tokens, and not one upstream call.
        assert (await in_thread(request, daemon, protocol.GET))["token"] == \
            before_default["token"]
        assert (await in_thread(request, daemon, protocol.GET, profile="customer"))[
            "token"] == before_customer["token"]
        assert (dict(legacy.counts), dict(oidc.counts)) == counts
        # A bad profile on reload: it keeps running as it was, the others too.
        write_config(private_dir, profile_table("customer", oidc)
                     + profile_table("third", third).replace(third.url, "ftp://broken"))
        daemon.signal(signal.SIGHUP)
        await wait_for(lambda: "'third': api_url" in daemon.log())
        assert third.token_valid(
            (await in_thread(request, daemon, protocol.GET, profile="third"))["token"])
        # Remove it: its clients hear so.
        write_config(private_dir, profile_table("customer", oidc))
        daemon.signal(signal.SIGHUP)

        def third_gone():
            try:
                request(daemon, protocol.GET, profile="third")
            except vm_token.UnknownProfile:
                return True
            return False
        await wait_for(third_gone)
        assert (dict(legacy.counts), dict(oidc.counts)) == counts
    assert daemon.proc.poll() is None


async def test_named_profile_still_answers_git_only_for_its_host_and_hello_is_per_profile(
        two_apis, start_daemon, private_dir):
    legacy, oidc = two_apis
    write_config(private_dir, profile_table("customer", oidc)
                 + 'login_method = "browser"\noidc_redirect_port = 47123\n')
    daemon = start_daemon(legacy)
    with trio.fail_after(20):
        with pytest.raises(vm_token.UnknownHost):
            await in_thread(request, daemon, protocol.GET, profile="default",
                            host="github.com", protocol="https")
        hello = await in_thread(request, daemon, protocol.HELLO, profile="customer")
        assert hello["login_method"] == "browser" and hello["redirect_port"] == 47123
        plain = await in_thread(request, daemon, protocol.HELLO)
        assert plain["login_method"] == "password" and plain["redirect_port"] is None
        status = await in_thread(request, daemon, protocol.STATUS, profile="customer")
        assert status["api_url"] == oidc.url and "profile_apis" not in status
