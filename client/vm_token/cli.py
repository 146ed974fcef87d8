"""`vm-token`: tokens for shell scripts and tools, from a running vm-tokend.

Exit codes: 0 success, 1 refused by the daemon, 2 usage, 3 daemon not reachable.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from . import errors
from .client import Client

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

_EXIT_CODES = """\
exit codes:
  0  success
  1  refused by the daemon (not logged in, credentials rejected, unknown VideoManager, ...)
  2  usage error
  3  the daemon is not reachable
"""


class _Usage(Exception):
    pass


def _fail(message: str) -> None:
    print(f"vm-token: {message}", file=sys.stderr)


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def _cmd_token(client: Client, args: argparse.Namespace) -> int:
    token = client.get_token(args.vm, min_ttl=args.min_ttl)
    sys.stdout.write(token.access_token + "\n")
    return EXIT_OK


def _cmd_list(client: Client, args: argparse.Namespace) -> int:
    videomanagers = client.list_videomanagers()
    if args.json:
        print(json.dumps([{
            "id": vm.id, "name": vm.name, "default": vm.is_default,
            "expires_at": vm.expires_at.isoformat() if vm.expires_at else None,
            "last_error": vm.last_error,
        } for vm in videomanagers], indent=2))
        return EXIT_OK
    if not videomanagers:
        print("no VideoManagers (not logged in yet?)")
        return EXIT_OK
    width = max(len(vm.id) for vm in videomanagers)
    for vm in videomanagers:
        if vm.expires_at is not None:
            held = "token valid " + _duration(vm.expires_at.timestamp() - time.time())
        else:
            held = "no token held"
        if vm.last_error:
            held += f"; last error: {vm.last_error}"
        mark = "*" if vm.is_default else " "
        print(f"{mark} {vm.id:<{width}}  {vm.name}  ({held})")
    return EXIT_OK


def _cmd_status(client: Client, args: argparse.Namespace) -> int:
    status = client.status()
    if args.json:
        status.pop("ok", None)
        print(json.dumps(status, indent=2, default=str))
        return EXIT_OK
    print(f"vm-tokend {status.get('version')} (pid {status.get('pid')}), "
          f"up {_duration(float(status.get('uptime') or 0))}")
    print(f"API:      {status.get('api_url')}")
    user = status.get("username")
    print(f"state:    {status.get('state')}" + (f" as {user}" if user else ""))
    if status.get("last_error"):
        print(f"error:    {status['last_error']}")
    calls = status.get("upstream_calls") or {}
    print(f"requests: {status.get('requests')} served; upstream calls: "
          f"{calls.get('login', 0)} logins, {calls.get('refresh', 0)} refreshes")
    for vm in status.get("videomanagers") or []:
        expires = vm.get("expires_at")
        held = ("token valid " + _duration(expires - time.time())) if expires else "no token"
        refreshed = vm.get("refreshed_at")
        if refreshed:
            held += ", refreshed " + datetime.fromtimestamp(refreshed, UTC).strftime(
                "%H:%M:%S UTC")
        if vm.get("last_error"):
            held += f"; last error: {vm['last_error']}"
        mark = "*" if vm.get("default") else " "
        print(f"  {mark} {vm.get('id')}  {vm.get('name')}  ({held})")
    return EXIT_OK


def _cmd_login(client: Client, args: argparse.Namespace) -> int:
    username = args.username
    if not username:
        if not sys.stdin.isatty():
            raise _Usage("--username is required when stdin is not a terminal")
        username = input("VideoManager Pro username: ").strip()
    if args.password_stdin:
        line = sys.stdin.readline()
        password = line[:-1] if line.endswith("\n") else line
    else:
        if not sys.stdin.isatty():
            raise _Usage("use --password-stdin to pass the password on standard input")
        password = getpass.getpass(f"Password for {username}: ")
    if not username or not password:
        raise _Usage("username and password must not be empty")
    reply = client.login(username, password)
    print(f"logged in as {username}; {reply.get('videomanagers', 0)} VideoManagers")
    return EXIT_OK


def _cmd_logout(client: Client, args: argparse.Namespace) -> int:
    client.logout()
    print("logged out; the daemon forgot the credentials and every token")
    return EXIT_OK


def _parser() -> argparse.ArgumentParser:
    from ._version import __version__

    parser = argparse.ArgumentParser(
        prog="vm-token",
        description="Get VideoManager Pro access tokens from the vm-tokend daemon.",
        epilog=_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"vm-token {__version__}")
    parser.add_argument("--socket", metavar="PATH",
                        help="the daemon's socket (default: $VM_TOKEN_SOCKET, else "
                             "$XDG_RUNTIME_DIR/vm-token/socket)")
    parser.add_argument("--timeout", type=float, default=5.0, metavar="S",
                        help="give up after S seconds (default 5)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, handler: Callable[[Client, argparse.Namespace], int], help_: str,
            example: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name, help=help_, description=help_,
            epilog=f"example:\n  {example}\n\n{_EXIT_CODES}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.set_defaults(handler=handler)
        return sub

    token = add("token", _cmd_token, "print an access token, alone on a line",
                'curl -H "Authorization: Bearer $(vm-token token --vm Marketing)" ...')
    token.add_argument("--vm", metavar="ID|NAME", help="VideoManager (default: the default)")
    token.add_argument("--min-ttl", type=float, default=0, metavar="S",
                       help="the token must stay valid at least S more seconds")
    listing = add("list", _cmd_list, "list the VideoManagers and the tokens held for them",
                  "vm-token list")
    listing.add_argument("--json", action="store_true", help="print JSON")
    status = add("status", _cmd_status, "show the daemon's state (never a secret)",
                 "vm-token status --json")
    status.add_argument("--json", action="store_true", help="print JSON")
    login = add("login", _cmd_login, "give the daemon credentials (kept in its memory only)",
                "pass show vmpro | vm-token login --username me@example.com --password-stdin")
    login.add_argument("--username", metavar="NAME")
    login.add_argument("--password-stdin", action="store_true",
                       help="read the password from the first line of stdin")
    add("logout", _cmd_logout, "make the daemon forget the credentials and every token",
        "vm-token logout")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: usage errors exit 2, --help/--version exit 0
        return int(exc.code or 0)
    handler: Callable[[Client, argparse.Namespace], int] = args.handler
    try:
        with Client(args.socket, timeout=args.timeout) as client:
            return handler(client, args)
    except _Usage as exc:
        _fail(str(exc))
        return EXIT_USAGE
    except errors.DaemonNotRunning as exc:
        _fail(str(exc))
        return EXIT_UNREACHABLE
    except errors.DaemonError as exc:
        _fail(f"{exc.message} ({exc.code})")
        return EXIT_REFUSED
    except errors.Error as exc:
        _fail(str(exc))
        return EXIT_UNREACHABLE
    except (KeyboardInterrupt, EOFError):
        _fail("interrupted")
        return 130
    except BrokenPipeError:
        return EXIT_OK


