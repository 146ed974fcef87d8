"""A browser login cannot be taken over by another local user (issue 15, point 2).

Real vm-token and vm-tokend against the stand-in; the user's browser is httpx here (what
is asserted is what the listener answers, not how a page looks: test_browser_login.py has
headless Chromium), and the other local user is a real process of uid 65534 (nobody).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import httpx
import pytest

import vm_token
from tests.e2e.browser import BrowserOpener, Login, query
from tests.e2e.test_browser_login import standin_env
from tests.e2e.test_interactive_failures import form_login, no_flow_left, start_code

pytestmark = pytest.mark.timeout(60)

OTHER_UID = 65534  # nobody
LOCAL_ADDRESS = re.compile(r"http://127\.0\.0\.1:(\d+)/([A-Za-z0-9_-]{43})")


def browser() -> httpx.Client:
    """The user's browser, as far as these tests need one: no proxy, redirects by hand."""
    return httpx.Client(timeout=10, trust_env=False, follow_redirects=False)


def provider_answer(standin, authorize_url: str) -> str:
    """The user logs in on the provider's form: the address it sends the browser back to."""
    with browser() as http:
        page = http.get(authorize_url)
        assert page.status_code == 200, page.text
        request_id = re.search(r'name="login_request" value="([^"]+)"', page.text)
        assert request_id, page.text
        answer = http.post(authorize_url.split("?")[0], data={
            "login_request": request_id[1], "username": standin.username,
            "password": standin.password, "action": "login"})
    assert answer.status_code == 302, answer.text
    return answer.headers["location"]


def as_other_user(url: str) -> int:
    """GET `url` as another local user; the HTTP status it got (0: no answer)."""
    if os.getuid() != 0 or shutil.which("setpriv") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI must run the other-uid tests (root and setpriv)")
        pytest.skip("needs root and setpriv to act as another uid")
    done = subprocess.run(
        ["setpriv", f"--reuid={OTHER_UID}", f"--regid={OTHER_UID}", "--clear-groups",
         "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10", url],
        capture_output=True, text=True, timeout=20, check=False)
    return int(done.stdout or 0)


class RecordingBrowser(BrowserOpener):
    """A $BROWSER that also records its whole argv and its /proc/self/cmdline."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.argv_file = directory / "browser.argv"
        self.cmdline_file = directory / "browser.cmdline"
        self.script.write_text(
            "#!/bin/sh\n"
            f"cat /proc/$$/cmdline > '{self.cmdline_file}'\n"
            f"printf '%s\\n' \"$0\" \"$@\" > '{self.argv_file}'\n"
            f"printf '%s\\n' \"$1\" > '{self.url_file}.tmp' && "
            f"mv '{self.url_file}.tmp' '{self.url_file}'\n")


def every_cmdline() -> bytes:
    """The argv of every process on this machine, as anyone may read it (`ps`)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            found.append(Path(f"/proc/{pid}/cmdline").read_bytes())
        except OSError:
            continue  # gone meanwhile
    return b"\n".join(found)


def start_browser_login(daemon, tmp_path, *args: str) -> tuple[Login, RecordingBrowser, str]:
    opener = RecordingBrowser(tmp_path)
    login = Login(daemon, "--browser", *args, env=opener.env)
    return login, opener, opener.wait_for_url(login)


def follow_local_address(local: str) -> str:
    """The one-time local address: a redirect to the provider; the provider's URL."""
    with browser() as http:
        hop = http.get(local)
    assert hop.status_code in (302, 303), hop.text
    return hop.headers["location"]


