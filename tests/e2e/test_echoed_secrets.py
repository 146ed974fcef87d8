"""A hostile (or merely careless) upstream that echoes the password it was sent, JSON-escaped,
in its error answer (issue 15, finding 9): the real vm-tokend must keep it out of its log,
`vm-token status` and the status reply, in every form the answer could hold it.
"""

from __future__ import annotations

import json
from functools import partial

import pytest
import trio

from tests.e2e import rawwire
from tests.test_scrub import forms, printable

pytestmark = pytest.mark.timeout(60)


def echo(password: str, ascii_only: bool) -> str:
    """What a server that repeats the request body says about it."""
    body = json.dumps({"username": "demo", "password": password}, ensure_ascii=ascii_only)
    return f"cannot parse {body}"


def assert_no_form(text: str, password: str, where: str) -> None:
    for name, form in forms(password).items():
        assert form not in text and printable(form) not in text, \
            f"the password ({name}) in {where}: {text[-2000:]}"


async def wait_for_error(daemon) -> dict:
    """The status reply once it tells of the failed login."""
    while True:
        reply = await trio.to_thread.run_sync(partial(
            rawwire.ask, daemon.socket, {"v": 1, "op": "status"}))
        if reply.get("last_error"):
            return reply
        await trio.sleep(0.1)


# Passwords whose JSON forms differ from the raw one — a quote, non-ASCII, a backslash, a
# control character — echoed with non-ASCII escaped (Python's default) or not (Java's).
@pytest.mark.parametrize(("api", "password", "ascii_only"), [
    ("legacy", 'hunter"2', True),
    ("legacy", "p\u00e4ss", True),
    ("oidc", "back\\slash\x1b\u20ac", False),
    ("oidc", 'hunter"2', False),
])
async def test_an_echoed_password_reaches_neither_log_nor_status(api, password, ascii_only,
                                                                 make_standin, start_daemon):
    standin = make_standin(password=password, legacy_only=api == "legacy")
    if api == "legacy":  # the API's own error JSON
        body = {"message": echo(password, ascii_only)}
        standin.fail(503, body=json.dumps(body).encode(), endpoints=("login",))
    else:  # an OAuth error (RFC 6749 5.2) from the token endpoint
        body = {"error": "invalid_request", "error_description": echo(password, ascii_only)}
        standin.fail(400, body=json.dumps(body).encode(), endpoints=("oidc_login",))
    daemon = start_daemon(standin, env={"VM_TOKEN_MAX_BACKOFF": "1"})
    with trio.fail_after(30):
        reply = await wait_for_error(daemon)
        shown = await trio.to_thread.run_sync(daemon.cli, "status")
    assert "cannot parse" in reply["last_error"] and "[redacted]" in reply["last_error"]
    assert "[redacted]" in shown.stdout, shown
    assert_no_form(json.dumps(reply, ensure_ascii=False), password, "the status reply")
    assert_no_form(shown.stdout + shown.stderr, password, "`vm-token status`")
    assert daemon.stop() == 0
    assert "[redacted]" in daemon.log()
    assert_no_form(daemon.log(), password, "the daemon's log")
