"""Who is on the other end of a loopback TCP connection: the kernel's socket table says.

A Unix socket tells its peer's uid (SO_PEERCRED); TCP does not, and any local user can
connect to 127.0.0.1. The login listener of `vm-token login --browser` (and the API proxy's
`--listen`) must serve only its own user, so they look the peer up where Linux lists every
TCP socket with the uid that made it: /proc/net/tcp and /proc/net/tcp6. The peer's socket is
the entry whose local address is our connection's remote one and whose remote address is
our local one.

    peer_uid(sock)          the peer's uid, or None when the table does not say
    serves_peer(sock)       whether to answer: on Linux only our own uid (unknown: no)

Stdlib only: the client package imports it, and the daemon may.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
from collections.abc import Iterable

__all__ = ["parse_table", "peer_uid", "serves_peer"]

TABLES = ("/proc/net/tcp", "/proc/net/tcp6")
# Socket states (include/net/tcp_states.h) whose entries are no live peer: TIME_WAIT and
# CLOSE list uid 0 (a time-wait socket has no owner), LISTEN is a server, not a peer.
_NOT_A_PEER = frozenset({0x06, 0x07, 0x0A})

Address = tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]


def _address(text: str) -> Address:
    """An `ADDR:PORT` of the table: the address as the kernel's 32-bit words in host byte
    order (one for IPv4, four for IPv6), each printed as 8 hex digits; the port in hex."""
    addr, port = text.split(":")
    raw = b"".join(int(addr[i:i + 8], 16).to_bytes(4, sys.byteorder)
                   for i in range(0, len(addr), 8))
    return _plain(ipaddress.ip_address(raw)), int(port, 16)


def _plain(address: ipaddress.IPv4Address | ipaddress.IPv6Address
           ) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """IPv4-mapped IPv6 (a dual-stack socket's view of 127.0.0.1) as the IPv4 it is."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def parse_table(lines: Iterable[str]) -> list[tuple[Address, Address, int, int]]:
    """The entries of a /proc/net/tcp{,6} table: (local, remote, state, uid) each. Lines
    that do not parse (the header) are skipped, and so are orphans: a socket whose process
    closed it (FIN_WAIT2 after a send-and-close, TIME_WAIT) has inode 0 and lists uid 0,
    which would pass for root's."""
    entries = []
    for line in lines:
        fields = line.split()
        if len(fields) < 10 or not fields[0].endswith(":"):
            continue
        try:
            if int(fields[9]) == 0:
                continue
            entries.append((_address(fields[1]), _address(fields[2]), int(fields[3], 16),
                            int(fields[7])))
        except ValueError:
            continue
    return entries


def _endpoint(name: tuple[object, ...]) -> Address:
    host, port = name[0], name[1]
    assert isinstance(host, str) and isinstance(port, int)
    return _plain(ipaddress.ip_address(host.split("%")[0])), port


def peer_uid(sock: socket.socket, tables: Iterable[str] = TABLES) -> int | None:
    """The uid that owns the other end of `sock` (a connected TCP socket on this machine),
    or None when no table lists it: not Linux, no /proc, a peer on another host or in
    another network namespace, or one that went away."""
    try:
        ours, theirs = _endpoint(sock.getsockname()), _endpoint(sock.getpeername())
    except (OSError, ValueError):
        return None
    uids = set()
    for table in tables:
        try:
            with open(table, encoding="ascii") as lines:
                for local, remote, state, uid in parse_table(lines):
                    if local == theirs and remote == ours and state not in _NOT_A_PEER:
                        uids.add(uid)
        except (OSError, UnicodeDecodeError):
            continue
    # Two live sockets with one address pair cannot be; if the table ever said so, it
    # would not tell us who it is.
    return uids.pop() if len(uids) == 1 else None


def serves_peer(sock: socket.socket) -> bool:
    """Whether a loopback listener should answer the connection `sock`.

    On Linux: only when the peer's uid is ours; a peer the table does not list is refused
    (it is not provably ours). Elsewhere there is no such table: True, and what the listener
    guards must be safe without it (the login's one-time address and its state)."""
    if not sys.platform.startswith("linux"):
        return True
    return peer_uid(sock) == os.getuid()
