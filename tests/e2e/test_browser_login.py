"""`vm-token login --browser` and `--no-browser` with a real browser (headless Chromium driven
by Playwright) against real authorization servers: django-oauth-toolkit (tests/oidc_peer/,
client `vm-token-code`: authorization code with PKCE required) and the stand-in.

`$BROWSER` is a script that hands the URL to the driven Chromium, which fills the provider's
login form; the provider redirects Chromium to vm-token's loopback listener. Asserted is what
the user sees — the page in the browser, `vm-token login`'s exit and words, tokens served
afterwards to `vm-token token`, git and VideoManagerAuth — and that no code, verifier, state
or token reaches the daemon's log or vm-token's output.
"""

from __future__ import annotations

import re
import sqlite3
import time
from contextlib import closing
from urllib.parse import urlsplit

import httpx
import pytest

from tests.e2e import browser
from tests.e2e.browser import (
    LONG_SECRET_LOOKING,
    BrowserOpener,
    Login,
    assert_not_in,
    assert_tokens_served,
    context_elsewhere,
    dot_log_in,
    query,
    standin_log_in,
    stopped_log,
    wait_for_text,
)
from tests.oidc_peer.fixture import DB_NAME

# the fixtures, under the names the tests ask for
chromium_browser = browser.chromium_browser
chromium = browser.chromium

pytestmark = pytest.mark.timeout(90)


def standin_env(standin) -> dict[str, str]:
    """A daemon that expects a browser login: no username, no password anywhere."""
    return {"VM_TOKEN_API_URL": standin.url, "VM_TOKEN_LOGIN_METHOD": "browser"}


def dot_env(peer, client_id: str) -> dict[str, str]:
    return {"VM_TOKEN_API_URL": peer.api_url, "VM_TOKEN_LOGIN_METHOD": "browser",
            "VM_TOKEN_OIDC_CLIENT_ID": client_id}


# What $BROWSER is given: vm-token's listener and a one-time random path, no query.
ONE_TIME_ADDRESS = re.compile(r"http://127\.0\.0\.1:\d+/[A-Za-z0-9_-]{43}")


def addresses_of(page) -> list[str]:
    """Every address `page` requests from now on, in order (redirects included)."""
    seen: list[str] = []
    page.on("request", lambda request: seen.append(request.url))
    return seen


# Who DOT says logged in: its ID tokens name the user by `sub` alone, the user's primary key
# (no preferred_username or email claim without a custom validator), and the peer has one user.
DOT_USER = "1"


def dot_accepts(peer):
    def accepted(token: str, vm: str) -> bool:
        response = httpx.get(f"{peer.api_url}/{vm}/videos",
                             headers={"Authorization": f"Bearer {token}"}, timeout=10)
        return response.status_code == 200
    return accepted


def dot_tokens(peer) -> list[str]:
    """Every access and refresh token DOT issued, from its database."""
    with closing(sqlite3.connect(peer.data_dir / DB_NAME)) as db:
        rows = [*db.execute("SELECT token FROM oauth2_provider_accesstoken"),
                *db.execute("SELECT token FROM oauth2_provider_refreshtoken")]
    return [token for (token,) in rows]


def assert_login_kept_its_secrets(daemon, login: Login, authorize_url: str, callback_url: str,
                                  tokens: list[str]) -> None:
    """No code, state, nonce, PKCE challenge or token in the daemon's log or in vm-token's
    output — except the authorization URL `--no-browser` prints on purpose (it carries
    state, nonce and the challenge, never the verifier)."""
    sent, came_back = query(authorize_url), query(callback_url)
    code, state = came_back["code"], came_back["state"]
    assert state == sent["state"]
    assert sent["code_challenge_method"] == "S256" and len(sent["code_challenge"]) == 43
    secrets = [code, state, sent["nonce"], sent["code_challenge"], *tokens]
    output = login.output.replace(authorize_url, "<the URL>")
    assert_not_in(output, secrets, "vm-token's output")
    log = stopped_log(daemon)
    assert_not_in(log, secrets, "the daemon's log")
    # the verifier is never seen outside the daemon: nothing of its shape may be logged
    assert not LONG_SECRET_LOOKING.findall(log), LONG_SECRET_LOOKING.findall(log)


