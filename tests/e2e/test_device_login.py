"""`vm-token login --device` (RFC 8628) end to end: the daemon asks the provider for a device
code and polls; the test plays the user, approving the code through the provider's own pages
in headless Chromium — django-oauth-toolkit's (client `vm-token-device`) and the stand-in's.
"""

from __future__ import annotations

import re
import sqlite3
from contextlib import closing

import pytest

from tests.e2e import browser
from tests.e2e.browser import (
    Login,
    assert_not_in,
    assert_tokens_served,
    dot_log_in,
    stopped_log,
    wait_for_text,
)
from tests.e2e.test_browser_login import DOT_USER, dot_accepts, dot_env, dot_tokens, standin_env
from tests.oidc_peer.fixture import DB_NAME

# the fixtures, under the names the tests ask for
chromium_browser = browser.chromium_browser
chromium = browser.chromium

pytestmark = pytest.mark.timeout(90)

PROMPT = r"^To log in, visit (\S+) and enter the code$"


def dot_device_codes(peer) -> list[str]:
    with closing(sqlite3.connect(peer.data_dir / DB_NAME)) as db:
        return [code for (code,) in db.execute(
            "SELECT device_code FROM oauth2_provider_devicegrant")]


def test_device_login_against_django_oauth_toolkit(oidc_peer, start_daemon, chromium):
    peer = oidc_peer
    daemon = start_daemon(None, env=dot_env(peer, peer.device_client_id))
    login = Login(daemon, "--device")
    try:
        uri = login.stderr_line(PROMPT)[1]
        user_code = login.stderr_line(r"^\s+(\S+)$")[1]
        login.stderr_line("Waiting for the login to be approved")
        assert uri == f"{peer.url}/o/device/"
        # The user, on another device: the provider's pages, in the order it shows them.
        page = chromium.new_page()
        page.goto(uri)
        dot_log_in(page, peer)  # DOT's device page asks to log in first
        page.fill("input[name=user_code]", user_code)
        page.click("button[type=submit]")
        page.click("button[name=action][value=accept]")
        wait_for_text(page, "h1", "Device")
        assert login.proc.poll() is None or login.proc.returncode == 0
        output = login.finish()
    finally:
        login.kill()
    assert login.returncode == 0, output
    assert login.stdout == f"logged in as {DOT_USER}\n"
    counts = peer.counts()["token"]
    assert counts["grant_type"].get("urn:ietf:params:oauth:grant-type:device_code", 0) >= 1
    assert peer.grants("password") == 0
    served = assert_tokens_served(daemon, peer.api_url, DOT_USER, dot_accepts(peer))
    secrets = [*dot_tokens(peer), *dot_device_codes(peer), *served]
    assert_not_in(login.output, secrets, "vm-token's output")
    assert_not_in(stopped_log(daemon), secrets, "the daemon's log")


def test_device_login_against_the_standin(make_standin, start_daemon, chromium):
    standin = make_standin(legacy_only=False)
    standin.device_interval = 1
    daemon = start_daemon(None, env=standin_env(standin))
    login = Login(daemon, "--device")
    try:
        uri = login.stderr_line(PROMPT)[1]
        user_code = login.stderr_line(r"^\s+(\S+)$")[1]
        complete = login.stderr_line(r"^or open (\S+)$")[1]
        assert re.fullmatch(r"[B-Z]{4}-[B-Z]{4}", user_code)
        assert uri == f"{standin.issuer}/device"
        assert complete == f"{uri}?user_code={user_code}"
        page = chromium.new_page()
        page.goto(complete)  # the code is filled in already
        assert page.input_value("#user_code") == user_code
        page.fill("#username", standin.username)
        page.fill("#password", standin.password)
        page.click("#kc-login")
        assert "You can return to your device" in wait_for_text(page, "#result", "device")
        output = login.finish()
    finally:
        login.kill()
    assert login.returncode == 0, output
    assert login.stdout == f"logged in as {standin.username}\n"
    assert standin.counts["device_approved"] == 1 and standin.counts["oidc_device_ok"] == 1
    assert standin.counts["device_slow_down"] == 0  # the daemon kept to the interval
    assert standin.counts["oidc_login"] == 0
    served = assert_tokens_served(daemon, standin.url, standin.username, standin.token_valid)
    # the device codes the stand-in handed out (its private table: only the daemon saw them)
    device_codes = list(standin.grants._devices)
    assert len(device_codes) == 1
    secrets = [*standin.issued, *served, *device_codes, standin.password]
    assert_not_in(login.output, secrets, "vm-token's output")
    assert_not_in(stopped_log(daemon), secrets, "the daemon's log")
