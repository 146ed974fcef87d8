"""The peer of a loopback TCP connection, from the kernel's socket table (issue 15, point 2).

Real connections: one from this process (our uid), one from a real process of another uid
(nobody, through setpriv: we run as root in CI), over IPv4 and IPv6.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

import pytest

from vm_token import _loopback

pytestmark = pytest.mark.timeout(30)

OTHER_UID = 65534  # nobody


def need_other_uid() -> None:
    if os.getuid() != 0 or shutil.which("setpriv") is None or shutil.which("curl") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI must run the other-uid tests (root, setpriv and curl)")
        pytest.skip("needs root, setpriv and curl to connect as another uid")


def listener(family: int = socket.AF_INET) -> socket.socket:
    server = socket.socket(family, socket.SOCK_STREAM)
    server.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
    server.listen(4)
    server.settimeout(10)
    return server


def url(server: socket.socket) -> str:
    host, port = server.getsockname()[:2]
    return f"http://{'[::1]' if ':' in host else host}:{port}/"


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_a_connection_of_our_own_is_our_uid(family):
    if family == socket.AF_INET6 and not socket.has_ipv6:
        pytest.skip("no IPv6")
    with listener(family) as server, socket.create_connection(
            server.getsockname()[:2], timeout=5) as client:
        accepted, _ = server.accept()
        with accepted:
            assert _loopback.peer_uid(accepted) == os.getuid()
            assert _loopback.serves_peer(accepted)
            # and the client's side sees the server's owner: us too
            assert _loopback.peer_uid(client) == os.getuid()


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_another_users_connection_is_theirs_and_refused(family):
    need_other_uid()
    if family == socket.AF_INET6 and not socket.has_ipv6:
        pytest.skip("no IPv6")
    with listener(family) as server:
        curl = subprocess.Popen(
            ["setpriv", f"--reuid={OTHER_UID}", f"--regid={OTHER_UID}", "--clear-groups",
             "curl", "-s", "-o", "/dev/null", "--max-time", "10", url(server)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            accepted, _ = server.accept()
            with accepted:
                assert _loopback.peer_uid(accepted) == OTHER_UID
                assert not _loopback.serves_peer(accepted)
        finally:
            curl.kill()
            curl.wait()


def test_a_peer_the_table_does_not_list_is_refused(tmp_path):
    """No entry (another namespace, a table we cannot read): unknown, and not served."""
    empty = tmp_path / "tcp"
    empty.write_text("  sl  local_address rem_address   st tx_queue rx_queue tr tm->when "
                     "retrnsmt   uid  timeout inode\n")
    with listener() as server, socket.create_connection(server.getsockname()[:2],
                                                        timeout=5):
        accepted, _ = server.accept()
        with accepted:
            assert _loopback.peer_uid(accepted, tables=[str(empty)]) is None
            assert _loopback.peer_uid(accepted, tables=[str(tmp_path / "missing")]) is None


def test_the_table_format():
    """Addresses in host byte order, ports in hex; a time-wait entry is nobody's peer."""
    big = sys.byteorder == "big"
    v4 = "7F000001" if big else "0100007F"
    v6_loopback = ("00000000" * 3) + ("00000001" if big else "01000000")
    mapped = "00000000" + "00000000" + ("0000FFFF" if big else "FFFF0000") + v4
    lines = [
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid",
        f"   0: {v4}:1F90 {v4}:D431 01 00000000:00000000 00:00000000 00000000  1000 0 1 1",
        f"   1: {v6_loopback}:0050 {mapped}:0051 06 00000000:00000000 00:00000000 00000000 "
        "0 0 7 1",
        # an orphan (its process closed it): inode 0, uid 0 — nobody's, not root's
        f"   2: {v4}:1F91 {v4}:D432 05 00000000:00000000 00:00000000 00000000     0 0 0 1",
    ]
    [first, second] = _loopback.parse_table(lines)
    assert str(first[0][0]) == "127.0.0.1" and first[0][1] == 8080
    assert first[1][1] == 0xD431 and first[2] == 1 and first[3] == 1000
    assert str(second[0][0]) == "::1" and str(second[1][0]) == "127.0.0.1"
    assert second[2] == 6


def test_a_peer_that_sent_and_closed_is_nobody_not_root():
    """Another uid connects, sends, closes before we accept: its end is an orphan that the
    table lists as uid 0. Taken for root, a root vm-token (CI, containers) would serve it."""
    need_other_uid()
    with listener() as server:
        host, port = server.getsockname()[:2]
        subprocess.run(
            ["setpriv", f"--reuid={OTHER_UID}", f"--regid={OTHER_UID}", "--clear-groups",
             sys.executable, "-c",
             "import socket, sys; s = socket.create_connection((sys.argv[1], int(sys.argv[2])));"
             " s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n'); s.close()", host, str(port)],
            check=True, timeout=10)
        accepted, _ = server.accept()
        with accepted:
            assert _loopback.peer_uid(accepted) is None
            assert not _loopback.serves_peer(accepted)
