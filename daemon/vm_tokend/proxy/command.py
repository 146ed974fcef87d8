"""`vm-tokend proxy [--socket PATH] [--listen ADDR:PORT [--profile NAME]] [--min-ttl S]`:
serve until SIGTERM or SIGINT, then drain the requests in flight (bounded) and exit 0."""

from __future__ import annotations

import argparse
import logging
import math
import signal
import socket
import ssl
import sys
from pathlib import Path
from typing import Any, Final

import trio

import vm_token

from .. import systemd
from ..config.environment import process_environment
from ..config.settings import ConfigError, load_config
from ..server.listener import (
    BoundSocket,
    SocketAlreadyServed,
    SocketSetupError,
    bind_unix_socket,
)
from .gates import TcpGate, UnixGate, parse_listen
from .routes import Refusal, Upstream
from .service import MIN_TTL, Listening, ProxyServer

__all__ = ["run"]

log = logging.getLogger(__name__)

# FileDescriptorName= of vm-token-proxy.socket
PROXY_FD_NAME = "vm-token-proxy"
# The daemon's answer to a `get` may wait on the profile's API: a login or a refresh in
# flight. The longest such wait, a guess from the daemon's own bounds: a first OpenID
# Connect login is up to four requests in a row (WebFinger, discovery, the grant, the
# VideoManager list), each cut at the daemon's upstream TOTAL_TIMEOUT (15 s,
# upstream/base.py), and a client may first wait for an attempt about to start
# (keeper/slot.py RETRY_WAIT, 3 s); a quarter more to spare. Within it the daemon's own
# answer (`upstream_unavailable`, "no answer from the API within 15 s") reaches the
# client; past it the daemon itself is in trouble. The client's default, 5 s, made a
# hung API look like a missing daemon, and delayed every other request behind it.
DAEMON_TIMEOUT: Final = 4 * 15.0 + 15.0
# Connections to the daemon, per profile (see ProfileClients): a `get` the daemon
# answers from what it holds takes ~0.2 ms, so this many serve thousands of requests a
# second; the daemon takes 512 at once and makes room by closing the longest idle one.
DAEMON_CONNECTIONS: Final = 32
# The largest --min-ttl: tokens of the API live 300 s (the daemon refuses a min_ttl not
# below a token's lifetime, which would then refuse every request).
MAX_MIN_TTL: Final = 300.0


class ListenError(Exception):
    """A --listen address that cannot be listened on; the message says why."""


class ProfileClients(vm_token.AsyncClient):
    """The daemon's client, with connections of their own for each profile's requests.

    A `get` waits in the daemon while its profile's API is slow to log in or refresh (up
    to DAEMON_TIMEOUT); requests for a profile whose API hangs must not take every
    connection and keep another profile's requests waiting in line. Requests that name no
    profile (the default one) use this client's own connections."""

    def __init__(self, socket_path: Path) -> None:
        super().__init__(socket_path, timeout=DAEMON_TIMEOUT,
                         max_connections=DAEMON_CONNECTIONS)
        self._named: dict[str, vm_token.AsyncClient] = {}  # the proxy serves known ones

    async def request(self, op: str, **fields: Any) -> dict[str, Any]:
        profile = fields.get("profile")
        if not isinstance(profile, str) or profile == self.profile:
            return await super().request(op, **fields)
        client = self._named.get(profile)
        if client is None:
            client = self._named[profile] = vm_token.AsyncClient(
                self.socket_path, timeout=self.timeout, max_connections=self.max_connections,
                profile=profile)
        return await client.request(op, **fields)

    async def aclose(self) -> None:
        for client in self._named.values():
            await client.aclose()
        await super().aclose()


