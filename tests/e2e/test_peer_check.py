"""Clients refuse a daemon of another user before they send anything (issue 9, point 6).

The impostor is a real listener running as another uid (SO_PEERCRED reports whoever called
listen(), so it must really be another process's uid): this needs root to switch uid. On a
developer's machine without root the tests skip; in CI (CI=true) they fail instead, so a
runner that lost the capability cannot make them pass silently.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

import vm_token
from tests.conftest import BIN, clean_env
from vm_token import _wire, protocol

pytestmark = pytest.mark.timeout(60)

OTHER_UID = 65534  # nobody
PASSWORD = "impostor-must-not-see-this"  # noqa: S105 - a test value

# Runs as root until it has imported what it needs (the interpreter lives under /root),
# then becomes OTHER_UID and only then binds and listens. It counts every byte any client
# sends it and prints the total when its stdin closes (all of it: queued connections too).
LISTENER = r"""
import os, select, socket, sys
path, uid = sys.argv[1], int(sys.argv[2])
os.setgroups([])
os.setgid(uid)
os.setuid(uid)
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind(path)
server.listen(16)
print("ready", os.getuid(), flush=True)
total, connections, open_ = 0, 0, []
while True:
    readable, _, _ = select.select([server, sys.stdin, *open_], [], [])
    for r in readable:
        if r is sys.stdin:
            if not sys.stdin.readline():
                # Done: accept what is still queued, read every connection to its end.
                server.setblocking(False)
                while True:
                    try:
                        open_.append(server.accept()[0])
                        connections += 1
                    except BlockingIOError:
                        break
                for conn in open_:
                    conn.settimeout(5)
                    while data := conn.recv(65536):
                        total += len(data)
                print(connections, total, flush=True)
                sys.exit(0)
        elif r is server:
            conn, _ = server.accept()
            connections += 1
            open_.append(conn)
        else:
            data = r.recv(65536)
            total += len(data)
            if not data:
                open_.remove(r)
                r.close()
