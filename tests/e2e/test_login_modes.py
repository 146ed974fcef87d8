"""`vm-token login` in every mode: with profiles, interrupted, timing out, and when the
provider cannot start a login (issue 15, points 4, 5, 6 and 12).

Real vm-token and vm-tokend against the stand-in; the user's browser is httpx (the pages
themselves are test_browser_login.py's business).
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from urllib.parse import urlsplit

import pytest

import vm_token
from tests.conftest import BIN
from tests.e2e.browser import BrowserOpener, Login
from tests.e2e.test_browser_login import standin_env
from tests.e2e.test_interactive_failures import no_flow_left, start_code
from tests.e2e.test_login_takeover import browser, provider_answer
from tests.e2e.test_profiles import write_config

pytestmark = pytest.mark.timeout(60)

USER_CODE = r"^\s+([B-Z]{4}-[B-Z]{4})$"


def oidc_standin(make_standin, **options):
    standin = make_standin(legacy_only=False, **options)
    standin.device_interval = 1
    return standin


def authorize_url(address: str) -> str:
    """Where the browser ends up at the provider, from the address vm-token gave it."""
    if not address.startswith("http://127.0.0.1:"):
        return address  # the provider's own (vm-token before issue 15)
    with browser() as http:
        hop = http.get(address)
    assert hop.status_code in (302, 303), hop.text
    return hop.headers["location"]


# -- point 5: every mode with --profile and with VM_TOKEN_PROFILE ---------------------------


@pytest.fixture
def two_profiles(make_standin, start_daemon, private_dir):
    """A daemon whose default profile is one stand-in and whose profile "agency" is another
    (user "agency"), both waiting for an interactive login."""
    default = oidc_standin(make_standin)
    agency = oidc_standin(make_standin, username="agency", password="agency-pw")
    write_config(private_dir, f'[profiles.agency]\napi_url = "{agency.url}"\n'
                              'login_method = "browser"\n')
    daemon = start_daemon(None, env=standin_env(default))
    return daemon, default, agency


def logged_in_as(daemon, profile: str) -> str | None:
    with daemon.client() as client:
        status = client.request("status", profile=profile)
    return status["username"] if status["state"] == "logged_in" else None


@pytest.mark.parametrize("how", ["--profile", "VM_TOKEN_PROFILE"])
@pytest.mark.parametrize("mode", ["--browser", "--no-browser", "--device", "password"])
def test_every_mode_logs_in_to_the_named_profile(two_profiles, tmp_path, mode, how):
    daemon, default, agency = two_profiles
    args = ["--profile", "agency"] if how == "--profile" else []
    env = {} if how == "--profile" else {"VM_TOKEN_PROFILE": "agency"}
    if mode == "password":
        done = subprocess.run(
            [str(BIN / "vm-token"), "login", *args, "--username", "agency",
             "--password-stdin"], input="agency-pw\n", capture_output=True, text=True,
            env={**daemon.env, **env}, timeout=15, check=False)
        assert done.returncode == 0, done.stderr
    else:
        opener = BrowserOpener(tmp_path)
        login = Login(daemon, mode, *args, env={**env, **opener.env})
        try:
            if mode == "--browser":
                authorize = authorize_url(opener.wait_for_url(login))
                with browser() as http:
                    page = http.get(provider_answer(agency, authorize))
                assert page.status_code == 200, page.text
            elif mode == "--no-browser":
                authorize = login.stderr_line(r"^\s+(http://\S+)$")[1]
                login.stderr_line("paste it here")
                login.write(provider_answer(agency, authorize) + "\n")
            else:
                assert agency.approve_device(login.stderr_line(USER_CODE)[1])
            output = login.finish()
        finally:
            login.kill()
        assert login.returncode == 0, output
        assert login.stdout == "logged in as agency\n"
    assert logged_in_as(daemon, "agency") == "agency"
    assert logged_in_as(daemon, "default") is None  # the other profile is untouched
    assert default.counts["token"] == 0 and default.counts["authorize"] == 0


# -- point 4: Ctrl-C cancels the login in the daemon ----------------------------------------


def test_ctrl_c_during_a_device_login_cancels_it_in_the_daemon(make_standin, start_daemon):
    standin = oidc_standin(make_standin)
    daemon = start_daemon(None, env=standin_env(standin))
    login = Login(daemon, "--device")
    try:
        login.stderr_line(USER_CODE)
        login.stderr_line("Waiting for the login to be approved")
        deadline = time.monotonic() + 15
        while standin.counts["oidc_device"] == 0:  # vm-token is in login_wait now
            assert time.monotonic() < deadline
            time.sleep(0.05)
        login.proc.send_signal(signal.SIGINT)
        output = login.finish(timeout=15)
    finally:
        login.kill()
    assert login.returncode == 130, output
    assert "Traceback" not in output
    assert login.stderr.splitlines()[-1] == "vm-token: interrupted"
    assert no_flow_left(daemon)  # cancelled before vm-token exited
    assert "interactive login cancelled" in daemon.log()
    polls = standin.counts["oidc_device"]
    time.sleep(2.5)  # two of the stand-in's intervals: a live flow would poll again
    assert standin.counts["oidc_device"] == polls


def test_ctrl_c_while_waiting_for_the_paste_cancels_the_login(make_standin, start_daemon):
    standin = oidc_standin(make_standin)
    daemon = start_daemon(None, env=standin_env(standin))
    login = Login(daemon, "--no-browser")
    try:
        login.stderr_line("paste it here")
        login.proc.send_signal(signal.SIGINT)
        login.proc.wait(timeout=15)
        output = login.finish(timeout=15)
    finally:
        login.kill()
    assert login.returncode == 130, output
    assert "Traceback" not in output
    assert no_flow_left(daemon)


def test_a_device_code_lives_at_most_15_minutes(make_standin, start_daemon):
    standin = oidc_standin(make_standin)
    standin.device_code_lifetime = 3600  # the provider's say
    daemon = start_daemon(None, env=standin_env(standin))
    with daemon.client(timeout=15) as client:
        reply = client.request("login_start", method="device")
        client.request("login_cancel", flow=reply["flow"])
    assert 890 <= reply["expires_in"] <= 900


# -- point 6: the provider cannot start a login ----------------------------------------------


@pytest.mark.parametrize("method", ["code", "device"])
def test_an_unreachable_provider_is_upstream_unavailable(make_standin, start_daemon, method):
    standin = oidc_standin(make_standin)
    standin.fail(503, endpoints=("discovery",))
    daemon = start_daemon(None, env=standin_env(standin))
    with daemon.client(timeout=15) as client, pytest.raises(
            vm_token.UpstreamUnavailable) as refused:
        if method == "code":
            start_code(client)
        else:
            client.request("login_start", method="device")
    assert "discovery document" in refused.value.message and "503" in refused.value.message
    device = daemon.cli("login", "--device")
    assert device.returncode == 1, device.stderr
    [said] = device.stderr.splitlines()
    assert said.endswith("(upstream_unavailable)") and "internal" not in said, said


def test_a_provider_without_device_login_says_so(make_standin, start_daemon):
    standin = oidc_standin(make_standin)
    standin.rewrite = lambda endpoint, answer: {
        k: v for k, v in answer.items() if k != "device_authorization_endpoint"
    } if endpoint == "discovery" else answer
    daemon = start_daemon(None, env=standin_env(standin))
    done = daemon.cli("login", "--device")
    assert done.returncode == 1, done.stderr
    [said] = done.stderr.splitlines()
    assert said == ("vm-token: the identity provider does not offer device login; use "
                    "`vm-token login --no-browser` instead (login_failed)"), said
    with daemon.client() as client:
        assert client.status()["state"] != "logged_in"


# -- point 12: a login that times out ---------------------------------------------------------


def test_a_device_login_that_times_out_exits_1_and_says_so(make_standin, start_daemon):
    standin = oidc_standin(make_standin)
    daemon = start_daemon(None, env=standin_env(standin))
    login = Login(daemon, "--device", "--timeout", "2")
    try:
        login.stderr_line(USER_CODE)
        output = login.finish(timeout=15)  # nobody enters the code
    finally:
        login.kill()
    assert login.returncode == 1, output
    assert login.stderr.splitlines()[-1] == "vm-token: login failed: no login within 2 s"
    assert no_flow_left(daemon)


def test_no_browser_honours_the_timeout_while_waiting_for_the_paste(make_standin,
                                                                    start_daemon):
    standin = oidc_standin(make_standin)
    daemon = start_daemon(None, env=standin_env(standin))
    login = Login(daemon, "--no-browser", "--timeout", "2")
    try:
        login.stderr_line("paste it here")
        login.proc.wait(timeout=15)  # stdin stays open: nobody pastes anything
        output = login.finish()
    finally:
        login.kill()
    assert login.returncode == 1, output
    assert login.stderr.splitlines()[-1] == "vm-token: login failed: no login within 2 s"
    assert no_flow_left(daemon)


def test_no_browser_hears_that_a_newer_login_replaced_it(make_standin, start_daemon):
    standin = oidc_standin(make_standin)
    daemon = start_daemon(None, env=standin_env(standin))
    login = Login(daemon, "--no-browser")
    try:
        login.stderr_line("paste it here")
        with daemon.client(timeout=15) as client:
            newer = start_code(client)
        login.proc.wait(timeout=15)
        output = login.finish()
        with daemon.client() as client:
            client.request("login_cancel", flow=newer["flow"])
    finally:
        login.kill()
    assert login.returncode == 1, output
    [said] = login.stderr.splitlines()[-1:]
    assert re.match(r"vm-token: .*login[ _]failed", said) and "newer" in said, output


def test_the_pasted_address_of_another_login_is_refused_and_the_paste_goes_on(
        make_standin, start_daemon):
    standin = oidc_standin(make_standin)
    daemon = start_daemon(None, env=standin_env(standin))
    login = Login(daemon, "--no-browser", "--timeout", "30")
    try:
        authorize = login.stderr_line(r"^\s+(http://\S+)$")[1]
        login.stderr_line("paste it here")
        answer = provider_answer(standin, authorize)
        port = urlsplit(answer).port
        login.write(f"http://127.0.0.1:{port}/callback?code=old&state=of-another-login\n")
        login.stderr_line("not the answer to this login")
        login.write(answer + "\n")
        output = login.finish()
    finally:
        login.kill()
    assert login.returncode == 0, output
    assert login.stdout == f"logged in as {standin.username}\n"
    assert standin.counts["oidc_code"] == 1
