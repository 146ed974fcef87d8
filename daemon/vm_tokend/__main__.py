"""`vm-tokend`: run the daemon in the foreground, logging to stderr.

Exit codes: 0 after a clean shutdown, 1 when another daemon already serves the socket,
2 for bad configuration or an unusable socket path.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, NoReturn

from vm_token import __version__

from .config.flags import add_allow_flags

EXIT_OK = 0
EXIT_ALREADY_RUNNING = 1
EXIT_CONFIG = 2


class ArgumentParser(argparse.ArgumentParser):
    """Usage errors: `vm-tokend: message (see vm-tokend --help)` on one line, exit code 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: {message} (see {self.prog} --help)\n")
        sys.exit(EXIT_CONFIG)


def _parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="vm-tokend",
        description=(
            "Keep fresh VideoManager Pro access tokens in memory and hand them out on a "
            "Unix socket. Every flag can also be set as VM_TOKEN_<NAME> in the environment "
            "or in the config file; flags win. The password is never a flag: use "
            "VM_TOKEN_PASSWORD, --password-file, --password-command, systemd's "
            "credentials, or `vm-token login`."
        ),
        epilog="example: vm-tokend --username me@example.com --password-command 'pass show vmpro'"
               "\n\nmore:\n"
               "  vm-tokend install-units [--enable]   set it up as a systemd user service\n"
               "  vm-tokend proxy [--listen ADDR:PORT]  the API with your token, for any "
               "program\n"
               "  vm-tokend run [--proxy] [options] -- CMD\n"
               "                                       CMD under a daemon of its own (CI)\n"
               "  vm-tokend start [--sh|--csh|--env|--json] [--lifetime S] [options]\n"
               "  vm-tokend stop                       the same for steps in separate shells",
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
    parser.add_argument("--token-socket", metavar="PATH",
                        help="also serve tokens (hello, get, invalidate, list: no login, "
                             "logout or status) on this socket, to this user and those "
                             "--allow-uid/--allow-gid name: other users, containers")
    add_allow_flags(parser)
    parser.add_argument("--token-socket-group", metavar="GROUP",
                        help="the group the token socket belongs to (mode 0660), for a "
                             "shared volume")
    parser.add_argument("--default-videomanager", metavar="ID|NAME")
    parser.add_argument("--videomanager", dest="videomanagers", action="append",
                        metavar="ID|NAME", help="keep this VideoManager's token warm "
                        "(repeatable)")
    parser.add_argument("--idle-timeout", type=float, metavar="S")
    parser.add_argument("--default-token-lifetime", type=float, metavar="S")
    parser.add_argument("--ca-bundle", metavar="PATH")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    return parser


class JournalFormatter(logging.Formatter):
    """`<N>message` per line: the journal reads the syslog priority and adds the time."""

    PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
                  logging.CRITICAL: 2}

    def format(self, record: logging.LogRecord) -> str:
        priority = self.PRIORITIES.get(record.levelno, 6)
        return "\n".join(f"<{priority}>{line}" for line in super().format(record).splitlines())


def setup_logging(level: str, journal: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if journal:
        handler.setFormatter(JournalFormatter("%(message)s"))
    else:
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


def _install_units(argv: list[str]) -> int:
    from .config.environment import process_environment
    from .install import install_units

    parser = ArgumentParser(
        prog="vm-tokend install-units",
        description="Write vm-tokend.socket and vm-tokend.service to "
                    "$XDG_CONFIG_HOME/systemd/user/, with ExecStart= pointing at this "
                    "installation, and print (or, with --enable, run) the systemctl "
                    "commands that start the socket.",
        epilog="example: vm-tokend install-units --enable",
    )
    parser.add_argument("--enable", action="store_true",
                        help="run systemctl --user daemon-reload and "
                             "enable --now vm-tokend.socket")
    args = parser.parse_args(argv)
    try:
        return install_units(process_environment(), enable=args.enable)
    except OSError as exc:
        print(f"vm-tokend: cannot write the units: {exc}", file=sys.stderr)
        return EXIT_CONFIG


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["install-units"]:
        return _install_units(argv[1:])
    if argv[:1] == ["run"]:
        from .run import run

        return run(argv[1:], _parser)
    if argv[:1] in (["start"], ["stop"], ["_supervise"]):
        from . import background

        if argv[0] == "start":
            return background.start(argv[1:], _parser)
        if argv[0] == "stop":
            return background.stop(argv[1:], ArgumentParser)
        return background.supervise(argv[1:])
    if argv[:1] == ["proxy"]:
        from . import systemd
        from .config.environment import process_environment
        from .proxy.command import run as run_proxy

        setup_logging("info", journal=systemd.stderr_is_journal(process_environment()))
        return run_proxy(argv[1:], ArgumentParser)
    args = _parser().parse_args(argv)
    flags: dict[str, Any] = {k: v for k, v in vars(args).items() if v is not None}

    # Imported here so that `--help` and `--version` stay quick.
    import trio

    from . import systemd
    from .app import App
    from .config.environment import process_environment
    from .config.settings import ConfigError, load_config
    from .peers import OVERFLOW_UID_MESSAGE, PeerRule, runs_as_overflow_uid
    from .server.listener import (
        BoundSocket,
        SocketAlreadyServed,
        SocketSetupError,
        bind_shared_socket,
        bind_unix_socket,
    )

    environ = process_environment()
    setup_logging("info", journal=systemd.stderr_is_journal(environ))
    systemd.harden_process()
    try:
        settings, profiles = load_config(flags)
    except ConfigError as exc:
        print(f"vm-tokend: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    logging.getLogger("vm_tokend").setLevel(settings.log_level.upper())
    if runs_as_overflow_uid():
        print(f"vm-tokend: {OVERFLOW_UID_MESSAGE.format(uid=os.getuid())}", file=sys.stderr)
        return EXIT_CONFIG
    notifier = systemd.Notifier(environ)
    try:
        activated = systemd.activated_socket(environ)
        if activated is not None:
            bound = BoundSocket(activated, path=None)  # systemd's: never ours to remove
        else:
            bound = bind_unix_socket(settings.socket_path)
    except SocketAlreadyServed as exc:
        print(f"vm-tokend: {exc}", file=sys.stderr)
        return EXIT_ALREADY_RUNNING
    except (SocketSetupError, systemd.ActivationError) as exc:
        print(f"vm-tokend: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    token_bound = None
    try:
        if settings.token_socket is not None:
            rule = PeerRule.allowing(settings.allow_uids, settings.allow_gids, root=False)
            token_bound = bind_shared_socket(settings.token_socket.expanduser(),
                                             group=settings.token_socket_gid,
                                             others=rule.opens_to_others)
    except SocketSetupError as exc:
        bound.remove()
        print(f"vm-tokend: token_socket: {exc}", file=sys.stderr)
        return EXIT_ALREADY_RUNNING if isinstance(exc, SocketAlreadyServed) else EXIT_CONFIG
    app = App(settings, bound, profiles=profiles, flags=flags, notifier=notifier,
              watchdog_interval=systemd.watchdog_interval(environ), token_bound=token_bound)
    try:
        trio.run(app.run)
    finally:
        bound.remove()
        if token_bound is not None:
            token_bound.remove()
        notifier.close()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
