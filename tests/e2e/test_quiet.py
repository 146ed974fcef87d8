"""Quiet at rest (issue 15): logged in and idle, the daemon sleeps until its next refresh.

Counted as the kernel counts them: every time one of the daemon's threads wakes up and
goes back to sleep, its `voluntary_ctxt_switches` grows by one. The stand-in's tokens live
a day, so no refresh falls in the window; nothing talks to the daemon meanwhile.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import vm_token
from tests.e2e.test_systemd import NotifyListener

pytestmark = pytest.mark.timeout(60)

# Long enough that a timer firing every second or two shows many times over.
WINDOW = 10.0
# The bar is at most one wake-up in 30 s: a window a little longer than that, so a
# timer of 15 to 30 s shows too.
REST_WINDOW = 31.0
# Once logged in, what may still be settling: the login's HTTP connection, a worker thread
# going idle. Trio's idle worker threads exit after 10 s; the daemon needs none to log in
# against a numeric address, so a second is plenty. A guess, checked by the figure below.
SETTLE = 1.0


def wakeups(pid: int) -> int:
    """Voluntary context switches of every thread of `pid` so far."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
        except FileNotFoundError:
            continue  # a thread that just ended
        for line in status.splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                total += int(line.split()[1])
    return total


def logged_in_daemon(make_standin, start_daemon, env=None):
    standin = make_standin(access_lifetime=86400, refresh_lifetime=2 * 86400)
    daemon = start_daemon(standin, env=env)
    token = vm_token.get_token(socket=daemon.socket, timeout=10)
    assert standin.token_valid(token.access_token)
    time.sleep(SETTLE)
    return daemon


def test_idle_without_a_watchdog_the_daemon_sleeps(make_standin, start_daemon):
    daemon = logged_in_daemon(make_standin, start_daemon)
    before = wakeups(daemon.proc.pid)
    time.sleep(REST_WINDOW)
    woke = wakeups(daemon.proc.pid) - before
    assert woke <= 1, f"{woke} wake-ups in {REST_WINDOW:g} s of rest"


def test_idle_with_a_watchdog_the_daemon_only_pings(make_standin, start_daemon, private_dir):
    address = str(private_dir / "notify")
    listener = NotifyListener(address)
    try:
        # 4 s: a ping every 2 s, five in the window.
        daemon = logged_in_daemon(make_standin, start_daemon,
                                  env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "4000000"})
        listener.wait_for(lambda m: m.startswith("STATUS=logged in as"))
        listener.wait_for(lambda m: m == "WATCHDOG=1")  # in step with the pings
        seen = len(listener.messages)
        before = wakeups(daemon.proc.pid)
        started = time.monotonic()
        while time.monotonic() - started < WINDOW:
            try:
                listener.messages.append(listener.sock.recv(4096).decode())
            except TimeoutError:
                pass
        woke = wakeups(daemon.proc.pid) - before
    finally:
        listener.sock.close()
    sent = listener.messages[seen:]
    assert set(sent) == {"WATCHDOG=1"}, sent  # and no STATUS= over and over
    assert 4 <= len(sent) <= 6, sent
    assert woke <= len(sent) + 1, f"{woke} wake-ups for {len(sent)} pings"


def test_status_still_follows_a_token_that_runs_out(make_standin, start_daemon, private_dir):
    """Nothing wakes the daemon when a token expires unrefreshed — but STATUS= says so."""
    address = str(private_dir / "notify")
    listener = NotifyListener(address)
    try:
        standin = make_standin(access_lifetime=4)
        daemon = start_daemon(standin, env={"NOTIFY_SOCKET": address})
        vm_token.get_token(socket=daemon.socket, timeout=10)
        listener.wait_for(lambda m: m.endswith("3 VideoManagers, 1 tokens held"))
        standin.delay = 8.0  # the refresh at 2/3 of 4 s hangs past the token's end
        listener.wait_for(lambda m: m.endswith("3 VideoManagers, 0 tokens held"))
        assert standin.counts["refresh"] == 1 and standin.counts["refresh_ok"] == 0
    finally:
        listener.sock.close()
