"""`vm-token list` and `status` right after the daemon starts (issue 15, finding 11).

With socket activation every first command meets a daemon that is still logging in: like
`get`, `list` and `status` wait for that login (bounded by --timeout) instead of answering
"no VideoManagers"; a login that failed makes `list` say why and exit 4 (log in first).
"""

from __future__ import annotations

import json
import re
import time

import pytest

from tests.e2e.test_profiles import profile_table, write_config

pytestmark = pytest.mark.timeout(60)

NAMES = ("Marketing", "Sales", "Support")


def slow_standin(make_standin, **options):
    standin = make_standin(**options)
    standin.delay = 1.0  # every login takes a second: the first command finds it in flight
    return standin


def test_list_right_after_start_shows_the_videomanagers(make_standin, start_daemon):
    daemon = start_daemon(slow_standin(make_standin))
    listed = daemon.cli("list")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert len(lines) == 3, listed.stdout
    assert all(name in line for name, line in zip(NAMES, lines, strict=True)), listed.stdout


def test_list_json_right_after_start(make_standin, start_daemon):
    daemon = start_daemon(slow_standin(make_standin))
    listed = daemon.cli("list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [vm["name"] for vm in json.loads(listed.stdout)] == list(NAMES)


def test_status_right_after_start_shows_the_login(make_standin, start_daemon):
    daemon = start_daemon(slow_standin(make_standin))
    shown = daemon.cli("status", "--json")
    assert shown.returncode == 0, shown.stderr
    status = json.loads(shown.stdout)
    assert status["state"] == "logged_in" and status["videomanagers_total"] == 3


def test_a_failed_login_makes_list_say_why_and_exit_4(make_standin, start_daemon):
    standin = slow_standin(make_standin)
    daemon = start_daemon(standin, password="not-the-password")
    listed = daemon.cli("list")
    assert listed.returncode == 4, listed  # log in first: the credentials were rejected
    assert listed.stdout == ""
    assert "rejected the credentials" in listed.stderr and "credentials_rejected" in \
        listed.stderr, listed.stderr
    assert len(listed.stderr.splitlines()) == 1


def test_list_waits_no_longer_than_its_timeout(make_standin, start_daemon):
    standin = slow_standin(make_standin)
    standin.delay = 8.0
    daemon = start_daemon(standin)
    started = time.monotonic()
    listed = daemon.cli("list", "--timeout", "1")
    assert listed.returncode == 3 and "did not answer within 1 s" in listed.stderr, listed
    assert time.monotonic() - started < 5


def test_with_several_profiles_list_shows_what_it_can_and_names_the_failed_one(
        make_standin, start_daemon, private_dir):
    other = slow_standin(make_standin, username="agency", password="agency-pw")
    write_config(private_dir, profile_table("agency", other, password="wrong-pw"))
    daemon = start_daemon(slow_standin(make_standin))
    listed = daemon.cli("list")
    assert listed.returncode == 4, listed  # the one profile that failed needs a login
    profiles = [re.match(r"[* ] (\S+) ", line) for line in listed.stdout.splitlines()]
    assert [match and match[1] for match in profiles] == ["default"] * 3, listed.stdout
    [said] = listed.stderr.splitlines()
    assert said.startswith("vm-token: profile agency: ") and "rejected" in said, said
