"""Interactive logins that go wrong, end to end against the stand-in (real vm-tokend, real
socket, real HTTP; headless Chromium where a person's browser is part of the story).

Each failure must reach the user as what it is (`login_failed` naming the cause, exit 1, the
page in the browser), leave no flow behind in the daemon, and exchange nothing it should not.
Where the browser is beside the point, httpx fills the stand-in's login form (`form_login`).
"""

from __future__ import annotations

import re
import signal
import time

import httpx
import pytest

import vm_token
from standin.server import Fault
from tests.e2e import browser
from tests.e2e.browser import (
    BrowserOpener,
    Login,
    context_elsewhere,
    query,
    standin_log_in,
    wait_for_text,
)
from tests.e2e.test_browser_login import standin_env
from tests.e2e.test_git_and_scripts import describe, git_credential

# the fixtures, under the names the tests ask for
chromium_browser = browser.chromium_browser
chromium = browser.chromium

pytestmark = pytest.mark.timeout(60)

REDIRECT = "http://127.0.0.1:{port}/callback"


def oidc_standin(make_standin, **options):
    standin = make_standin(legacy_only=False, **options)
    standin.device_interval = 1
    return standin


def form_login(standin, url: str, *, action: str = "login") -> dict[str, str]:
    """What a browser does with the stand-in's login form: the redirect's query."""
    with httpx.Client(timeout=10) as browser:
        page = browser.get(url)
        assert page.status_code == 200, page.text
        request_id = re.search(r'name="login_request" value="([^"]+)"', page.text)
        assert request_id, page.text
        answer = browser.post(url.split("?")[0], data={
            "login_request": request_id[1], "username": standin.username,
            "password": standin.password, "action": action})
    assert answer.status_code == 302, answer.text
    return query(answer.headers["location"])


def start_code(client: vm_token.Client, port: int = 45_678) -> dict:
    """login_start for a browser login whose listener nobody opened (the test is the
    browser and the listener both)."""
    reply = client.request("login_start", method="code", redirect_uri=REDIRECT.format(port=port))
    assert reply["method"] == "code" and reply["flow"] and reply["url"]
    return reply


def no_flow_left(daemon) -> bool:
    """Whether the daemon holds no interactive login (cancelling nothing cancels nothing)."""
    with daemon.client() as client:
        return client.request("login_cancel")["cancelled"] is False


def token_requests(standin) -> int:
    return standin.counts["token"]


# -- the browser login ----------------------------------------------------------------------


def test_a_wrong_state_is_refused_and_nothing_is_exchanged(make_standin, start_daemon):
    standin = oidc_standin(make_standin)
    daemon = start_daemon(None, env=standin_env(standin))
    with daemon.client(timeout=15) as client:
        reply = start_code(client)
        came_back = form_login(standin, reply["url"])
        assert came_back["state"] == query(reply["url"])["state"] and came_back["code"]
        forged = came_back["state"][:-4] + ("AAAA" if not came_back["state"].endswith("AAAA")
                                            else "BBBB")
        with pytest.raises(vm_token.BadRequest) as refused:
            client.request("login_finish", flow=reply["flow"], code=came_back["code"],
                           state=forged)
        status = client.status()
    assert "state does not match" in refused.value.message
    assert refused.value.code == "bad_request"  # and the login goes on (issue 15)
    assert standin.counts["oidc_code"] == 0  # the code was never sent to the provider
    assert status["state"] != "logged_in"
    assert came_back["code"] not in refused.value.message


def test_the_user_denies_in_the_browser(make_standin, start_daemon, chromium, tmp_path):
    standin = oidc_standin(make_standin)
    daemon = start_daemon(None, env=standin_env(standin))
    opener = BrowserOpener(tmp_path)
    login = Login(daemon, "--browser", env=opener.env)
    try:
        page = chromium.new_page()
        page.goto(opener.wait_for_url(login))
        standin_log_in(page, standin, deny=True)
        shown = wait_for_text(page, "body", "access_denied")
        output = login.finish()
    finally:
        login.kill()
    assert shown.startswith("Login failed"), shown
    assert login.returncode == 1, output
    assert login.stdout == ""
    [last] = login.stderr.splitlines()[-1:]
    assert last.startswith("vm-token: login failed:") and "access_denied" in last, output
    assert standin.counts["authorize_denied"] == 1 and standin.counts["oidc_code"] == 0
    assert no_flow_left(daemon)