def test_browser_login_against_django_oauth_toolkit(oidc_peer, start_daemon, chromium,
                                                    tmp_path):
    peer = oidc_peer
    daemon = start_daemon(None, env=dot_env(peer, peer.code_client_id))
    opener = BrowserOpener(tmp_path)
    login = Login(daemon, "--browser", env=opener.env)
    try:
        local = opener.wait_for_url(login)
        assert ONE_TIME_ADDRESS.fullmatch(local), local  # the state is in no argv
        login.stderr_line(re.escape(local))  # printed too, for a browser that did not open
        page = chromium.new_page()
        addresses = addresses_of(page)
        page.goto(local)  # the listener sends the browser on to the provider
        [url] = [a for a in addresses if a.startswith(peer.authorization_endpoint)]
        assert query(url)["client_id"] == "vm-token-code"
        dot_log_in(page, peer)  # no consent page: straight back to vm-token's listener
        shown = wait_for_text(page, "body", "Logged in")
        callback = page.url
        output = login.finish()
    finally:
        login.kill()
    assert callback.startswith("http://127.0.0.1:") and "/callback?" in callback
    assert shown.startswith("Logged in\n"), shown
    assert f"Logged in to VideoManager Pro as {DOT_USER} — you can close this tab" in shown
    assert login.returncode == 0, output
    assert login.stdout == f"logged in as {DOT_USER}\n"
    assert peer.grants("authorization_code") == 1 and peer.grants("password") == 0
    served = assert_tokens_served(daemon, peer.api_url, peer.username, dot_accepts(peer))
    status = daemon.cli("status", "--json")
    assert '"state": "logged_in"' in status.stdout, status.stdout
    assert_login_kept_its_secrets(daemon, login, url, callback, [*dot_tokens(peer), *served])


def test_browser_login_against_the_standin(make_standin, start_daemon, chromium, tmp_path):
    standin = make_standin(legacy_only=False)
    daemon = start_daemon(None, env=standin_env(standin))
    opener = BrowserOpener(tmp_path)
    # no --browser: login_method = "browser" makes it the default
    login = Login(daemon, env=opener.env)
    try:
        local = opener.wait_for_url(login)
        assert ONE_TIME_ADDRESS.fullmatch(local), local
        page = chromium.new_page()
        addresses = addresses_of(page)
        page.goto(local)
        [url] = [a for a in addresses if a.startswith(standin.issuer)]
        assert page.title() == "Sign in to VideoManager Pro"
        standin_log_in(page, standin)
        shown = wait_for_text(page, "body", "Logged in")
        callback = page.url
        output = login.finish()
    finally:
        login.kill()
    assert f"Logged in to VideoManager Pro as {standin.username}" in shown
    assert login.returncode == 0, output
    assert login.stdout == f"logged in as {standin.username}\n"
    assert standin.counts["oidc_code_ok"] == 1 and standin.counts["oidc_login"] == 0
    served = assert_tokens_served(daemon, standin.url, standin.username, standin.token_valid)
    assert_login_kept_its_secrets(daemon, login, url, callback,
                                  [*standin.issued, *served, standin.password])


def test_no_browser_the_address_is_pasted(make_standin, start_daemon, chromium_browser):
    """Over SSH: vm-token prints the URL; the user opens it in a browser on their own
    machine, logs in, and pastes the address the browser ended at (which does not load
    there: nothing listens on that machine's 127.0.0.1)."""
    standin = make_standin(legacy_only=False)
    daemon = start_daemon(None, env=standin_env(standin))
    login = Login(daemon, "--no-browser", env={"BROWSER": "/bin/false"})
    context = context_elsewhere(chromium_browser, urlsplit(standin.origin).netloc)
    try:
        url = login.stderr_line(r"^\s+(http://\S+)$")[1]
        login.stderr_line("paste it here")
        assert url.startswith(standin.issuer)
        page = context.new_page()
        addresses: list[str] = []  # what the address bar shows, one after the other
        page.on("request", lambda request: addresses.append(request.url))
        page.goto(url)
        standin_log_in(page, standin)
        deadline = time.monotonic() + 15
        while not any("/callback?" in address for address in addresses):
            assert time.monotonic() < deadline, addresses
            page.wait_for_timeout(50)
        ended_at = addresses[-1]
        assert ended_at.startswith("http://127.0.0.1:") and "code" in query(ended_at)
        assert standin.counts["oidc_code"] == 0  # nothing exchanged before the paste
        assert login.proc.poll() is None
        login.write(ended_at + "\n")
        output = login.finish()
    finally:
        login.kill()
        context.close()
    assert login.returncode == 0, output
    assert login.stdout == f"logged in as {standin.username}\n"
    assert "127.0.0.1 address that will not load" in login.stderr
    assert standin.counts["oidc_code_ok"] == 1
    served = assert_tokens_served(daemon, standin.url, standin.username, standin.token_valid)
    assert_login_kept_its_secrets(daemon, login, url, ended_at,
                                  [*standin.issued, *served, standin.password])
