"""Who is on the other end of a loopback TCP connection: the kernel says.

A Unix socket tells its peer's uid (SO_PEERCRED); TCP does not, and any local user can
connect to 127.0.0.1. The login listener of `vm-token login --browser` (and the API proxy's
`--listen`) must serve only its own user, so they ask the kernel which uid made the socket
at the other end: the one whose local address is our connection's remote one and whose
remote address is our local one.

Two ways to ask, on Linux:
- sock_diag (netlink, NETLINK_SOCK_DIAG): one request naming the exact socket, answered
  from the kernel's hash table: microseconds, however many sockets the machine has;
- /proc/net/tcp and /proc/net/tcp6: every TCP socket of the machine as text, which the
  kernel writes out whole at every read: ~30 ms with 20,000 sockets (and ~200 ms when
  every line was parsed). The fallback where netlink is not allowed (a sandbox's
  RestrictAddressFamilies, a seccomp filter) or the kernel has no tcp_diag.

    peer_uid(sock)          the peer's uid, or None when the kernel does not say
    diag_peer_uid(sock)     the same through sock_diag alone; DiagUnavailable if it can't ask
    scan_peer_uid(sock)     the same through the /proc tables alone (slow: not on a loop)
    serves_peer(sock)       whether to answer: on Linux only our own uid (unknown: no)

Stdlib only: the client package imports it, and the daemon may.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
import sys
from collections.abc import Iterable

__all__ = ["DiagUnavailable", "diag_peer_uid", "parse_table", "peer_uid", "scan_peer_uid",
           "serves_peer"]

TABLES = ("/proc/net/tcp", "/proc/net/tcp6")
# Socket states (include/net/tcp_states.h) whose entries are no live peer: TIME_WAIT and
# CLOSE list uid 0 (a time-wait socket has no owner), LISTEN is a server, not a peer.
_NOT_A_PEER = frozenset({0x06, 0x07, 0x0A})

Address = tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]


class DiagUnavailable(Exception):
    """sock_diag cannot be asked here (not Linux, netlink refused, no tcp_diag): use the
    tables."""


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


def _endpoints(sock: socket.socket) -> tuple[Address, Address] | None:
    """(ours, theirs) of a connected TCP socket, IPv4-mapped ones as IPv4; None if it is
    not connected (any more)."""
    try:
        return _endpoint(sock.getsockname()), _endpoint(sock.getpeername())
    except (OSError, ValueError):
        return None


def peer_uid(sock: socket.socket) -> int | None:
    """The uid that owns the other end of `sock` (a connected TCP socket on this machine),
    or None when the kernel does not list it: not Linux, no /proc, a peer on another host
    or in another network namespace, one that went away (or only lingers in the kernel
    after its process closed it: that is nobody's, not root's).

    sock_diag when it can be asked (microseconds), else the /proc tables (a scan of every
    socket of the machine: keep it off an event loop)."""
    try:
        return diag_peer_uid(sock)
    except DiagUnavailable:
        return scan_peer_uid(sock)


def scan_peer_uid(sock: socket.socket, tables: Iterable[str] = TABLES) -> int | None:
    """peer_uid from the /proc/net/tcp{,6} tables: O(sockets on the machine)."""
    if (pair := _endpoints(sock)) is None:
        return None
    ours, theirs = pair
    # The peer's line has its local port as `:%04X ` (the kernel's format); the others
    # are skipped unparsed, which is most of the time a big table takes.
    needle = f":{theirs[1]:04X} "
    uids = set()
    for table in tables:
        try:
            with open(table, encoding="ascii") as lines:
                for local, remote, state, uid in parse_table(
                        line for line in lines if needle in line):
                    if local == theirs and remote == ours and state not in _NOT_A_PEER:
                        uids.add(uid)
        except (OSError, UnicodeDecodeError):
            continue
    # Two live sockets with one address pair cannot be; if the table ever said so, it
    # would not tell us who it is.
    return uids.pop() if len(uids) == 1 else None


# sock_diag, from the kernel's UAPI headers (include/uapi/linux/{netlink,sock_diag,
# inet_diag}.h). Every field is in host byte order but ports and addresses, which are
# big-endian (__be16, __be32): those are packed here as raw bytes, so one native struct
# ("=": no padding, none is needed: every field is naturally aligned) covers a message.
NETLINK_SOCK_DIAG = 4  # netlink.h (the older name: NETLINK_INET_DIAG)
SOCK_DIAG_BY_FAMILY = 20  # sock_diag.h: the request and its answer's nlmsg_type
NLM_F_REQUEST = 0x01  # netlink.h; without NLM_F_DUMP: one socket, looked up exactly
NLMSG_ERROR = 0x02  # netlink.h: the answer is a struct nlmsgerr
INET_DIAG_NOCOOKIE = 0xFFFFFFFF  # inet_diag.h: any socket with this id, whatever its cookie
# Which states to list (a bit per tcp_states.h state): every one of a live peer. The
# exact lookup may not filter by it (the kernel has not always): the state in the answer
# is checked again.
_PEER_STATES = sum(1 << state for state in range(1, 12) if state not in _NOT_A_PEER)

# struct nlmsghdr { __u32 nlmsg_len; __u16 nlmsg_type; __u16 nlmsg_flags;
#                   __u32 nlmsg_seq; __u32 nlmsg_pid; }                        16 bytes
_NLMSGHDR = "IHHII"
# struct inet_diag_sockid { __be16 idiag_sport; __be16 idiag_dport;
#                           __be32 idiag_src[4]; __be32 idiag_dst[4];
#                           __u32 idiag_if; __u32 idiag_cookie[2]; }           48 bytes
# (an IPv4 address fills idiag_src[0] / idiag_dst[0], the rest is zero)
_SOCKID = "2s2s16s16sIII"
# struct inet_diag_req_v2 { __u8 sdiag_family; __u8 sdiag_protocol; __u8 idiag_ext;
#                           __u8 pad; __u32 idiag_states;
#                           struct inet_diag_sockid id; }                      56 bytes
_REQUEST = struct.Struct("=" + _NLMSGHDR + "BBBBI" + _SOCKID)
# struct inet_diag_msg { __u8 idiag_family; __u8 idiag_state; __u8 idiag_timer;
#                        __u8 idiag_retrans; struct inet_diag_sockid id;
#                        __u32 idiag_expires; __u32 idiag_rqueue; __u32 idiag_wqueue;
#                        __u32 idiag_uid; __u32 idiag_inode; }                 72 bytes
# followed by attributes (none asked for: idiag_ext 0; the kernel may add a few)
_ANSWER = struct.Struct("=" + _NLMSGHDR + "BBBB" + _SOCKID + "IIIII")
# struct nlmsgerr { int error; struct nlmsghdr msg; }: error is -errno
_ERROR = struct.Struct("=" + _NLMSGHDR + "i")
# An answer is one inet_diag_msg and a few small attributes; a page is plenty.
_RECEIVE = 8192


def _packed(address: Address) -> tuple[bytes, bytes]:
    """(the port, the address) as inet_diag_sockid holds them."""
    return address[1].to_bytes(2, "big"), address[0].packed.ljust(16, b"\0")


def _unpacked(family: int, port: bytes, raw: bytes) -> Address:
    address = ipaddress.ip_address(raw[:4] if family == socket.AF_INET else raw)
    return _plain(address), int.from_bytes(port, "big")


def _diag(family: int, local: Address, remote: Address
          ) -> tuple[int, int, int, Address, Address] | None:
    """The kernel's TCP socket whose local address is `local` and remote one `remote`, as
    (state, uid, inode, local, remote); None when it has none (ENOENT).

    An AF_INET request finds an AF_INET6 socket too when it speaks IPv4 (a dual-stack
    socket connected to 127.0.0.1): both live in one hash table, keyed on the IPv4
    addresses, and the kernel's exact lookup (net/ipv4/inet_diag.c,
    inet_diag_find_one_icsk) turns even an AF_INET6 request with IPv4-mapped addresses
    into that IPv4 lookup. So: AF_INET for IPv4 addresses, AF_INET6 for IPv6 ones."""
    try:
        netlink = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG)
    except (AttributeError, OSError) as exc:  # not Linux; a sandbox or seccomp said no
        raise DiagUnavailable(f"no sock_diag socket: {exc}") from exc
    sport, src = _packed(local)
    dport, dst = _packed(remote)
    request = _REQUEST.pack(
        _REQUEST.size, SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, 1, 0,
        family, socket.IPPROTO_TCP, 0, 0, _PEER_STATES,
        sport, dport, src, dst, 0, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE)
    with netlink:
        try:
            netlink.sendto(request, (0, 0))  # (port id, groups): 0 is the kernel
            # The kernel answers within sendto (the request is handled in our own
            # context), so the answer is there: never wait, on an event loop least.
            answer = netlink.recv(_RECEIVE, socket.MSG_DONTWAIT)
        except OSError as exc:
            raise DiagUnavailable(f"sock_diag: {exc}") from exc
    if len(answer) >= _ERROR.size and _ERROR.unpack_from(answer)[1] == NLMSG_ERROR:
        error = -_ERROR.unpack_from(answer)[5]
        if error == errno.ENOENT:
            return None
        raise DiagUnavailable(f"sock_diag: {os.strerror(error)}")
    if len(answer) < _ANSWER.size or _ANSWER.unpack_from(answer)[1] != SOCK_DIAG_BY_FAMILY:
        raise DiagUnavailable("sock_diag: an answer of another kind")
    (_, _, _, _, _, answered_family, state, _, _, sport, dport, src, dst, _, _, _,
     _, _, _, uid, inode) = _ANSWER.unpack_from(answer)
    return (state, uid, inode, _unpacked(answered_family, sport, src),
            _unpacked(answered_family, dport, dst))


def diag_peer_uid(sock: socket.socket) -> int | None:
    """peer_uid through sock_diag: one exact lookup, O(1). DiagUnavailable when it cannot
    be asked."""
    if (pair := _endpoints(sock)) is None:
        return None
    ours, theirs = pair
    if ours[0].version != theirs[0].version:
        return None
    family = socket.AF_INET if ours[0].version == 4 else socket.AF_INET6
    found = _diag(family, theirs, ours)
    if found is None:
        # No such socket: the peer is gone — or this kernel has no tcp_diag, which says
        # the same (ENOENT). Our own end is listed whenever anything is: ask for it.
        if _diag(family, ours, theirs) is None:
            raise DiagUnavailable("sock_diag does not list even our own socket")
        return None
    state, uid, inode, local, remote = found
    # What the kernel looked up is the socket a packet from us to them would reach: with
    # the peer gone, that is a listener on its port, if there is one. And like the
    # table: inode 0 is an orphan or a time-wait entry, whose uid 0 is nobody's.
    if (local, remote) != (theirs, ours) or state in _NOT_A_PEER or inode == 0:
        return None
    return int(uid)


def serves_peer(sock: socket.socket) -> bool:
    """Whether a loopback listener should answer the connection `sock`.

    On Linux: only when the peer's uid is ours; a peer the kernel does not list is refused
    (it is not provably ours). Elsewhere there is no such table: True, and what the listener
    guards must be safe without it (the login's one-time address and its state)."""
    if not sys.platform.startswith("linux"):
        return True
    return peer_uid(sock) == os.getuid()