def test_a_replayed_code_is_the_providers_invalid_grant(make_standin, start_daemon):
    standin = oidc_standin(make_standin)
    daemon = start_daemon(None, env=standin_env(standin))
    with daemon.client(timeout=15) as client:
        first = start_code(client)
        code = form_login(standin, first["url"])["code"]
        done = client.request("login_finish", flow=first["flow"], code=code,
                              state=query(first["url"])["state"], iss=standin.issuer)
        assert done["username"] == standin.username
        # The same code once more, in a login whose state it does match: the daemon sends
        # it, the provider refuses it (and ends what it gave, RFC 6749 4.1.2).
        second = start_code(client)
        with pytest.raises(vm_token.LoginFailed) as refused:
            client.request("login_finish", flow=second["flow"], code=code,
                           state=query(second["url"])["state"], iss=standin.issuer)
    assert "invalid_grant" in refused.value.message, refused.value.message
    assert code not in refused.value.message
    assert standin.counts["code_replayed"] == 1
    assert standin.counts["oidc_code"] == 2 and standin.counts["oidc_code_ok"] == 1
    assert no_flow_left(daemon)


def test_nobody_opens_the_url_the_listener_times_out(make_standin, start_daemon, tmp_path):
    standin = oidc_standin(make_standin)
    daemon = start_daemon(None, env=standin_env(standin))
    opener = BrowserOpener(tmp_path)
    started = time.monotonic()
    login = Login(daemon, "--browser", "--timeout", "2", env=opener.env)
    try:
        url = opener.wait_for_url(login)  # handed to a "browser" that never loads it
        output = login.finish(timeout=15)
    finally:
        login.kill()
    took = time.monotonic() - started
    assert login.returncode == 1, output
    assert login.stderr.splitlines()[-1] == "vm-token: login failed: no login within 2 s"
    assert 2 <= took < 10, took
    assert no_flow_left(daemon)  # vm-token cancelled the daemon's flow on its way out
    # the address, opened late, leads to nothing: the login is over, its listener gone
    with pytest.raises(httpx.ConnectError):
        httpx.get(url, timeout=10)
    assert standin.counts["authorize"] == 0 and standin.counts["oidc_code"] == 0


def test_ctrl_c_cancels_the_flow_in_the_daemon(make_standin, start_daemon, chromium_browser,
                                               tmp_path):
    standin = oidc_standin(make_standin)
    daemon = start_daemon(None, env=standin_env(standin))
    opener = BrowserOpener(tmp_path)
    login = Login(daemon, "--browser", env=opener.env)
    context = context_elsewhere(chromium_browser, standin.origin.split("//")[1])
    try:
        with httpx.Client(timeout=10, trust_env=False) as hop:  # the browser's first stop
            url = hop.get(opener.wait_for_url(login)).headers["location"]
        assert url.startswith(standin.issuer)
        login.proc.send_signal(signal.SIGINT)
        output = login.finish(timeout=15)
        assert login.returncode == 130, output
        assert "Traceback" not in output
        assert no_flow_left(daemon)
        # The user finishes in the browser anyway: the redirect reaches nobody, and the
        # answer it carries is worth nothing to the daemon now.
        page = context.new_page()
        addresses: list[str] = []
        page.on("request", lambda request: addresses.append(request.url))
        page.goto(url)
        standin_log_in(page, standin)
        deadline = time.monotonic() + 15
        while not any("/callback?" in address for address in addresses):
            assert time.monotonic() < deadline, addresses
            page.wait_for_timeout(50)
    finally:
        login.kill()
        context.close()
    came_back = query(addresses[-1])
    with daemon.client(timeout=15) as client:
        # Not in a login started later either: its state is not this one.
        later = start_code(client)
        with pytest.raises(vm_token.BadRequest) as refused:
            client.request("login_finish", flow=later["flow"], code=came_back["code"],
                           state=came_back["state"])
        assert client.status()["state"] != "logged_in"
    assert "state does not match" in refused.value.message
    assert standin.counts["oidc_code"] == 0
    assert "interactive login cancelled" in daemon.log()


def test_a_second_login_cancels_the_first(make_standin, start_daemon, chromium, tmp_path):
    standin = oidc_standin(make_standin)
    daemon = start_daemon(None, env=standin_env(standin))
    first_opener, second_opener = BrowserOpener(tmp_path, "first"), BrowserOpener(tmp_path,
                                                                                  "second")
    first = Login(daemon, "--browser", env=first_opener.env)
    second = None
    try:
        first_url = first_opener.wait_for_url(first)
        second = Login(daemon, "--browser", env=second_opener.env)
        second_url = second_opener.wait_for_url(second)
        assert first_url != second_url  # each its own one-time address
        # The first terminal stops waiting and says why, without its browser's help.
        first_output = first.finish(timeout=10)
        assert first.returncode == 1, first_output
        [said] = first.stderr.splitlines()[-1:]
        assert re.match(r"vm-token: .*login[ _]failed", said) and "newer" in said, first_output
        page = chromium.new_page()
        page.goto(second_url)
        standin_log_in(page, standin)
        wait_for_text(page, "body", "Logged in to VideoManager Pro")
        second_output = second.finish()
    finally:
        first.kill()
        if second is not None:
            second.kill()
    assert second.returncode == 0, second_output
    assert second.stdout == f"logged in as {standin.username}\n"
    assert standin.counts["oidc_code_ok"] == 1


