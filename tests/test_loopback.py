"""The peer of a loopback TCP connection, from the kernel (issue 15, point 2; issue 17).

Real connections: one from this process (our uid), one from a real process of another uid
(nobody, through setpriv: we run as root in CI), over IPv4, IPv6 and IPv4-mapped IPv6.
Both ways of asking the kernel — sock_diag over netlink, and the /proc/net/tcp{,6} scan it
falls back to — must give the same answer on each.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from vm_token import _loopback

pytestmark = pytest.mark.timeout(30)

OTHER_UID = 65534  # nobody


def need_other_uid() -> None:
    if os.getuid() != 0 or shutil.which("setpriv") is None or shutil.which("curl") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI must run the other-uid tests (root, setpriv and curl)")
        pytest.skip("needs root, setpriv and curl to connect as another uid")


def need_ipv6_loopback() -> None:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("this machine has no IPv6 loopback")


def listener(family: int = socket.AF_INET, host: str | None = None) -> socket.socket:
    server = socket.socket(family, socket.SOCK_STREAM)
    if host is not None and host.startswith("::ffff:"):
        server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    server.bind((host or ("::1" if family == socket.AF_INET6 else "127.0.0.1"), 0))
    server.listen(4)
    server.settimeout(10)
    return server


def url(server: socket.socket) -> str:
    host, port = server.getsockname()[:2]
    return f"http://{'[::1]' if ':' in host else host}:{port}/"


def both(sock: socket.socket) -> tuple[int | None, int | None]:
    """(sock_diag's answer, the tables' answer) for the peer of `sock`."""
    return _loopback.diag_peer_uid(sock), _loopback.scan_peer_uid(sock)


# (the listener's family and address, the client's family and the address it dials): the
# dual-stack ones see 127.0.0.1 as ::ffff:127.0.0.1 on one side, and the kernel lists the
# AF_INET6 socket of such a pair with IPv4-mapped addresses.
SHAPES = {
    "ipv4": (socket.AF_INET, "127.0.0.1", socket.AF_INET, "127.0.0.1"),
    "ipv6": (socket.AF_INET6, "::1", socket.AF_INET6, "::1"),
    "dual-stack listener": (socket.AF_INET6, "::ffff:127.0.0.1", socket.AF_INET, "127.0.0.1"),
    "dual-stack client": (socket.AF_INET, "127.0.0.1", socket.AF_INET6, "::ffff:127.0.0.1"),
}


@contextmanager
def connected(shape: str) -> Iterator[tuple[socket.socket, socket.socket]]:
    """(the client's socket, the server's accepted one) of a connection of this shape."""
    server_family, server_host, client_family, client_host = SHAPES[shape]
    if "::1" in (server_host, client_host):
        need_ipv6_loopback()
    with listener(server_family, server_host) as server, \
            socket.socket(client_family, socket.SOCK_STREAM) as client:
        client.settimeout(5)
        client.connect((client_host, server.getsockname()[1]))
        accepted, _ = server.accept()
        with accepted:
            yield client, accepted


@pytest.mark.parametrize("shape", SHAPES)
def test_a_connection_of_our_own_is_our_uid_both_ways(shape):
    with connected(shape) as (client, accepted):
        assert both(accepted) == (os.getuid(), os.getuid())
        assert _loopback.peer_uid(accepted) == os.getuid()
        assert _loopback.serves_peer(accepted)
        # and the client's side sees the server's owner: us too
        assert both(client) == (os.getuid(), os.getuid())


@pytest.mark.parametrize("shape", SHAPES)
def test_a_closed_peer_is_nobody_both_ways(shape):
    """Closed, its end lingers in the kernel (FIN_WAIT2, then TIME_WAIT) with inode 0 and
    uid 0: unknown, not root."""
    with connected(shape) as (client, accepted):
        client.close()
        assert accepted.recv(1) == b""  # its FIN arrived
        assert both(accepted) == (None, None)
        assert _loopback.peer_uid(accepted) is None
        assert not _loopback.serves_peer(accepted)


WAITING_CLIENT = """
import socket, sys
sock = socket.create_connection((sys.argv[1], int(sys.argv[2])))
print("connected", flush=True)
sys.stdin.read()  # until the test closes our stdin
"""


@pytest.mark.parametrize("shape", ["ipv4", "ipv6", "dual-stack listener"])
def test_another_users_connection_is_theirs_both_ways_and_refused(shape):
    """A real process of uid 65534 that connects and waits; gone, it is nobody's."""
    need_other_uid()
    server_family, server_host, _, client_host = SHAPES[shape]
    if "::1" in (server_host, client_host):
        need_ipv6_loopback()
    with listener(server_family, server_host) as server:
        client = subprocess.Popen(
            ["setpriv", f"--reuid={OTHER_UID}", f"--regid={OTHER_UID}", "--clear-groups",
             sys.executable, "-I", "-c", WAITING_CLIENT, client_host,
             str(server.getsockname()[1])],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            assert client.stdout is not None and client.stdout.readline() == b"connected\n"
            accepted, _ = server.accept()
            with accepted:
                assert both(accepted) == (OTHER_UID, OTHER_UID)
                assert _loopback.peer_uid(accepted) == OTHER_UID
                assert not _loopback.serves_peer(accepted)
                client.communicate(timeout=10)  # our side closes its stdin: it exits
                assert both(accepted) == (None, None)
        finally:
            client.kill()
            client.wait()


def test_curl_of_another_user_is_theirs():
    need_other_uid()
    with listener() as server:
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


def test_a_listener_on_the_peers_port_is_not_the_peer(monkeypatch):
    """The kernel's exact lookup finds what a packet would reach: with no connected
    socket of that address pair, a listener on the port. It is nobody's peer."""
    loopback = ipaddress.IPv4Address("127.0.0.1")
    with listener() as server, socket.socket() as ours:
        port = server.getsockname()[1]
        ours.bind(("127.0.0.1", 0))
        found = _loopback._diag(socket.AF_INET, (loopback, port),
                                (loopback, ours.getsockname()[1]))
        assert found is not None and found[0] == 0x0A  # LISTEN, of our uid
        # as if `ours` were connected to the listener's port, and its peer gone
        monkeypatch.setattr(_loopback, "_endpoints", lambda sock: (
            (loopback, ours.getsockname()[1]), (loopback, port)))
        assert _loopback.diag_peer_uid(ours) is None


def test_without_netlink_the_tables_answer(monkeypatch):
    """A sandbox that forbids AF_NETLINK (RestrictAddressFamilies) or a kernel without
    tcp_diag: peer_uid still answers, from the tables."""
    monkeypatch.setattr(_loopback, "NETLINK_SOCK_DIAG", 31)  # a netlink family nobody has
    with connected("ipv4") as (client, accepted):
        with pytest.raises(_loopback.DiagUnavailable):
            _loopback.diag_peer_uid(accepted)
        assert _loopback.peer_uid(accepted) == os.getuid()
        client.close()
        assert accepted.recv(1) == b""
        assert _loopback.peer_uid(accepted) is None


def test_a_peer_the_table_does_not_list_is_refused(tmp_path):
    """No entry (another namespace, a table we cannot read): unknown, and not served."""
    empty = tmp_path / "tcp"
    empty.write_text("  sl  local_address rem_address   st tx_queue rx_queue tr tm->when "
                     "retrnsmt   uid  timeout inode\n")
    with listener() as server, socket.create_connection(server.getsockname()[:2],
                                                        timeout=5):
        accepted, _ = server.accept()
        with accepted:
            assert _loopback.scan_peer_uid(accepted, tables=[str(empty)]) is None
            assert _loopback.scan_peer_uid(accepted, tables=[str(tmp_path / "missing")]) \
                is None


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
    kernel lists as uid 0. Taken for root, a root vm-token (CI, containers) would serve it."""
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
            assert both(accepted) == (None, None)
            assert not _loopback.serves_peer(accepted)


async def test_the_proxys_gate_scans_the_tables_in_a_thread(monkeypatch):
    """Without netlink, the proxy's TCP gate still knows its peer, from a scan that runs
    in a worker thread: the event loop serves the other clients meanwhile."""
    import threading

    import trio

    from vm_tokend.proxy.gates import Admission, TcpGate

    scans: list[bool] = []
    real_scan = _loopback.scan_peer_uid

    def scan(sock: socket.socket) -> int | None:
        scans.append(threading.current_thread() is threading.main_thread())
        return real_scan(sock)

    [server] = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = server.socket.getsockname()[1]
    gate = TcpGate("127.0.0.1", port, None)
    async with server, await trio.open_tcp_stream("127.0.0.1", port):
        accepted = await server.accept()
        async with accepted:
            assert await gate.admits(accepted) == Admission(True, os.getuid(), None)
            assert scans == []  # sock_diag answered
            monkeypatch.setattr(_loopback, "NETLINK_SOCK_DIAG", 31)
            monkeypatch.setattr(_loopback, "scan_peer_uid", scan)
            assert await gate.admits(accepted) == Admission(True, os.getuid(), None)
            assert scans == [False]  # once, and not on the event loop's thread
