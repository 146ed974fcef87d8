"""Whole-process tests: the real vm-tokend against the stand-in API over real HTTP."""

from __future__ import annotations

import signal
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
from functools import partial

import msgpack
import pytest
import trio

import vm_token
from vm_token import protocol

pytestmark = pytest.mark.timeout(120)


def api_accepts(standin, token: str, videomanager_id: str) -> bool:
    request = urllib.request.Request(
        f"{standin.url}/{videomanager_id}/videos",
        headers={"Authorization": f"Bearer {token}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310 - loopback
            return response.status == 200
    except urllib.error.HTTPError:
        return False


async def in_thread(fn, *args, limiter=None):
    return await trio.to_thread.run_sync(fn, *args, limiter=limiter)


async def test_tokens_stay_valid_with_six_second_tokens(make_standin, start_daemon):
    standin = make_standin(access_lifetime=6)
    daemon = start_daemon(standin)
    with trio.fail_after(40):
        seen = set()
        with daemon.client() as client:
            await in_thread(client.get_token)  # logged in
            logins = standin.counts["login"]
            refreshes = standin.counts["refresh"]
            started = time.monotonic()
            while time.monotonic() - started < 20:
                token = await in_thread(client.get_token)
                assert await in_thread(api_accepts, standin, token.access_token, "1001")
                seen.add(token.access_token)
                await trio.sleep(1.5)
        refreshed = standin.counts["refresh"] - refreshes
        assert 2 <= refreshed <= 12
        assert standin.counts["login"] == logins == 1
        assert len(seen) >= 2


def many_clients_at_once(daemon, names: list[str]) -> list[vm_token.Token]:
    barrier = threading.Barrier(len(names))
    results: list[vm_token.Token] = []
    failures: list[BaseException] = []

    def one(name: str) -> None:
        try:
            with daemon.client(timeout=10) as client:
                client.hello()  # connected before the race
                barrier.wait()
                results.append(client.get_token(name))
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    threads = [threading.Thread(target=one, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures
    return results


async def test_sixty_clients_cause_one_refresh(make_standin, start_daemon):
    standin = make_standin()
    daemon = start_daemon(standin)
    standin.delay = 0.7
    with trio.fail_after(30):
        results = await in_thread(many_clients_at_once, daemon, ["Sales"] * 60)
    assert len(results) == 60
    assert len({t.access_token for t in results}) == 1
    assert standin.counts["refresh"] == 1
    assert api_accepts(standin, results[0].access_token, "1002")


async def test_sixty_clients_three_videomanagers_rotating_tokens(make_standin, start_daemon):
    standin = make_standin(
        rotate_refresh_tokens=True,
        videomanagers=[("1001", "Marketing"), ("1002", "Sales"), ("1003", "Support"),
                       ("1004", "Legal")],
    )
    daemon = start_daemon(standin)
    standin.delay = 0.7
    names = ["Sales", "Support", "Legal"] * 20
    with trio.fail_after(30):
        results = await in_thread(many_clients_at_once, daemon, names)
    assert len({t.access_token for t in results}) == 3
    assert standin.counts["refresh"] == 3
    assert standin.counts["refresh_ok"] == 3
    assert standin.counts["refresh_reused"] == 0
    for token in results:
        assert api_accepts(standin, token.access_token, token.videomanager_id)


async def test_outage_serves_valid_tokens_backs_off_and_recovers(make_standin, start_daemon):
    standin = make_standin(access_lifetime=6)
    daemon = start_daemon(standin)
    with trio.fail_after(90), daemon.client() as client:
        before = await in_thread(client.get_token)
        standin.fail(503)
        outage_started = time.monotonic()
        # Still valid: served.
        during = await in_thread(client.get_token)
        assert during.access_token == before.access_token
        # Expired: a clear error naming the upstream failure.
        await trio.sleep(max(0.0, before.expires_in) + 0.5)
        with pytest.raises(vm_token.UpstreamUnavailable) as info:
            await in_thread(client.get_token)
        assert "has expired" in str(info.value) and "HTTP 503" in str(info.value)
        result = await in_thread(daemon.cli, "token")
        assert result.returncode == 1 and result.stdout == ""
        assert "HTTP 503" in result.stderr and len(result.stderr.splitlines()) == 1
        await trio.sleep(max(0.0, 12 - (time.monotonic() - outage_started)))
        attempts = [t for t, kind in standin.requests if kind == "refresh"
                    and t >= outage_started]
        gaps = [b - a for a, b in zip(attempts, attempts[1:], strict=False)]
        # Full jitter: the n-th wait is at most 2**n s (plus scheduling slack).
        assert len(attempts) >= 3
        assert all(gap <= 2 ** n + 0.5 for n, gap in enumerate(gaps))
        standin.heal()
        healed = time.monotonic()
        while True:
            try:
                token = await in_thread(client.get_token)
                break
            except vm_token.UpstreamUnavailable:
                await trio.sleep(0.2)
        assert time.monotonic() - healed <= 60
        assert api_accepts(standin, token.access_token, "1001")
        assert standin.counts["login"] == 1


async def test_wrong_password_one_attempt_until_credentials_change(make_standin, start_daemon):
    standin = make_standin()
    daemon = start_daemon(standin, password="wrong-password")
    with trio.fail_after(30), daemon.client() as client:
        for _ in range(5):
            with pytest.raises(vm_token.CredentialsRejected, match="rejected the credentials"):
                await in_thread(client.get_token)
            await trio.sleep(0.5)
        result = await in_thread(daemon.cli, "token")
        assert result.returncode == 4  # log in first: new credentials
        assert "rejected the credentials" in result.stderr
        assert standin.counts["login"] == 1
        # New credentials through `vm-token login`: one more attempt, and it works.
        result = await in_thread(
            lambda: daemon.cli("login", "--username", standin.username, "--password-stdin",
                               input=standin.password + "\n"))
        assert result.returncode == 0, result.stderr
        token = await in_thread(client.get_token)
        assert api_accepts(standin, token.access_token, "1001")
        assert standin.counts["login"] == 2


def raw_connection(path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path))
    return sock


def closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def exchange(sock: socket.socket, payload: bytes) -> dict:
    sock.sendall(struct.pack(">I", len(payload)) + payload)
    header = sock.recv(4, socket.MSG_WAITALL)
    (length,) = struct.unpack(">I", header)
    return msgpack.unpackb(sock.recv(length, socket.MSG_WAITALL))


async def test_hostile_clients_do_not_delay_a_normal_one(standin, start_daemon):
    daemon = start_daemon(standin)
    hostile = []
    try:
        for _ in range(300):  # hundreds of idle connections
            hostile.append(raw_connection(daemon.socket))
        truncated = raw_connection(daemon.socket)
        truncated.sendall(struct.pack(">I", 1000) + b"\x81")  # and then nothing
        hostile.append(truncated)
        oversize = raw_connection(daemon.socket)
        hostile.append(oversize)
        oversize.sendall(struct.pack(">I", protocol.MAX_FRAME + 1))
        assert closed_by_peer(oversize)  # at once
        garbage = raw_connection(daemon.socket)
        hostile.append(garbage)
        for payload in (b"\xc1\xc1\xc1", msgpack.packb([1, 2]), msgpack.packb({"op": "get"}),
                        msgpack.packb({"v": 1, "op": "nope"}),
                        msgpack.packb({"v": 1, "op": "get", "min_ttl": "soon"}),
                        msgpack.packb({"v": 1, "op": "get", "vm": ["x"]})):
            reply = exchange(garbage, payload)
            assert reply["ok"] is False and reply["error"]["code"] == "bad_request"
            assert reply["error"]["message"]
        reply = exchange(garbage, msgpack.packb({"v": 99, "op": "get"}))
        assert reply["error"]["code"] == "unsupported_version"
        with trio.fail_after(1):
            token = await in_thread(partial(vm_token.get_token, socket=daemon.socket))
        assert api_accepts(standin, token.access_token, "1001")
        # The same connection keeps working after bad requests.
        assert exchange(garbage, msgpack.packb({"v": 1, "op": "hello"}))["ok"] is True
    finally:
        for sock in hostile:
            sock.close()
    assert daemon.proc.poll() is None
    assert daemon.stop() == 0


async def test_no_secret_in_any_log_line(make_standin, start_daemon):
    standin = make_standin(access_lifetime=3, rotate_refresh_tokens=True)
    daemon = start_daemon(standin)  # at debug level
    with trio.fail_after(40), daemon.client() as client:
        for name in ("Marketing", "Sales", "Support"):
            token = await in_thread(client.get_token, name)
        await in_thread(client.invalidate, token)
        await in_thread(client.get_token, "Support")
        standin.expire_refresh_tokens()  # forces a login again
        await trio.sleep(4)
        await in_thread(client.get_token, "Sales")
        status = await in_thread(client.status)
        listing = await in_thread(client.list_videomanagers)
        standin.fail(502, body="html", count=2)
        await trio.sleep(3)
        with pytest.raises(vm_token.CredentialsRejected):
            await in_thread(client.login, standin.username, "a-wrong-password-123")
        await in_thread(client.login, standin.username, standin.password)
        await in_thread(client.get_token)
    assert daemon.stop() == 0
    log = daemon.log()
    assert "logged in" in log and "DEBUG" in log
    secrets = [*standin.issued, standin.password, "a-wrong-password-123"]
    assert len(standin.issued) >= 8
    for secret in secrets:
        assert secret not in log
        assert secret not in repr(status) and secret not in repr(listing)
    # The JWT payloads neither (a token cut in pieces is still a token).
    for token in standin.issued:
        assert token.split(".")[1] not in log


async def test_sigterm_finishes_in_flight_requests_and_removes_the_socket(standin,
                                                                          start_daemon):
    daemon = start_daemon(standin)
    standin.delay = 1.0
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            result: list[vm_token.Token] = []

            async def slow_get() -> None:
                result.append(await in_thread(partial(vm_token.get_token, "Sales",
                                                      socket=daemon.socket)))

            refreshes = standin.counts["refresh"]
            nursery.start_soon(slow_get)
            # Counted on arrival, answered a second later: the refresh is under way.
            while standin.counts["refresh"] == refreshes:  # noqa: ASYNC110 - another thread's counter
                await trio.sleep(0.01)
            daemon.signal(signal.SIGTERM)
        assert await in_thread(daemon.proc.wait) == 0
    assert result and result[0].videomanager_name == "Sales"
    assert not daemon.socket.exists()


async def test_a_second_daemon_refuses_to_start(standin, start_daemon):
    first = start_daemon(standin)
    second = start_daemon(standin, wait=False)
    assert second.proc.wait(timeout=15) == 1
    assert "already serving" in second.log()
    assert first.proc.poll() is None
    assert first.stop() == 0


async def test_stale_socket_file_is_replaced(standin, start_daemon, private_dir):
    directory = private_dir / "vm-token"
    directory.mkdir(mode=0o700)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(directory / "socket"))
    stale.close()  # a socket file nobody listens on
    daemon = start_daemon(standin)
    assert vm_token.get_token(socket=daemon.socket).videomanager_id == "1001"


async def test_sighup_reloads_the_password_file(standin, start_daemon, private_dir):
    password_file = private_dir / "password"
    password_file.write_text("wrong\n")
    daemon = start_daemon(standin, password="",
                          env={"VM_TOKEN_PASSWORD_FILE": str(password_file)})
    with trio.fail_after(20):
        with pytest.raises(vm_token.CredentialsRejected):
            await in_thread(partial(vm_token.get_token, socket=daemon.socket))
        password_file.write_text(standin.password + "\n")
        daemon.signal(signal.SIGHUP)
        while True:
            try:
                token = await in_thread(partial(vm_token.get_token, socket=daemon.socket))
                break
            except vm_token.CredentialsRejected:
                await trio.sleep(0.1)
    assert api_accepts(standin, token.access_token, "1001")
    assert "reloading" in daemon.log()


async def test_sighup_applies_the_config_file(make_standin, start_daemon, private_dir):
    first, second = make_standin(), make_standin(username="other", password="other-pw")
    config = private_dir / "config" / "vm-token" / "config.toml"
    config.parent.mkdir(parents=True)

    def write(standin, password: str, default: str = "Marketing") -> None:
        config.write_text(f'api_url = "{standin.url}"\nusername = "{standin.username}"\n'
                          f'password = "{password}"\ndefault_videomanager = "{default}"\n')

    write(first, first.password)
    daemon = start_daemon(None)  # all from the config file ($XDG_CONFIG_HOME/vm-token)
    client = partial(vm_token.get_token, socket=daemon.socket)

    async def after_reload(expect):
        daemon.signal(signal.SIGHUP)
        with trio.fail_after(10):
            while True:
                try:
                    result = await in_thread(client)
                except (vm_token.CredentialsRejected, vm_token.UpstreamUnavailable) as exc:
                    result = exc
                if expect(result):
                    return result
                await trio.sleep(0.1)

    assert first.token_valid((await in_thread(client)).access_token, "1001")
    # Same credentials, another default: no new login.
    write(first, first.password, default="Sales")
    token = await after_reload(lambda r: isinstance(r, vm_token.Token)
                               and r.videomanager_name == "Sales")
    assert first.token_valid(token.access_token, "1002")
    assert first.counts["login"] == 1
    # A wrong password: a new session, rejected; then the right one again.
    write(first, "wrong", default="Sales")
    await after_reload(lambda r: isinstance(r, vm_token.CredentialsRejected))
    write(first, first.password, default="Sales")
    await after_reload(lambda r: isinstance(r, vm_token.Token))
    assert first.counts["login"] == 3
    # Another API and user altogether.
    write(second, second.password)
    token = await after_reload(lambda r: isinstance(r, vm_token.Token)
                               and second.token_valid(r.access_token))
    assert second.counts["login"] == 1
    assert daemon.proc.poll() is None
