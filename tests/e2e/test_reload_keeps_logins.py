"""SIGHUP and the logins a person made (issue 15, finding 7): a reload that changes nothing
for a profile keeps its session however it logged in — with a device code, with
`vm-token login`'s password, or with the configured one — even when the profile has a
password configured. A reload that changes only that password keeps a session a person
logged in: the new password is for the next login from the configuration.
"""

from __future__ import annotations

import signal
import time

import pytest
import trio

from tests.e2e.browser import Login

pytestmark = pytest.mark.timeout(90)

# What the daemon logs once a reload has dealt with a profile: it kept its session, or it
# started a new one.
RELOADED = ("session kept", "starting a new login session after the reload")


def token(daemon) -> str:
    result = daemon.cli("token")
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def device_login(daemon, standin) -> None:
    login = Login(daemon, "--device")
    try:
        user_code = login.stderr_line(r"^\s+([B-Z]{4}-[B-Z]{4})$")[1]
        assert standin.approve_device(user_code)
        output = login.finish(timeout=30)
    finally:
        login.kill()
    assert login.returncode == 0, output


def password_login(daemon, standin) -> None:
    result = daemon.cli("login", "--username", standin.username, "--password-stdin",
                        input=standin.password + "\n")
    assert result.returncode == 0, result.stderr


def reload(daemon) -> None:
    """SIGHUP, and wait until the daemon has dealt with the (one) profile."""
    before = sum(daemon.log().count(line) for line in RELOADED)
    daemon.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while sum(daemon.log().count(line) for line in RELOADED) == before:
        assert time.monotonic() < deadline, "no reload in the log:\n" + daemon.log()[-3000:]
        time.sleep(0.05)


LOGINS = {"device": device_login, "password": password_login, "configured": None}


@pytest.mark.parametrize("how", sorted(LOGINS))
async def test_a_reload_keeps_the_session_a_person_logged_in(how, make_standin, start_daemon,
                                                              private_dir):
    standin = make_standin(legacy_only=False)
    standin.device_interval = 1
    password_file = private_dir / "password"
    password_file.write_text(standin.password + "\n")
    daemon = start_daemon(standin, password="",
                          env={"VM_TOKEN_PASSWORD_FILE": str(password_file)})
    with trio.fail_after(60):
        await trio.to_thread.run_sync(token, daemon)  # logged in with the configured one
        login = LOGINS[how]
        if login is not None:
            await trio.to_thread.run_sync(login, daemon, standin)
        held = await trio.to_thread.run_sync(token, daemon)
        logins = dict(standin.counts)
        for change in ("nothing", "the password"):
            if change == "the password":
                password_file.write_text("a-new-password\n")
            await trio.to_thread.run_sync(reload, daemon)
            if how == "configured" and change == "the password":
                # The configured session starts again, with the new password: refused.
                result = await trio.to_thread.run_sync(daemon.cli, "token")
                assert result.returncode == 4 and "rejected" in result.stderr, result
                assert standin.counts["oidc_login"] == logins["oidc_login"] + 1
                continue
            # The same session: the token it held, and not one login at the stand-in.
            assert await trio.to_thread.run_sync(token, daemon) == held, change
            for grant in ("oidc_login", "oidc_device", "oidc_code"):
                assert standin.counts[grant] == logins.get(grant, 0), (change, grant)
    assert daemon.stop() == 0


async def test_a_reload_that_names_another_user_ends_a_persons_session(make_standin,
                                                                      start_daemon,
                                                                      private_dir):
    """The profile names a user now, and the device login was somebody else's."""
    standin = make_standin(legacy_only=False)
    standin.device_interval = 1
    daemon = start_daemon(None, env={"VM_TOKEN_API_URL": standin.url,
                                     "VM_TOKEN_LOGIN_METHOD": "browser"})
    config = private_dir / "config" / "vm-token" / "config.toml"
    config.parent.mkdir(parents=True)
    with trio.fail_after(60):
        await trio.to_thread.run_sync(device_login, daemon, standin)
        await trio.to_thread.run_sync(token, daemon)
        config.write_text('username = "somebody-else"\n')
        await trio.to_thread.run_sync(reload, daemon)
        result = await trio.to_thread.run_sync(daemon.cli, "token")
    assert result.returncode == 4 and "login" in result.stderr, result  # log in first
    assert daemon.stop() == 0
