"""Who may use a listener, and which profile a request is for: one gate per kind.

- The Unix socket (`UnixGate`): peers by SO_PEERCRED (ours or root's, as the daemon's
  socket, plus the settings allow_uids and allow_gids: peers.PeerRule), and the Host
  header names the profile (`localhost`: the default one; a profile's name: that one).
- A loopback TCP port (`TcpGate`, `--listen`): any local user can connect, and a browser
  can be made to. So: the peer's uid from the kernel (vm_token._loopback, shared with the
  login listener: sock_diag, else a scan of /proc/net/tcp in a thread) must be ours or in
  allow_uids (a TCP peer's groups are not known: allow_gids do not apply) — not root's,
  unlike the Unix socket: a loopback port is reachable by far more of root than a file in
  our 0700 directory (a container run as root with the host's network, which has no way
  into our files or memory, would spend our token), and the login listener's helper
  (`_loopback.serves_peer`) refuses root too. The Host must be the listener's own address
  (DNS rebinding), and a request a browser made for a web page (`Origin`, or
  `Sec-Fetch-Site` other than `none`) is refused; no CORS header is ever
  sent. One profile per port.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Awaitable, Callable
from typing import Any, Final, NamedTuple, Protocol, cast

import h11
import trio

from vm_token import _loopback

from ..peers import PeerRule, socket_peer
from ..text import quote
from .forward import ask_daemon
from .routes import Refusal

__all__ = ["Admission", "Gate", "TcpGate", "UnixGate", "parse_listen"]

DEFAULT_HOST: Final = "localhost"
# Scans of the kernel's TCP tables at once, where sock_diag cannot be asked (a sandbox
# without AF_NETLINK): each reads every socket of the machine, tens of ms with 20,000, in
# a thread so the event loop goes on; a few at once keep a burst of connections moving
# without a thread each.
TABLE_SCANS: Final = 4


class Admission(NamedTuple):
    admitted: bool  # whether to serve this connection
    uid: int | None  # the peer's, if known
    pid: int | None  # the peer's, on a Unix socket; a TCP peer's is not known


class Gate(Protocol):
    rule: PeerRule  # whom it admits

    async def admits(self, stream: trio.abc.Stream) -> Admission:
        """Whether to serve this connection, and who the peer is as far as known."""
        ...

    async def profile(self, request: h11.Request) -> str | None:
        """The profile the request is for (None: the default one); Refusal otherwise."""
        ...


def _header(request: h11.Request, name: bytes) -> str | None:
    values = [value for key, value in request.headers if key == name]
    return values[0].decode("ascii", "replace") if values else None


class UnixGate:
    def __init__(self, hello: Callable[[], Awaitable[dict[str, Any]]],
                 rule: PeerRule | None = None) -> None:
        self._hello = hello  # the daemon's `hello`: it lists the profiles
        self._profiles: frozenset[str] = frozenset()
        self.rule = rule or PeerRule(root=True)  # ours, root's, and those allowed

    async def admits(self, stream: trio.abc.Stream) -> Admission:
        peer = socket_peer(stream)
        if peer is None:
            return Admission(False, None, None)
        return Admission(self.rule.admits(stream, peer), peer.uid, peer.pid)

    async def profile(self, request: h11.Request) -> str | None:
        host = (_header(request, b"host") or DEFAULT_HOST).lower()
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if name == DEFAULT_HOST:
            return None
        if name not in self._profiles:  # a profile added since: ask again
            hello = await ask_daemon(self._hello())
            listed = hello.get("profiles")
            self._profiles = frozenset(p for p in listed if isinstance(p, str)) \
                if isinstance(listed, list) else frozenset()
        if name in self._profiles:
            return name
        raise Refusal(421, "unknown_profile",
                      f"the Host {quote(host, 100)} names no profile: use `localhost` for the "
                      f"default one, or one of {', '.join(sorted(self._profiles)) or 'none'}")


class TcpGate:
    def __init__(self, address: str, port: int, profile: str | None,
                 rule: PeerRule | None = None) -> None:
        literal = f"[{address}]" if ":" in address else address
        self.hosts = frozenset({f"{literal}:{port}", f"localhost:{port}"})
        self._profile = profile
        self._scans = trio.CapacityLimiter(TABLE_SCANS)
        self.rule = rule or PeerRule(root=False)  # ours, and the uids allowed; never root's

    async def admits(self, stream: trio.abc.Stream) -> Admission:
        if not isinstance(stream, trio.SocketStream):
            return Admission(False, None, None)
        sock = cast(socket.socket, stream.socket)
        try:
            uid = _loopback.diag_peer_uid(sock)  # one netlink round trip: microseconds
        except _loopback.DiagUnavailable:
            uid = await trio.to_thread.run_sync(_loopback.scan_peer_uid, sock,
                                                limiter=self._scans)
        return Admission(self.rule.admits_uid(uid), uid, None)

    async def profile(self, request: h11.Request) -> str | None:
        host = (_header(request, b"host") or "").lower()
        if host not in self.hosts:
            raise Refusal(421, "bad_request",
                          f"the Host must be this listener's own address "
                          f"({', '.join(sorted(self.hosts))}), not {quote(host, 100)}")
        if _header(request, b"origin") is not None or \
                (_header(request, b"sec-fetch-site") or "none").lower() != "none":
            raise Refusal(403, "forbidden", "requests from web pages are refused: the proxy "
                          "serves programs on this machine, not browsers")
        return self._profile


def parse_listen(text: str) -> tuple[str, int]:
    """`127.0.0.1:PORT` or `[::1]:PORT` (any loopback address); ValueError otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--listen {text!r}: expected ADDRESS:PORT, e.g. 127.0.0.1:8181")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"--listen {text!r}: the address must be a loopback IP address "
                         "(127.0.0.1 or ::1), not a name") from None
    if not address.is_loopback:
        raise ValueError(f"--listen {text!r}: only a loopback address; the proxy adds your "
                         "token to what it forwards")
    return str(address), int(port)