# -- the device login -----------------------------------------------------------------------


def test_the_device_code_expires(make_standin, start_daemon):
    standin = oidc_standin(make_standin)
    standin.device_code_lifetime = 3
    daemon = start_daemon(None, env=standin_env(standin))
    started = time.monotonic()
    login = Login(daemon, "--device")
    try:
        output = login.finish(timeout=20)  # nobody enters the code
    finally:
        login.kill()
    assert login.returncode == 1, output
    [said] = login.stderr.splitlines()[-1:]
    assert re.match(r"vm-token: .*login[ _]failed", said) and "expired" in said, output
    assert time.monotonic() - started < 12
    assert standin.counts["device_approved"] == 0
    assert no_flow_left(daemon)


def test_slow_down_makes_the_daemon_poll_later(make_standin, start_daemon):
    """RFC 8628 3.5: on slow_down the interval grows by 5 s. The stand-in's interval is 1 s;
    its first poll answer is slow_down, so the next poll comes no sooner than 6 s later."""
    standin = oidc_standin(make_standin)
    slowed: list[float] = []
    user_code: list[str] = []

    def picker(endpoint: str) -> Fault | None:
        if endpoint != "oidc_device" or slowed:
            return None
        slowed.append(time.monotonic())
        # the user approves meanwhile: the next poll gets the tokens
        standin.approve_device(user_code[0])
        return Fault(400, b'{"error": "slow_down", "error_description": "Slow down"}',
                     endpoints=frozenset({"oidc_device"}))

    daemon = start_daemon(None, env=standin_env(standin))
    login = Login(daemon, "--device")
    try:
        user_code.append(login.stderr_line(r"^\s+([B-Z]{4}-[B-Z]{4})$")[1])
        standin.faults = picker
        output = login.finish(timeout=20)
    finally:
        login.kill()
    assert login.returncode == 0, output
    polls = [t for t, name in standin.requests if name == "oidc_device"]
    assert len(polls) == 2, polls
    gap = polls[1] - polls[0]
    assert 6.0 <= gap < 8.0, gap
    assert standin.counts["device_slow_down"] == 0  # never too fast by the stand-in's clock


# -- after an interactive login ---------------------------------------------------------------


def test_a_revoked_session_asks_for_a_new_login_and_is_never_retried(make_standin,
                                                                     start_daemon):
    standin = oidc_standin(make_standin, access_lifetime=3)
    daemon = start_daemon(None, env=standin_env(standin))
    with daemon.client(timeout=15) as client:
        reply = start_code(client)
        client.request("login_finish", flow=reply["flow"], state=query(reply["url"])["state"],
                       code=form_login(standin, reply["url"])["code"], iss=standin.issuer)
        assert client.get_token("1001").access_token
    assert standin.end_sessions() == 1  # the provider signs every session out
    deadline = time.monotonic() + 15
    while True:  # the next refresh (at 2/3 of 3 s) is refused
        with daemon.client() as client:
            status = client.status()
        if status["state"] == "login_required":
            break
        assert time.monotonic() < deadline, status
        time.sleep(0.1)
    before = token_requests(standin)
    token = daemon.cli("token", "--vm", "1001")
    assert token.returncode == 4 and token.stdout == ""  # log in first
    assert "vm-token login --browser" in token.stderr, token.stderr
    assert len(token.stderr.splitlines()) == 1
    # git's helper says nothing to git (exit 0), so git goes on to its next helper
    helper = daemon.cli("get", input=describe(standin))
    assert (helper.returncode, helper.stdout) == (0, ""), helper
    assert "vm-token login --browser" in helper.stderr
    fill = git_credential(daemon, "fill", describe(standin))
    assert "password=" not in fill.stdout
    assert fill.returncode != 0  # nothing from any helper, and git may not prompt
    shown = daemon.cli("status")
    assert "login_required" in shown.stdout and "vm-token login --browser" in shown.stdout, \
        shown.stdout
    time.sleep(3)  # no timed retries: the token endpoint hears nothing more
    with daemon.client() as client:
        with pytest.raises(vm_token.NotLoggedIn) as refused:
            client.get_token("1002")
        assert client.status()["state"] == "login_required"
    assert "vm-token login --browser" in refused.value.message
    assert token_requests(standin) == before
    assert daemon.log().count("vm-token login --browser") >= 1
