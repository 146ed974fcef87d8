"""A client that hangs up while its request is in progress (issue 15, findings 4 and 10).

The real vm-tokend against the stand-in, raw sockets as the clients: the daemon must notice
a peer that is gone while it waits on its behalf, end that wait, and free the connection's
slot at once; and a crowd of long waits must never leave a `get` without room.
"""

from __future__ import annotations

import time

import msgpack
import pytest

import vm_token
from tests.e2e import rawwire
from tests.e2e.test_browser_login import standin_env
from vm_tokend.server import connections as server

pytestmark = pytest.mark.timeout(60)

# What a user waits for at most, here, for the daemon to notice a client is gone.
PROMPTLY = 5.0


def open_connections(daemon) -> int:
    """How many connections the daemon has open, not counting the one asking."""
    with daemon.client() as client:
        return int(client.status()["connections_open"]) - 1


def wait_for(predicate, what: str, timeout: float = PROMPTLY) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        time.sleep(0.05)


def send(sock, message: dict) -> None:
    rawwire.send_frame(sock, msgpack.packb(message, use_bin_type=True))


def test_a_device_login_ends_when_its_waiting_client_hangs_up(make_standin, start_daemon):
    """Ctrl-C in `vm-token login --device`: the daemon stops polling for the code, so a
    user who approves it afterwards does not log the daemon in behind their back."""
    standin = make_standin(legacy_only=False)
    standin.device_interval = 1
    daemon = start_daemon(None, env=standin_env(standin))
    started = rawwire.ask(daemon.socket, {"v": 1, "op": "login_start", "method": "device"})
    assert started["ok"], started
    waiter = rawwire.connect(daemon.socket)
    try:
        send(waiter, {"v": 1, "op": "login_wait", "flow": started["flow"]})
        wait_for(lambda: standin.counts["oidc_device"] >= 1, "the daemon polls the provider")
    finally:
        waiter.close()  # vm-token is gone
    wait_for(lambda: open_connections(daemon) == 0, "the waiter's connection is closed")
    with daemon.client() as client:
        assert client.request("login_cancel", flow=started["flow"])["cancelled"] is False
        assert standin.approve_device(started["user_code"])  # the user, too late
        polls = standin.counts["oidc_device"]
        with pytest.raises(vm_token.NotLoggedIn):
            client.get_token()
        assert client.status()["state"] == "logged_out"
    assert standin.counts["oidc_device_ok"] == 0 and standin.counts["oidc_device"] == polls


def test_a_crowd_of_waiters_leaves_room_for_get_and_goes_at_once(make_standin, start_daemon):
    """As many clients as the daemon takes connections wait for a browser login; a `get`
    is still answered, and once the crowd hangs up every slot is free again."""
    standin = make_standin(legacy_only=False)
    daemon = start_daemon(standin)
    with daemon.client() as client:
        client.get_token()  # logged in
        flow = client.request("login_start", method="code",
                              redirect_uri="http://127.0.0.1:45678/callback")["flow"]
    crowd = []
    try:
        for _ in range(server.MAX_CONNECTIONS):
            sock = rawwire.connect(daemon.socket, timeout=10)
            crowd.append(sock)
            send(sock, {"v": 1, "op": "login_wait", "flow": flow, "method": "code"})
        # The waiters beyond the cap hear so at once (and then sit idle).
        refused = rawwire.check_reply(rawwire.read_frame(crowd[-1]))
        assert refused["error"]["code"] == "login_failed", refused
        assert "too many" in refused["error"]["message"]
        token = vm_token.get_token(socket=daemon.socket, timeout=PROMPTLY)
        assert standin.token_valid(token.access_token)
    finally:
        for sock in crowd:
            sock.close()
    wait_for(lambda: open_connections(daemon) == 0, "every waiter's connection is closed")
    with daemon.client() as client:  # the flow itself goes on: only its watchers left
        assert client.request("login_cancel", flow=flow)["cancelled"] is True