"""


def _can_switch_uid() -> bool:
    return os.geteuid() == 0


def _require_root() -> None:
    if _can_switch_uid():
        return
    reason = "needs root to run a listener as another uid"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason}, and CI must run this test")
    pytest.skip(reason)


class Impostor:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-c", LISTENER, str(path), str(OTHER_UID)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        ready = self.proc.stdout.readline().split()
        assert ready == ["ready", str(OTHER_UID)], ready

    def received(self) -> tuple[int, int]:
        """(connections accepted, bytes received), once every client is done."""
        out, _ = self.proc.communicate(timeout=10)
        connections, total = map(int, out.split())
        return connections, total


@pytest.fixture
def impostor() -> Iterator[Impostor]:
    _require_root()
    # World-accessible, as /tmp is: anyone could have created the socket here.
    directory = Path(tempfile.mkdtemp(prefix="vmt-peer-"))
    directory.chmod(0o777)
    listener = Impostor(directory / "socket")
    try:
        yield listener
    finally:
        if listener.proc.poll() is None:
            listener.proc.kill()
            listener.proc.wait()
        shutil.rmtree(directory, ignore_errors=True)


def _refused(message: str, path: Path) -> None:
    assert f"vm-tokend at {path} is owned by uid {OTHER_UID}, not you" in message, message
    assert "refusing to use it" in message
    assert PASSWORD not in message


def test_every_client_refuses_another_users_daemon_and_sends_nothing(impostor, private_dir):
    path = impostor.path
    env = {**clean_env(private_dir), "VM_TOKEN_SOCKET": str(path)}

    def cli(*args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "vm-token"), *args], input=input, env=env,
                              capture_output=True, text=True, timeout=15, check=False)

    login = cli("login", "--username", "x", "--password-stdin", input=PASSWORD + "\n")
    token = cli("token")
    git = cli("get", input="protocol=https\nhost=api.video-cdn.net\n\n")
    for result in (login, token):
        assert result.returncode == 3, result
        assert result.stdout == ""
        assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr
        _refused(result.stderr, path)
    assert git.returncode == 0 and git.stdout == ""  # git goes on to its next helper
    _refused(git.stderr, path)

    with pytest.raises(vm_token.UntrustedDaemon) as blocking:
        vm_token.Client(path, timeout=5).login("x", PASSWORD)
    _refused(str(blocking.value), path)
    with pytest.raises(vm_token.Error) as blocking_get:
        vm_token.Client(path, timeout=5).get_token()
    _refused(str(blocking_get.value), path)

    async def under_trio() -> None:
        with trio.fail_after(10):
            async with vm_token.AsyncClient(path) as client:
                with pytest.raises(vm_token.UntrustedDaemon) as refused:
                    await client.login("x", PASSWORD)
                _refused(str(refused.value), path)
                with pytest.raises(vm_token.UntrustedDaemon):
                    await client.get_token()

    async def under_asyncio() -> None:
        async with asyncio.timeout(10):
            async with vm_token.AsyncClient(path) as client:
                with pytest.raises(vm_token.UntrustedDaemon) as refused:
                    await client.login("x", PASSWORD)
                _refused(str(refused.value), path)

    trio.run(under_trio)
    asyncio.run(under_asyncio())

    connections, received = impostor.received()
    # Every client did connect (so the refusal is the peer check, not a missing socket)...
    assert connections == 8
    # ...and not one byte of a request, let alone the password, reached the impostor.
    assert received == 0


class _FakePeer:
    def __init__(self, uid: int) -> None:
        self.uid = uid

    def getsockopt(self, level: int, option: int, size: int) -> bytes:
        assert (level, option, size) == (socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        return struct.pack("3i", 4242, self.uid, 7)  # Linux's struct ucred


def test_the_peer_check_reads_the_uid_from_ucred():
    """Without root too: root and our own uid pass, any other uid is refused by number."""
    _wire.check_peer(_FakePeer(os.getuid()), "/s")
    _wire.check_peer(_FakePeer(0), "/s")
    for uid in (OTHER_UID, os.getuid() + 1, 4242, 7):
        if uid in (0, os.getuid()):
            continue
        with pytest.raises(vm_token.UntrustedDaemon, match=f"owned by uid {uid}, not you"):
            _wire.check_peer(_FakePeer(uid), "/s")


# -- the /tmp fallback directory ---------------------------------------------------------------


@pytest.fixture
def fallback_dir() -> Iterator[Path]:
    """The real `/tmp/vm-token-<uid>`, which `vm-token` uses without XDG_RUNTIME_DIR."""
    directory = Path(protocol.fallback_directory())
    if directory.exists():
        pytest.skip(f"{directory} exists (a daemon of this user may be using it)")
    directory.mkdir(mode=0o700)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_vm_token_refuses_an_unsafe_fallback_directory(fallback_dir, private_dir):
    env = {k: v for k, v in clean_env(private_dir).items() if k != "XDG_RUNTIME_DIR"}

    def token() -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "vm-token"), "token"], env=env, capture_output=True,
                              text=True, timeout=15, check=False)

    private = token()  # ours and 0700: the check passes, and nothing listens there
    assert private.returncode == 3 and "vm-tokend is not running" in private.stderr

    fallback_dir.chmod(0o755)
    open_to_others = token()
    assert open_to_others.returncode == 3
    assert open_to_others.stderr.count("\n") == 1 and "Traceback" not in open_to_others.stderr
    assert f"{fallback_dir} is accessible to other users (mode 0755)" in open_to_others.stderr
    assert f"chmod 700 {fallback_dir}" in open_to_others.stderr

    if os.geteuid() == 0:  # only root can give a directory away
        fallback_dir.chmod(0o700)
        os.chown(fallback_dir, OTHER_UID, OTHER_UID)
        someone_elses = token()
        assert someone_elses.returncode == 3 and someone_elses.stderr.count("\n") == 1
        assert f"{fallback_dir} is owned by uid {OTHER_UID}, not you" in someone_elses.stderr

    # The library says the same.
    with pytest.raises(vm_token.UntrustedDaemon):
        vm_token.Client(fallback_dir / "socket", timeout=2).get_token()

    async def under_trio() -> None:
        with trio.fail_after(10):
            async with vm_token.AsyncClient(fallback_dir / "socket") as client:
                with pytest.raises(vm_token.UntrustedDaemon):
                    await client.hello()

    trio.run(under_trio)