def tls_context(origin: str, flags: dict[str, object]) -> ssl.SSLContext | None:
    """What the proxy trusts for an API origin (read when it first goes there): what the
    daemon trusts for it, the `ca_bundle` of the profiles with that API, or the system's
    CAs when none names one. Certificates are always verified. Fails closed: when the
    configuration, or a bundle a profile of that API names, cannot be read, the system's
    CAs are not trusted instead (a bundle is often there to trust *fewer*: a private CA)
    — Refusal, the proxy's own 502, and nothing is sent."""
    if not origin.startswith("https:"):
        return None  # plain http (loopback only): nothing to trust
    try:
        settings, profiles = load_config(flags, strict=False)
    except ConfigError as exc:
        raise Refusal(502, "upstream_unavailable", f"cannot tell which CAs to trust for "
                      f"{origin}, so nothing was sent: {exc}") from None
    bundles = {str(profile.ca_bundle) for profile in profiles.valid.values()
               if profile.ca_bundle is not None
               and Upstream.from_api_url(profile.api_url).origin == origin}
    # a profile that fails validation (its ca_bundle was removed, say) may still be served
    # by a daemon that read it before: its bundle counts, read or refused like the others
    for name in profiles.errors:
        table = settings.profiles.get(name)
        if not isinstance(table, dict):
            continue
        api_url, bundle = table.get("api_url", settings.api_url), \
            table.get("ca_bundle", settings.ca_bundle)
        try:
            same = isinstance(api_url, str) and \
                Upstream.from_api_url(api_url.strip()).origin == origin
        except ValueError:  # not even a URL: no API the daemon could be serving
            same = False
        if same and bundle is not None:
            bundles.add(str(Path(str(bundle)).expanduser()))
    context: ssl.SSLContext | None = None  # None: no bundle, the system's CAs
    for bundle in sorted(bundles):  # profiles on one API may name different bundles
        try:
            if context is None:
                context = ssl.create_default_context(cafile=bundle)
            else:
                context.load_verify_locations(cafile=bundle)
        except (OSError, ssl.SSLError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror \
                else type(exc).__name__
            raise Refusal(502, "upstream_unavailable", f"cannot read the CA bundle {bundle} "
                          f"({reason}) that a profile names for {origin}; nothing was sent, "
                          "and the system's CAs are not trusted instead") from None
    return context


def bind_tcp(address: str, port: int) -> socket.socket:
    """A listening socket on a loopback `address` and `port` (0: any free one), bound
    before anything starts, so that a port in use is one line and exit 2; ListenError."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as trio's listeners
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address, port))
        sock.listen(socket.SOMAXCONN)
    except OSError as exc:
        sock.close()
        shown = f"[{address}]" if family == socket.AF_INET6 else address
        raise ListenError(f"cannot listen on {shown}:{port}: "
                          f"{exc.strerror or type(exc).__name__}") from None
    return sock


def min_ttl(text: str) -> float:
    """--min-ttl: seconds from 0 to below MAX_MIN_TTL."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value < MAX_MIN_TTL:  # NaN too
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of seconds from 0 to below {MAX_MIN_TTL:g}")
    return value


def run(argv: list[str], parser_class: type[argparse.ArgumentParser]) -> int:
    parser = parser_class(
        prog="vm-tokend proxy",
        description="Serve HTTP/1.1 on a Unix socket and forward each request under the "
                    "API's root to a profile's API with a fresh token (the Host header names "
                    "the profile: localhost is the default one).",
        epilog="example: curl --unix-socket $XDG_RUNTIME_DIR/vm-token/proxy "
               "http://localhost/v1/vms",
    )
    parser.add_argument("--socket", metavar="PATH", type=Path, dest="proxy_socket",
                        help="where to listen (default: the setting proxy_socket, else "
                             "`proxy` beside the daemon's socket)")
    parser.add_argument("--listen", metavar="ADDR:PORT",
                        help="also serve on a loopback TCP port (127.0.0.1:PORT or [::1]:PORT), "
                             "for programs that cannot use a Unix socket; only your own uid "
                             "is served, and only with Host set to this address")
    parser.add_argument("--profile", metavar="NAME",
                        help="the profile of the --listen port (default: the default one)")
    parser.add_argument("--daemon-socket", metavar="PATH", type=Path, dest="socket",
                        help="vm-tokend's socket (default: the setting socket, as vm-tokend)")
    parser.add_argument("--read-timeout", metavar="S", type=float, dest="proxy_read_timeout",
                        help="how long the API may be silent within an answer "
                             "(default: the setting proxy_read_timeout, 300)")
    parser.add_argument("--min-ttl", metavar="S", type=min_ttl, default=MIN_TTL,
                        help="forward a token only if it is valid this long, else get a "
                             f"fresh one first (default: {MIN_TTL:g}; below "
                             f"{MAX_MIN_TTL:g}, the API's token lifetime)")
    parser.add_argument("--config", metavar="PATH")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    flags = {name: value for name, value in vars(args).items()
             if value is not None and name in ("proxy_socket", "socket", "proxy_read_timeout",
                                               "config", "log_level")}
    try:
        # the proxy needs the top-level settings only: a bad profile is the daemon's matter
        settings = load_config(flags, strict=False)[0]
    except ConfigError as exc:
        print(f"vm-tokend proxy: {exc}", file=sys.stderr)
        return 2
    listen: tuple[str, int] | None = None
    if args.listen is not None:
        try:
            listen = parse_listen(args.listen)
        except ValueError as exc:
            parser.error(str(exc))
    logging.getLogger("vm_tokend").setLevel(settings.log_level.upper())
    path = settings.proxy_socket_path
    tcp: socket.socket | None = None
    try:
        if listen is not None:  # first: nothing to undo when its port is taken
            tcp = bind_tcp(*listen)
        activated = systemd.activated_socket(process_environment(), PROXY_FD_NAME)
        # systemd's socket is never ours to remove; our own is
        bound = BoundSocket(activated, path=None) if activated is not None \
            else bind_unix_socket(path)
    except (ListenError, SocketAlreadyServed, SocketSetupError,
            systemd.ActivationError) as exc:
        if tcp is not None:
            tcp.close()
        print(f"vm-tokend proxy: {exc}", file=sys.stderr)
        return 2
    where = path if activated is None else "the socket systemd passed"

    async def main() -> None:
        async with ProfileClients(settings.socket_path) as daemon:
            listeners: list[Listening] = [(bound.listener(), UnixGate(daemon.hello))]
            if tcp is not None:
                address, port = tcp.getsockname()[:2]
                listeners.append((trio.SocketListener(trio.socket.from_stdlib_socket(tcp)),
                                  TcpGate(address, port, args.profile)))
                log.info("vm-tokend proxy also serving on %s port %d (profile %s)",
                         address, port, args.profile or "default")
            server = ProxyServer(listeners, daemon,
                                 connect_timeout=settings.proxy_connect_timeout,
                                 read_timeout=settings.proxy_read_timeout,
                                 idle_timeout=settings.proxy_idle_timeout,
                                 min_ttl=args.min_ttl,
                                 tls=lambda origin: tls_context(origin, flags))
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async with trio.open_nursery() as nursery:
                    await nursery.start(server.serve)
                    log.info("vm-tokend proxy serving on %s", where)
                    async for signum in signals:
                        log.info("%s: draining and stopping", signal.Signals(signum).name)
                        server.stop()
                        break
                log.info("stopped")

    try:
        trio.run(main)
    finally:
        bound.remove()
    return 0
