"""The argparse front end of `vm-token`: help, usage errors, and the less frequent commands.

`cli` sends here whatever its fast path does not handle; start-up time matters less here.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from .. import errors, protocol
from ..client import Client, VideoManager, next_page, videomanagers_from_reply
from .parser import ArgumentParser
from .shared import (
    DEFAULT_TIMEOUT,
    EXIT_CODES_HELP,
    EXIT_LOGIN,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_USAGE,
    GIT_OPERATIONS,
    LOGIN_CODES,
    exit_code,
    fail,
)


class _Usage(Exception):
    pass


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def _iso(timestamp: float | None) -> str | None:
    from datetime import UTC, datetime

    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds").replace(
        "+00:00", "Z")


def _cmd_token(client: Client, args: argparse.Namespace) -> int:
    token = client.get_token(args.vm, min_ttl=args.min_ttl)
    print(token.access_token)
    return EXIT_OK


def _cmd_header(client: Client, args: argparse.Namespace) -> int:
    print(f"Authorization: Bearer {client.get_token(args.vm).access_token}")
    return EXIT_OK


def _cmd_json(client: Client, args: argparse.Namespace) -> int:
    import json

    token = client.get_token(args.vm, min_ttl=args.min_ttl)
    print(json.dumps({
        "token": token.access_token,
        "videomanager_id": token.videomanager_id,
        "videomanager_name": token.videomanager_name,
        "expires_at": _iso(token.expires_at.timestamp()),
    }))
    return EXIT_OK


def _cmd_exec(client: Client, args: argparse.Namespace) -> int:
    import os

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise _Usage("exec needs a command after --, e.g. vm-token exec -- ./upload.sh")
    from ..client import get_fields
    from ..token import Token

    reply = client.request(protocol.GET, **get_fields(args.vm, args.min_ttl))
    token = Token.from_reply(reply)
    api_url = _api_url(client, reply.get("profile"))
    client.close()
    env = {
        **os.environ,
        "VM_TOKEN_ACCESS_TOKEN": token.access_token,
        "VM_TOKEN_VIDEOMANAGER_ID": token.videomanager_id,
        "VM_TOKEN_API_URL": api_url,
    }
    sys.stdout.flush()
    try:
        os.execvpe(command[0], command, env)  # noqa: S606 - running the user's command is the point
    except FileNotFoundError:
        fail(f"{command[0]}: command not found")
        return 127
    except PermissionError:
        fail(f"{command[0]}: permission denied")
        return 126
    except OSError as exc:
        fail(f"{command[0]}: {exc.strerror}")
        return 126
    return EXIT_OK  # not reached: execvpe does not return


def _api_url(client: Client, profile: object) -> str:
    """The API address of `profile` (the daemon's reply named it), else the daemon's."""
    if isinstance(profile, str):
        for item in client.status().get("profiles") or []:
            if isinstance(item, dict) and item.get("name") == profile and item.get("api_url"):
                return str(item["api_url"])
    return str(client.hello().get("api_url") or "")


def _several_profiles(client: Client) -> bool:
    """Whether a listing spans several profiles: no profile asked for, and the daemon has
    more than one."""
    if client.profile is not None:
        return False
    profiles = client.hello().get("profiles")
    return isinstance(profiles, list) and len(profiles) > 1


def _listing(client: Client) -> tuple[list[VideoManager], list[dict[str, Any]]]:
    """Every VideoManager, once the logins in flight have ended (`wait`: right after the
    daemon started, the first command finds its login in progress), and the profiles
    whose login failed. A profile asked for that failed is the daemon's error reply."""
    reply = client.request(protocol.LIST, wait=True)
    videomanagers = videomanagers_from_reply(reply)
    offset = next_page(reply, 0)
    while offset is not None:
        page = client.request(protocol.LIST, offset=offset)
        videomanagers += videomanagers_from_reply(page)
        offset = next_page(page, offset)
    failed = [item for item in reply.get("failed") or [] if isinstance(item, dict)]
    return videomanagers, failed


def _cmd_list(client: Client, args: argparse.Namespace) -> int:
    import json

    videomanagers, failed = _listing(client)
    several = _several_profiles(client)
    if args.json:
        print(json.dumps([{
            **({"profile": vm.profile} if several else {}),
            "id": vm.id, "name": vm.name, "default": vm.is_default,
            "expires_at": _iso(vm.expires_at.timestamp()) if vm.expires_at else None,
            "refreshed_at": _iso(vm.refreshed_at.timestamp()) if vm.refreshed_at else None,
            "last_error": vm.last_error,
        } for vm in videomanagers], indent=2))
    elif not videomanagers and not failed:
        print("no VideoManagers (not logged in yet?)")  # a daemon that does not wait
    else:
        for line in _vm_lines(videomanagers, refreshed=False, profiles=several):
            print(line)
    for item in failed:
        fail(f"profile {item.get('profile')}: {item.get('message')} ({item.get('code')})")
    if not failed:
        return EXIT_OK
    return EXIT_LOGIN if all(item.get("code") in LOGIN_CODES for item in failed) \
        else EXIT_REFUSED


def _vm_lines(videomanagers: list[VideoManager], *, refreshed: bool,
              profiles: bool = False) -> list[str]:
    """A line per VideoManager: `*` for the default (of its profile), its profile (when
    `profiles`), id, name, and the token held."""
    import time

    width = max((len(vm.id) for vm in videomanagers), default=0)
    profile_width = max((len(vm.profile or "") for vm in videomanagers), default=0)
    lines = []
    for vm in videomanagers:
        if vm.expires_at is not None:
            held = "token valid " + _duration(vm.expires_at.timestamp() - time.time())
        else:
            held = "no token held"
        if refreshed and vm.refreshed_at is not None:
            held += ", refreshed " + (_iso(vm.refreshed_at.timestamp()) or "")
        if vm.last_error:
            held += f"; last error: {vm.last_error}"
        mark = "*" if vm.is_default else " "
        profile = f"{vm.profile or '':<{profile_width}}  " if profiles else ""
        lines.append(f"{mark} {profile}{vm.id:<{width}}  {vm.name}  ({held})")
    return lines


def _cmd_status(client: Client, args: argparse.Namespace) -> int:
    import json

    status = client.request(protocol.STATUS, wait=True)  # for a login in flight
    status.pop("ok", None)
    if args.json:
        for key in ("logged_in_at",):
            status[key] = _iso(status.get(key))
        for vm in status.get("videomanagers") or []:
            vm["expires_at"] = _iso(vm.get("expires_at"))
            vm["refreshed_at"] = _iso(vm.get("refreshed_at"))
        print(json.dumps(status, indent=2))
        return EXIT_OK
    print(f"vm-tokend {status.get('version')} (pid {status.get('pid')}), "
          f"up {_duration(float(status.get('uptime') or 0))}")
    profiles = [p for p in status.get("profiles") or [] if isinstance(p, dict)]
    if client.profile is not None or len(profiles) <= 1:
        # One profile (or one asked for): the account's lines, as before profiles.
        if len(profiles) > 1:
            print(f"profile:  {status.get('profile')}")
        head, vms = _account_lines(status, _api_of(status, profiles), "vm-token list")
        for line in (*head, _requests_line(status), *vms):
            print(line)
        return EXIT_OK
    # Several: the daemon-wide counters, then a block per profile.
    print(_requests_line(status))
    for profile in profiles:
        name = str(profile.get("name"))
        # The reply carries the VideoManagers and notices of one profile only: ask for
        # each of the others (a status is cheap, and answered from the daemon's memory).
        detail = status if name == status.get("profile") else client.request(
            protocol.STATUS, profile=name)
        print()
        print(f"profile {name}" + (" (the default)" if profile.get("default") else "") + ":")
        head, vms = _account_lines(detail, profile.get("api_url"),
                                   f"vm-token list --profile {name}")
        for line in (*head, *vms):
            print(f"  {line}")
    return EXIT_OK


def _api_of(status: dict[str, Any], profiles: list[dict[str, Any]]) -> object:
    """The API of the profile `status` describes (its own entry: older daemons put the
    default profile's at the top level whichever was asked for)."""
    for profile in profiles:
        if profile.get("name") == status.get("profile") and profile.get("api_url"):
            return profile["api_url"]
    return status.get("api_url")


def _account_lines(status: dict[str, Any], api_url: object,
                   list_command: str) -> tuple[list[str], list[str]]:
    """A profile's lines of `vm-token status`: API, state, auth, errors; its VideoManagers."""
    lines = [f"API:      {api_url}"]
    user = status.get("username")
    lines.append(f"state:    {status.get('state')}" + (f" as {user}" if user else ""))
    auth = _auth_line(status)
    if auth:
        lines.append(f"auth:     {auth}")
    if status.get("last_error"):
        lines.append(f"error:    {status['last_error']}")
    lines += [f"note:     {notice}" for notice in status.get("notices") or []]
    shown = videomanagers_from_reply(status)
    vms = [f"  {line}" for line in _vm_lines(shown, refreshed=True)]
    total = status.get("videomanagers_total")
    if isinstance(total, int) and total > len(shown):
        vms.append(f"  … and {total - len(shown)} more: `{list_command}`")
    return lines, vms


def _requests_line(status: dict[str, Any]) -> str:
    calls = status.get("upstream_calls") or {}
    return (f"requests: {status.get('requests')} served; upstream calls: "
            f"{calls.get('login', 0)} logins, {calls.get('refresh', 0)} refreshes"
            + "".join(f", {calls[kind]} {what}" for kind, what in (
                ("videomanagers", "VideoManager lists"), ("webfinger", "WebFinger"),
                ("discovery", "discovery")) if calls.get(kind)))


def _cmd_profiles(client: Client, args: argparse.Namespace) -> int:
    import json

    # profile=None: every profile, whatever --profile or $VM_TOKEN_PROFILE say.
    status = client.request(protocol.STATUS, profile=None)
    profiles = [p for p in status.get("profiles") or [] if isinstance(p, dict)]
    if not profiles:  # a daemon from before profiles: its one account
        profiles = [{"name": "default", "default": True, "api_url": status.get("api_url"),
                     "username": status.get("username"), "auth": status.get("auth"),
                     "issuer": status.get("issuer"), "state": status.get("state"),
                     "last_error": status.get("last_error"),
                     "videomanagers_total": status.get("videomanagers_total")}]
    for profile in profiles:
        profile["api_host"] = _host(profile.get("api_url"))
    if args.json:
        print(json.dumps(profiles, indent=2))
        return EXIT_OK
    rows = [[str(p.get(key) or "-") for key in ("name", "api_host", "username", "auth",
                                                  "state")] for p in profiles]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for profile, row in zip(profiles, rows, strict=True):
        cells = "  ".join(f"{cell:<{width}}" for cell, width in zip(row, widths, strict=True))
        print(("* " if profile.get("default") else "  ") + cells.rstrip())
    return EXIT_OK


def _host(api_url: object) -> str | None:
    """The host[:port] of an API address."""
    from urllib.parse import urlsplit

    return urlsplit(api_url).netloc or None if isinstance(api_url, str) else None


def _auth_line(status: dict[str, object]) -> str | None:
    """How the daemon logs in, in words: `oidc, issuer …, client …` or `legacy`."""
    auth = status.get("auth")
    if auth == "oidc":
        return (f"oidc, issuer {status.get('issuer')}, client {status.get('client_id')} "
                "(one token serves every VideoManager)")
    return str(auth) if auth else None


# How long an interactive login may take, unless --timeout says otherwise.
LOGIN_TIMEOUT = 300.0


def _cmd_login(client: Client, args: argparse.Namespace) -> int:
    interactive = args.browser or args.no_browser or args.device
    if interactive and (args.username or args.password_stdin):
        raise _Usage("--browser, --no-browser and --device take no username or password")
    hello = client.hello()
    if not interactive and not args.username and not args.password_stdin \
            and hello.get("login_method") == "browser":
        interactive = args.browser = True  # the daemon expects a browser login
    if interactive:
        return _interactive_login(client, args, hello)
    return _password_login(client, args)


def _interactive_login(client: Client, args: argparse.Namespace,
                       hello: dict[str, object]) -> int:
    from .login import LoginAborted, browser_login, device_login

    port = hello.get("redirect_port")
    try:
        if args.device:  # by default, as long as the code is valid
            username = device_login(client, timeout=args.timeout)
        else:
            username = browser_login(client, port=port if isinstance(port, int) else 0,
                                     open_browser=not args.no_browser,
                                     timeout=args.timeout or LOGIN_TIMEOUT)
    except LoginAborted as exc:
        fail(f"login failed: {exc}")
        return EXIT_REFUSED
    except OSError as exc:  # the loopback port is taken, say
        fail(f"cannot listen on 127.0.0.1 for the login: {exc.strerror or exc}")
        return EXIT_REFUSED
    print(f"logged in as {username}")
    return EXIT_OK


def _password_login(client: Client, args: argparse.Namespace) -> int:
    import getpass

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


def _cmd_git(client: Client, args: argparse.Namespace) -> int:
    raise _Usage(f"`vm-token {args.operation}` reads a credential description from git on "
                 "stdin; see `vm-token --help`")


def _parser() -> ArgumentParser:
    from .._version import __version__

    def common() -> ArgumentParser:
        # A fresh parent for each parser: argparse shares a parent's Action objects, so
        # set_defaults on one parser would change every other's defaults, and a subcommand's
        # default would overwrite an option given before it (`vm-token --profile w list`).
        options = ArgumentParser(add_help=False)
        options.add_argument("--socket", metavar="PATH", default=argparse.SUPPRESS,
                             help="the daemon's socket (default: $VM_TOKEN_SOCKET, else "
                                  "$XDG_RUNTIME_DIR/vm-token/socket)")
        options.add_argument("--timeout", type=float, metavar="S", default=argparse.SUPPRESS,
                             help=f"give up after S seconds (default {DEFAULT_TIMEOUT:g})")
        options.add_argument("--profile", metavar="NAME", default=argparse.SUPPRESS,
                             help="the daemon's profile (account) to use (default: "
                                  "$VM_TOKEN_PROFILE, else the daemon's default profile; "
                                  "for git, the one whose API host git asks about)")
        return options

    parser = ArgumentParser(
        prog="vm-token", parents=[common()],
        description=(
            "Get VideoManager Pro access tokens from the vm-tokend daemon. Also a git "
            "credential helper: `git config --global "
            "credential.https://api.video-cdn.net.helper vm-token`."
        ),
        epilog="git credential helper operations: get, store, erase (input on stdin).\n\n"
               + EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(socket=None, timeout=DEFAULT_TIMEOUT, profile=None)
    parser.add_argument("--version", action="version", version=f"vm-token {__version__}")
    commands = parser.add_subparsers(dest="subcommand", metavar="COMMAND", required=True)

    def add(name: str, handler: Callable[[Client, argparse.Namespace], int], help_: str,
            example: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name, help=help_, description=help_, parents=[common()],
            epilog=f"example:\n  {example}\n\n{EXIT_CODES_HELP}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.set_defaults(handler=handler)
        return sub

    def vm_options(sub: argparse.ArgumentParser, min_ttl: bool = True) -> None:
        sub.add_argument("--vm", metavar="ID|NAME",
                         help="the VideoManager, by id or name (default: the default one)")
        if min_ttl:
            sub.add_argument("--min-ttl", type=float, default=0, metavar="S",
                             help="the token must stay valid at least S more seconds")

    vm_options(add("token", _cmd_token, "print an access token, alone on a line",
                   'curl -H "Authorization: Bearer $(vm-token token --vm Marketing)" URL'))
    vm_options(add("header", _cmd_header, "print an Authorization header line",
                   "vm-token header --vm Sales | curl -H @- URL"), min_ttl=False)
    vm_options(add("json", _cmd_json, "print the token, VideoManager and expiry as JSON",
                   "vm-token json --vm Sales | jq -r .expires_at"))
    run = add("exec", _cmd_exec,
              "run a command with the token in its environment (VM_TOKEN_ACCESS_TOKEN, "
              "VM_TOKEN_VIDEOMANAGER_ID, VM_TOKEN_API_URL), never in its arguments",
              "vm-token exec --vm Sales -- ./upload.sh video.mp4")
    vm_options(run)
    run.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD ARGS")
    listing = add("list", _cmd_list, "list the VideoManagers and the tokens held for them",
                  "vm-token list --json")
    listing.add_argument("--json", action="store_true", help="print JSON")
    status = add("status", _cmd_status, "show the daemon's state (never a secret)",
                 "vm-token status --json")
    status.add_argument("--json", action="store_true", help="print JSON")
    profiles = add("profiles", _cmd_profiles,
                   "list the daemon's profiles (accounts): name (* the default), API host, "
                   "user, auth, state", "vm-token profiles --json")
    profiles.add_argument("--json", action="store_true", help="print JSON")
    login = add("login", _cmd_login,
                "log in: in a browser (--browser, --no-browser), with a code entered on "
                "another device (--device), or by giving the daemon a password (kept in its "
                "memory only)",
                "vm-token login --browser    # or: pass show vmpro | vm-token login "
                "--username me@example.com --password-stdin")
    how = login.add_mutually_exclusive_group()
    how.add_argument("--browser", action="store_true",
                     help="log in in a browser this machine opens (single sign-on, 2FA)")
    how.add_argument("--no-browser", action="store_true",
                     help="print the address to open in any browser, then read the address "
                          "it ends up at from stdin (over SSH, in containers)")
    how.add_argument("--device", action="store_true",
                     help="print a code to enter on another device's browser (waits as long "
                          "as the code is valid, at most 15 minutes, unless --timeout)")
    login.add_argument("--username", metavar="NAME")
    login.add_argument("--password-stdin", action="store_true",
                       help="read the password from the first line of stdin")
    # interactive: 5 minutes (a device login: the code's lifetime) unless given
    login.set_defaults(timeout=None)
    add("logout", _cmd_logout, "make the daemon forget the credentials and every token",
        "vm-token logout")
    for operation in GIT_OPERATIONS:
        git = add(operation, _cmd_git, f"git credential helper: {operation}",
                  "printf 'protocol=https\\nhost=api.video-cdn.net\\n\\n' | vm-token get")
        git.set_defaults(operation=operation)
    return parser


def run(args: list[str]) -> int:
    parser = _parser()
    try:
        options = parser.parse_args(args)
    except SystemExit as exc:  # usage errors exit 2, --help/--version 0
        return int(exc.code or 0)
    handler: Callable[[Client, argparse.Namespace], int] = options.handler
    try:
        with Client(options.socket, timeout=options.timeout or DEFAULT_TIMEOUT,
                    profile=options.profile) as client:
            return handler(client, options)
    except _Usage as exc:
        fail(str(exc))
        return EXIT_USAGE
    except errors.Error as exc:
        return exit_code(exc)