def test_the_browser_gets_a_one_time_local_address_and_no_argv_holds_the_state(
        make_standin, start_daemon, tmp_path):
    standin = make_standin(legacy_only=False)
    daemon = start_daemon(None, env=standin_env(standin))
    login, opener, local = start_browser_login(daemon, tmp_path)
    try:
        assert LOCAL_ADDRESS.fullmatch(local), local
        authorize = follow_local_address(local)
        assert authorize.startswith(standin.issuer)
        state = query(authorize)["state"]
        # Nothing that any user can list carries the state: not the browser's argv, not
        # vm-token's, not any process's.
        assert state not in opener.argv_file.read_text()
        assert state.encode() not in opener.cmdline_file.read_bytes()
        assert state.encode() not in every_cmdline()
        # Once: the address does not lead to the provider again.
        with browser() as http:
            again = http.get(local)
        assert again.status_code not in (301, 302, 303, 307, 308)
        assert "location" not in again.headers
        callback = provider_answer(standin, authorize)
        with browser() as http:
            page = http.get(callback)
        output = login.finish()
    finally:
        login.kill()
    assert page.status_code == 200 and "Logged in" in page.text
    assert login.returncode == 0, output
    assert login.stdout == f"logged in as {standin.username}\n"
    assert state not in login.output


def test_another_user_gets_403_and_changes_nothing(make_standin, start_daemon, tmp_path):
    standin = make_standin(legacy_only=False)
    daemon = start_daemon(None, env=standin_env(standin))
    login, _, local = start_browser_login(daemon, tmp_path)
    try:
        port = urlsplit(local).port
        # The other user, even knowing the one-time address (and, say, the state): refused
        # at every path, before anything is looked at.
        assert as_other_user(local) == 403
        authorize = follow_local_address(local)  # still unused: the user's browser gets it
        state = query(authorize)["state"]
        callback = f"http://127.0.0.1:{port}/callback?"
        assert as_other_user(callback + urlencode({"error": "access_denied",
                                                   "state": state})) == 403
        assert as_other_user(callback + urlencode({"code": "attackers-code",
                                                   "state": state})) == 403
        assert login.proc.poll() is None  # the login goes on
        with browser() as http:
            page = http.get(provider_answer(standin, authorize))
        output = login.finish()
    finally:
        login.kill()
    assert page.status_code == 200 and "Logged in" in page.text, page.text
    assert login.returncode == 0, output
    assert standin.counts["oidc_code"] == 1 and standin.counts["oidc_code_ok"] == 1


def test_a_wrong_state_is_400_and_the_login_goes_on(make_standin, start_daemon, tmp_path):
    standin = make_standin(legacy_only=False)
    daemon = start_daemon(None, env=standin_env(standin))
    login, _, local = start_browser_login(daemon, tmp_path)
    try:
        authorize = follow_local_address(local)
        port = urlsplit(local).port
        callback = f"http://127.0.0.1:{port}/callback?"
        with browser() as http:
            forged = http.get(callback + urlencode({"code": "x", "state": "not-the-state"}))
            denied = http.get(callback + urlencode({"error": "access_denied",
                                                    "state": "not-the-state"}))
            no_state = http.get(callback + urlencode({"error": "access_denied"}))
        assert (forged.status_code, denied.status_code, no_state.status_code) == (400,) * 3
        assert login.proc.poll() is None  # none of them ended the login
        assert standin.counts["oidc_code"] == 0  # and nothing was exchanged
        with browser() as http:
            page = http.get(provider_answer(standin, authorize))
        output = login.finish()
    finally:
        login.kill()
    assert page.status_code == 200 and "Logged in" in page.text, page.text
    assert login.returncode == 0, output
    assert login.stdout == f"logged in as {standin.username}\n"


def test_an_error_with_the_right_state_ends_the_login(make_standin, start_daemon, tmp_path):
    standin = make_standin(legacy_only=False)
    daemon = start_daemon(None, env=standin_env(standin))
    login, _, local = start_browser_login(daemon, tmp_path)
    try:
        state = query(follow_local_address(local))["state"]
        with browser() as http:
            page = http.get(f"http://127.0.0.1:{urlsplit(local).port}/callback?"
                            + urlencode({"error": "access_denied", "state": state}))
        output = login.finish()
    finally:
        login.kill()
    assert page.status_code == 400 and "Login failed" in page.text
    assert login.returncode == 1, output
    assert "access_denied" in login.stderr.splitlines()[-1]
    assert no_flow_left(daemon)


# -- RFC 9207: the issuer of the authorization response ------------------------------------


