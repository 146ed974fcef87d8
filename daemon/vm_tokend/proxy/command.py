"""`vm-tokend proxy [--socket PATH] [--daemon-socket PATH]`: serve until SIGTERM/SIGINT."""

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
from .service import ProxyServer

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
    parser.add_argument("--daemon-socket", metavar="PATH", default=daemon_socket,
                        help="vm-tokend's socket (default: as vm-token finds it)")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    logging.getLogger("vm_tokend").setLevel(args.log_level.upper())
    path = args.socket or default_proxy_socket(args.daemon_socket)
    try:
        bound = bind_unix_socket(path)
    except (SocketAlreadyServed, SocketSetupError) as exc:
        print(f"vm-tokend proxy: {exc}", file=sys.stderr)
        return 2

    async def main() -> None:
        async with vm_token.AsyncClient(args.daemon_socket) as daemon:
            server = ProxyServer(bound.listener(), daemon)
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
