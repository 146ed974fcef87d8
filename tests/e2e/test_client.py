"""The client library against the real daemon."""

from __future__ import annotations

import socket
import threading
import time

import pytest

import vm_token

pytestmark = pytest.mark.timeout(60)


def test_one_client_shared_by_many_threads(standin, start_daemon):
    daemon = start_daemon(standin)
    tokens: list[vm_token.Token] = []
    failures: list[BaseException] = []
    with daemon.client() as client:
        def work() -> None:
            try:
                for name in ("Marketing", "Sales", "1003") * 7:
                    tokens.append(client.get_token(name))
            except BaseException as exc:  # noqa: BLE001 - reported below
                failures.append(exc)

        threads = [threading.Thread(target=work) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not failures
    assert len(tokens) == 16 * 21
    assert {(t.videomanager_id, t.videomanager_name) for t in tokens} == {
        ("1001", "Marketing"), ("1002", "Sales"), ("1003", "Support")}
    assert all(standin.token_valid(t.access_token, t.videomanager_id) for t in tokens)
    assert all(250 < t.expires_in <= 300 for t in tokens)


def test_client_reconnects_after_a_daemon_restart(standin, start_daemon):
    daemon = start_daemon(standin)
    with daemon.client() as client:
        first = client.get_token()
        assert daemon.stop() == 0
        with pytest.raises(vm_token.DaemonNotRunning):
            client.get_token()
        start_daemon(standin)
        second = client.get_token()
    assert standin.token_valid(second.access_token)
    assert second.access_token != first.access_token


def test_client_gives_up_after_its_timeout(private_dir):
    path = private_dir / "mute"
    mute = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    mute.bind(str(path))
    mute.listen(1)  # accepts (in the backlog) but never answers
    try:
        started = time.monotonic()
        with pytest.raises(vm_token.ProtocolError, match="did not answer within 0.3 s"):
            vm_token.get_token(socket=path, timeout=0.3)
        assert time.monotonic() - started < 2
    finally:
        mute.close()


def test_invalidate_then_get_gives_a_fresh_token(standin, start_daemon):
    daemon = start_daemon(standin)
    with daemon.client() as client:
        old = client.get_token("Sales")
        assert client.invalidate(old) is True
        assert client.invalidate(old) is False  # stale: nothing happens
        new = client.get_token("Sales")
    assert new.access_token != old.access_token
    assert standin.token_valid(new.access_token, "1002")
    assert standin.counts["refresh"] == 2


def test_after_the_api_revokes_every_token_one_report_brings_a_fresh_one(standin,
                                                                          start_daemon):
    daemon = start_daemon(standin)
    with daemon.client() as client:
        old = client.get_token()
        standin.revoke_access_tokens()
        assert not standin.token_valid(old.access_token)
        # A hundred clients seeing 401 and reporting it: one refresh.
        assert [client.invalidate(old) for _ in range(100)].count(True) == 1
        new = client.get_token()
    assert standin.token_valid(new.access_token, "1001")
    assert standin.counts["refresh"] == 1


def test_a_full_accept_queue_is_waited_out_not_reported_at_once(private_dir):
    path = private_dir / "busy"
    busy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    busy.bind(str(path))
    busy.listen(0)
    queued = []
    try:
        for _ in range(3):  # fill the accept queue: further connects get EAGAIN
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect(str(path))
            except BlockingIOError:
                s.close()
                break
            queued.append(s)
        started = time.monotonic()
        with pytest.raises(vm_token.ProtocolError, match="did not accept the connection"):
            vm_token.get_token(socket=path, timeout=0.5)
        assert time.monotonic() - started >= 0.45
    finally:
        for s in queued:
            s.close()
        busy.close()