def finish(daemon, reply: dict, came_back: dict[str, str], **fields: str) -> dict:
    with daemon.client(timeout=15) as client:
        return client.request("login_finish", flow=reply["flow"], code=came_back["code"],
                              state=came_back["state"], **fields)


def test_an_answer_from_another_issuer_is_refused(make_standin, start_daemon):
    standin = make_standin(legacy_only=False)
    daemon = start_daemon(None, env=standin_env(standin))
    with daemon.client(timeout=15) as client:
        reply = start_code(client)
    came_back = form_login(standin, reply["url"])
    assert came_back["iss"] == standin.issuer  # the stand-in says who it is, as Keycloak
    with pytest.raises(vm_token.LoginFailed) as refused:
        finish(daemon, reply, came_back, iss="https://evil.example/realms/platform")
    assert "evil.example" in refused.value.message and "iss" in refused.value.message
    assert standin.counts["oidc_code"] == 0  # the code went nowhere
    assert no_flow_left(daemon)


def test_no_iss_is_refused_when_the_provider_promises_one(make_standin, start_daemon):
    standin = make_standin(legacy_only=False)
    daemon = start_daemon(None, env=standin_env(standin))
    discovery = httpx.get(standin.issuer + "/.well-known/openid-configuration",
                          timeout=10).json()
    assert discovery["authorization_response_iss_parameter_supported"] is True
    with daemon.client(timeout=15) as client:
        reply = start_code(client)
    came_back = form_login(standin, reply["url"])
    with pytest.raises(vm_token.LoginFailed) as refused:
        finish(daemon, reply, came_back)  # no iss
    assert "iss" in refused.value.message
    assert standin.counts["oidc_code"] == 0


def test_no_iss_is_fine_from_a_provider_that_does_not_send_it(make_standin, start_daemon):
    standin = make_standin(legacy_only=False)
    standin.rewrite = lambda endpoint, answer: {
        k: v for k, v in answer.items() if k != "authorization_response_iss_parameter_supported"
    } if endpoint == "discovery" else answer
    daemon = start_daemon(None, env=standin_env(standin))
    with daemon.client(timeout=15) as client:
        reply = start_code(client)
    came_back = form_login(standin, reply["url"])
    assert finish(daemon, reply, came_back)["username"] == standin.username


def test_the_listener_passes_iss_on(make_standin, start_daemon, tmp_path):
    """The right state but another issuer, through vm-token's listener: refused."""
    standin = make_standin(legacy_only=False)
    daemon = start_daemon(None, env=standin_env(standin))
    login, _, local = start_browser_login(daemon, tmp_path)
    try:
        callback = provider_answer(standin, follow_local_address(local))
        forged = callback.replace(
            urlencode({"iss": standin.issuer}), urlencode({"iss": "https://evil.example"}))
        assert forged != callback
        with browser() as http:
            page = http.get(forged)
        output = login.finish()
    finally:
        login.kill()
    assert page.status_code == 400 and "Login failed" in page.text
    assert login.returncode == 1, output
    assert "evil.example" in login.stderr.splitlines()[-1]
    assert standin.counts["oidc_code"] == 0


# -- the profile's user ----------------------------------------------------------------------


def test_a_login_as_somebody_else_is_refused_and_the_session_kept(make_standin, start_daemon):
    standin = make_standin(legacy_only=False)
    # The profile is demo's: logged in with demo's password.
    daemon = start_daemon(standin, env={"VM_TOKEN_LOGIN_METHOD": "password"})
    with daemon.client(timeout=15) as client:
        before = client.get_token("1001").access_token
        reply = start_code(client)
    # The provider's account is now somebody else's: whoever logs in comes back as mallory.
    standin.username = "mallory"
    came_back = form_login(standin, reply["url"])
    with pytest.raises(vm_token.LoginFailed) as refused:
        finish(daemon, reply, came_back, iss=came_back["iss"])
    assert refused.value.message.startswith(
        "logged in as 'mallory', but this profile is for 'demo'"), refused.value.message
    with daemon.client() as client:
        status = client.status()
        assert client.get_token("1001").access_token == before
    assert status["state"] == "logged_in" and status["username"] == "demo"
    assert no_flow_left(daemon)
