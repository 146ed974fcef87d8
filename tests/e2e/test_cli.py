"""The `vm-token` command against the real daemon: output, errors, exit codes."""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from tests.conftest import BIN, clean_env

pytestmark = pytest.mark.timeout(60)


def run(env, *args, input=None):
    return subprocess.run([str(BIN / "vm-token"), *args], input=input, capture_output=True,
                          text=True, env=env, timeout=15, check=False)


def assert_one_line_error(result, code, *words):
    assert result.returncode == code
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("vm-token")  # "vm-token: " or "vm-token token: "
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in result.stderr


def test_token_list_status(standin, start_daemon):
    daemon = start_daemon(standin)
    token = daemon.cli("token")
    assert token.returncode == 0 and token.stderr == ""
    assert standin.token_valid(token.stdout.strip(), "1001")
    assert token.stdout.count("\n") == 1
    sales = daemon.cli("token", "--vm", "sales", "--min-ttl", "60")
    assert standin.token_valid(sales.stdout.strip(), "1002")
    listing = daemon.cli("list")
    assert listing.returncode == 0
    lines = listing.stdout.splitlines()
    assert lines[0].startswith("* 1001  Marketing  (token valid 4m")
    assert lines[1].startswith("  1002  Sales  (token valid 4m")
    assert lines[2] == "  1003  Support  (no token held)"
    status = daemon.cli("status", "--json")
    data = json.loads(status.stdout)
    assert data["state"] == "logged_in" and data["username"] == standin.username
    assert data["upstream_calls"] == {"webfinger": 1, "login": 1, "refresh": 1}
    assert data["auth"] == "legacy"  # WebFinger names no issuer: the API's own login
    for secret in (*standin.issued, standin.password):
        assert secret not in status.stdout and secret not in listing.stdout
    text = daemon.cli("status").stdout
    assert "logged_in as demo" in text
    # The same VideoManager lines as `list`, indented, with when each token was refreshed.
    rows = text.splitlines()[-3:]
    assert rows[0].startswith("  * 1001  Marketing  (token valid 4m")
    assert re.search(r"1002  Sales  \(token valid 4m\d\ds, refreshed 20\d\d-\d\d-\d\dT", rows[1])
    assert rows[2] == "    1003  Support  (no token held)"


def test_errors_are_one_line_with_documented_exit_codes(standin, start_daemon, private_dir):
    env = {**clean_env(private_dir), "VM_TOKEN_SOCKET": str(private_dir / "nothing")}
    assert_one_line_error(run(env, "token"), 3, "vm-tokend is not running")
    daemon = start_daemon(standin)
    assert_one_line_error(daemon.cli("token", "--vm", "Finance"), 1, "unknown_videomanager",
                          "Marketing (1001)")
    assert_one_line_error(daemon.cli("token", "--min-ttl", "1000"), 1, "bad_request")
    assert_one_line_error(daemon.cli("token", "--min-ttl", "soon"), 2, "--min-ttl", "soon")
    assert_one_line_error(daemon.cli(), 2, "COMMAND")
    assert_one_line_error(daemon.cli("list", "--colour"), 2, "--colour")
    assert_one_line_error(daemon.cli("login", "--username", "x"), 2, "--password-stdin")
    assert daemon.cli("--help").returncode == 0
    assert "exit codes" in daemon.cli("token", "--help").stdout


def test_login_and_logout(standin, start_daemon):
    daemon = start_daemon(standin, password="")  # no password: waits for a login
    assert_one_line_error(daemon.cli("token"), 4, "not_logged_in", "vm-token login")
    bad = daemon.cli("login", "--username", "demo", "--password-stdin", input="nope\n")
    assert_one_line_error(bad, 4, "credentials_rejected")
    good = daemon.cli("login", "--username", "demo", "--password-stdin",
                      input=standin.password + "\n")
    assert good.returncode == 0 and "logged in as demo; 3 VideoManagers" in good.stdout
    assert standin.token_valid(daemon.cli("token").stdout.strip())
    assert daemon.cli("logout").returncode == 0
    assert_one_line_error(daemon.cli("token"), 4, "not_logged_in")
    assert standin.password not in daemon.log()
