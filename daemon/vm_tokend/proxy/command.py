"""`vm-tokend proxy [--socket PATH] [--listen ADDR:PORT [--profile NAME]]`: serve until
SIGTERM or SIGINT, then drain the requests in flight (bounded) and exit 0."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

import trio

import vm_token
from vm_token import protocol

from ..config.environment import process_environment
from ..server.listener import SocketAlreadyServed, SocketSetupError, bind_unix_socket
from .gates import TcpGate, UnixGate, parse_listen
from .service import Listening, ProxyServer

__all__ = ["run"]

log = logging.getLogger(__name__)


def default_proxy_socket(daemon_socket: str) -> Path:
    """Beside the daemon's socket: `$XDG_RUNTIME_DIR/vm-token/proxy`."""
    return Path(daemon_socket).parent / "proxy"


def run(argv: list[str], parser_class: type[argparse.ArgumentParser]) -> int:
    environ = process_environment()
    daemon_socket = protocol.default_socket_path(environ)
    parser = parser_class(
        prog="vm-tokend proxy",
        description="Serve HTTP/1.1 on a Unix socket and forward each request under the "
                    "API's root to a profile's API with a fresh token (the Host header names "
                    "the profile: localhost is the default one).",
        epilog="example: curl --unix-socket $XDG_RUNTIME_DIR/vm-token/proxy "
               "http://localhost/v1/vms",
    )
    parser.add_argument("--socket", metavar="PATH", type=Path,
                        help=f"where to listen (default {default_proxy_socket(daemon_socket)})")
    parser.add_argument("--listen", metavar="ADDR:PORT",
                        help="also serve on a loopback TCP port (127.0.0.1:PORT or [::1]:PORT), "
                             "for programs that cannot use a Unix socket; only your own uid "
                             "is served, and only with Host set to this address")
    parser.add_argument("--profile", metavar="NAME",
                        help="the profile of the --listen port (default: the default one)")
    parser.add_argument("--daemon-socket", metavar="PATH", default=daemon_socket,
                        help="vm-tokend's socket (default: as vm-token finds it)")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    listen: tuple[str, int] | None = None
    if args.listen is not None:
        try:
            listen = parse_listen(args.listen)
        except ValueError as exc:
            parser.error(str(exc))
    logging.getLogger("vm_tokend").setLevel(args.log_level.upper())
    path = args.socket or default_proxy_socket(args.daemon_socket)
    try:
        bound = bind_unix_socket(path)
    except (SocketAlreadyServed, SocketSetupError) as exc:
        print(f"vm-tokend proxy: {exc}", file=sys.stderr)
        return 2

    async def main() -> None:
        async with vm_token.AsyncClient(args.daemon_socket) as daemon:
            listeners: list[Listening] = [(bound.listener(), UnixGate(daemon.hello))]
            if listen is not None:
                address, port = listen
                for tcp in await trio.open_tcp_listeners(port, host=address):
                    bound_port = tcp.socket.getsockname()[1]
                    listeners.append((tcp, TcpGate(address, bound_port, args.profile)))
                    log.info("vm-tokend proxy also serving on %s port %d (profile %s)",
                             address, bound_port, args.profile or "default")
            server = ProxyServer(listeners, daemon)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async with trio.open_nursery() as nursery:
                    await nursery.start(server.serve)
                    log.info("vm-tokend proxy serving on %s", path)
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
