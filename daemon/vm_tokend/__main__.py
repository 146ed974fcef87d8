"""`vm-tokend`: run the daemon in the foreground, logging to stderr.

Exit codes: 0 after a clean shutdown, 1 when another daemon already serves the socket,
2 for bad configuration or an unusable socket path.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from vm_token import __version__

EXIT_OK = 0
EXIT_ALREADY_RUNNING = 1
EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vm-tokend",
        description=(
            "Keep fresh VideoManager Pro access tokens in memory and hand them out on a "
            "Unix socket. Every flag can also be set as VM_TOKEN_<NAME> in the environment "
            "or in the config file; flags win. The password is never a flag: use "
            "VM_TOKEN_PASSWORD, --password-file, --password-command, systemd's "
            "credentials, or `vm-token login`."
        ),
        epilog="example: vm-tokend --username me@example.com --password-command 'pass show vmpro'",
    )
    parser.add_argument("--version", action="version", version=f"vm-tokend {__version__}")
    parser.add_argument("--config", metavar="PATH",
                        help="TOML config file (default $XDG_CONFIG_HOME/vm-token/config.toml)")
    parser.add_argument("--api-url", metavar="URL")
    parser.add_argument("--username", metavar="NAME")
    parser.add_argument("--password-file", metavar="PATH",
                        help="read the password from the first line of this file")
    parser.add_argument("--password-command", metavar="CMD",
                        help="run CMD (with /bin/sh) at each login; its first line of output "
                             "is the password")
    parser.add_argument("--socket", metavar="PATH")
    parser.add_argument("--default-videomanager", metavar="ID|NAME")
    parser.add_argument("--videomanager", dest="videomanagers", action="append",
                        metavar="ID|NAME", help="keep this VideoManager's token warm "
                        "(repeatable)")
    parser.add_argument("--idle-timeout", type=float, metavar="S")
    parser.add_argument("--default-token-lifetime", type=float, metavar="S")
    parser.add_argument("--ca-bundle", metavar="PATH")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    return parser


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s vm-tokend[%(process)d] %(levelname)s %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("vm_tokend").setLevel(level.upper())
    # httpx logs every request at INFO; httpcore traces at DEBUG. Neither logs bodies or
    # headers, but we keep them to warnings: our own lines say what matters.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    flags: dict[str, Any] = {k: v for k, v in vars(args).items() if v is not None}

    # Imported here so that `--help` and `--version` stay quick.
    import trio

    from .app import App
    from .server import SocketAlreadyServed, SocketSetupError, bind_unix_socket
    from .settings import ConfigError, load_settings

    try:
        settings = load_settings(flags)
    except ConfigError as exc:
        print(f"vm-tokend: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(settings.log_level)
    try:
        bound = bind_unix_socket(settings.socket_path)
    except SocketAlreadyServed as exc:
        print(f"vm-tokend: {exc}", file=sys.stderr)
        return EXIT_ALREADY_RUNNING
    except SocketSetupError as exc:
        print(f"vm-tokend: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    app = App(settings, bound, flags=flags)
    try:
        trio.run(app.run)
    finally:
        bound.remove()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
