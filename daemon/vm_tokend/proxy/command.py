"""`vm-tokend proxy [--socket PATH] [--listen ADDR:PORT [--profile NAME]] [--min-ttl S]`:
serve until SIGTERM or SIGINT, then drain the requests in flight (bounded) and exit 0."""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Final

import trio

from .. import systemd
from ..config.environment import process_environment
from ..config.flags import add_allow_flags
from ..config.settings import ConfigError, load_config
from ..peers import OVERFLOW_UID_MESSAGE, PeerRule, runs_as_overflow_uid, warn_if_unreachable
from ..server.listener import (
    BoundSocket,
    SocketAlreadyServed,
    SocketSetupError,
    bind_shared_socket,
    bind_unix_socket,
)
from .daemon_client import ProfileClients
from .gates import TcpGate, UnixGate, parse_listen
from .service import MIN_TTL, Listening, ProxyServer

__all__ = ["run"]

log = logging.getLogger(__name__)

# FileDescriptorName= of vm-token-proxy.socket
PROXY_FD_NAME = "vm-token-proxy"
# The largest --min-ttl: tokens of the API live 300 s (the daemon refuses a min_ttl not
# below a token's lifetime, which would then refuse every request).
MAX_MIN_TTL: Final = 300.0


class ListenError(Exception):
    """A --listen address that cannot be listened on; the message says why."""


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
    add_allow_flags(parser)
    parser.add_argument("--config", metavar="PATH")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    flags = {name: value for name, value in vars(args).items()
             if value is not None and name in ("proxy_socket", "socket", "proxy_read_timeout",
                                               "config", "log_level", "allow_uids",
                                               "allow_gids")}
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
    if runs_as_overflow_uid():
        print(f"vm-tokend proxy: {OVERFLOW_UID_MESSAGE.format(uid=os.getuid())}",
              file=sys.stderr)
        return 2
    path = settings.proxy_socket_path
    # ours and root's, as the daemon's socket, and those the settings allow; on --listen,
    # ours and the uids allowed (never root's: see gates)
    rule = PeerRule.allowing(settings.allow_uids, settings.allow_gids, root=True)
    tcp: socket.socket | None = None
    try:
        if listen is not None:  # first: nothing to undo when its port is taken
            tcp = bind_tcp(*listen)
        activated = systemd.activated_socket(process_environment(), PROXY_FD_NAME)
        # systemd's socket is never ours to remove; our own is
        if activated is not None:
            bound = BoundSocket(activated, path=None)
        elif rule.opens_to_others and path.parent != settings.socket_path.parent:
            # a socket others can reach, as the token socket — never in the daemon's own
            # directory, which stays private (a warning below says they cannot reach it)
            bound = bind_shared_socket(path, group=settings.token_socket_gid, others=True)
            # and as there, root only if listed: a container's root reaches the volume
            rule = PeerRule.allowing(settings.allow_uids, settings.allow_gids, root=False)
        else:
            bound = bind_unix_socket(path)
    except (ListenError, SocketAlreadyServed, SocketSetupError,
            systemd.ActivationError) as exc:
        if tcp is not None:
            tcp.close()
        print(f"vm-tokend proxy: {exc}", file=sys.stderr)
        return 2
    where = path if activated is None else "the socket systemd passed"
    warn_if_unreachable(rule, None if activated is not None else path,
                        settings.token_socket_gid, setting="proxy_socket")

    async def main() -> None:
        async with ProfileClients(settings.socket_path) as daemon:
            listeners: list[Listening] = [(bound.listener(), UnixGate(daemon.hello, rule))]
            if tcp is not None:
                address, port = tcp.getsockname()[:2]
                listeners.append((trio.SocketListener(trio.socket.from_stdlib_socket(tcp)),
                                  TcpGate(address, port, args.profile,
                                          PeerRule(False, rule.uids))))
                log.info("vm-tokend proxy also serving on %s port %d (profile %s)",
                         address, port, args.profile or "default")
            server = ProxyServer(listeners, daemon,
                                 connect_timeout=settings.proxy_connect_timeout,
                                 read_timeout=settings.proxy_read_timeout,
                                 idle_timeout=settings.proxy_idle_timeout,
                                 min_ttl=args.min_ttl)
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

