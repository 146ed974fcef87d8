"""`vm-token`: tokens for shell scripts, CI jobs and git, from a running vm-tokend.

Start-up time is the point of this module. `token`, `header` and git's `get`, `store`
and `erase` run on a hand-written fast path that imports nothing but the wire protocol
(no argparse, socket, re, typing, json or datetime); anything it does not recognise —
`--help`, a typo, the other subcommands — goes to the argparse front end, which may import
what it likes.

Exit codes: 0 success, 1 refused by the daemon, 2 usage, 3 daemon not reachable, 4 log in
first (not logged in, the session ended, credentials rejected).
"""

from __future__ import annotations

import sys

from . import _frames, errors
from ._cli.shared import (
    DEFAULT_TIMEOUT,
    EXIT_OK,
    EXIT_USAGE,
    GIT_OPERATIONS,
    ask,
    exit_code,
    fail,
    profile_field,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any

# -- the fast path -------------------------------------------------------------------------


def _fast_options(args: list[str], allowed: tuple[str, ...]) -> dict[str, str] | None:
    """`--name value` / `--name=value` options; None for anything else (argparse decides)."""
    options: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        name, eq, value = arg.partition("=")
        if name not in allowed or name in options:
            return None
        if not eq:
            if i + 1 >= len(args):
                return None
            value = args[i + 1]
            i += 1
        options[name] = value
        i += 1
    return options


def _number(text: str | None, default: float) -> float | None:
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        return None
    return value if value >= 0 and value == value and value != float("inf") else None


def _fast_get_token(args: list[str], header: bool) -> int | None:
    options = _fast_options(args, ("--vm", "--min-ttl", "--socket", "--timeout", "--profile"))
    if options is None:
        return None
    min_ttl = _number(options.get("--min-ttl"), 0.0)
    timeout = _number(options.get("--timeout"), DEFAULT_TIMEOUT)
    if min_ttl is None or not timeout:
        return None
    message: dict[str, Any] = {"op": _frames.GET, **profile_field(options, environment=True)}
    if "--vm" in options:
        message["vm"] = options["--vm"]
    if min_ttl:
        message["min_ttl"] = min_ttl
    try:
        reply = ask(options, message, timeout)
    except errors.Error as exc:
        return exit_code(exc)
    token = reply["token"]
    sys.stdout.write(f"Authorization: Bearer {token}\n" if header else f"{token}\n")
    return EXIT_OK


_SUBCOMMANDS = ("token", "header", "json", "exec", "list", "status", "profiles", "login",
                "logout")


def _fast(args: list[str]) -> int | None:
    """Run the common invocations; None when argparse should handle `args`."""
    # git runs `<helper> <operation>`, and a helper configured as `vm-token --socket=X`
    # puts options before the operation.
    i = 0
    while i < len(args) and args[i].startswith("--") and args[i] not in ("--help", "--"):
        i += 1 if "=" in args[i] else 2
    if i >= len(args):
        return None
    command, before, after = args[i], args[:i], args[i + 1:]
    if command in ("token", "header") and not before:
        return _fast_get_token(after, header=command == "header")
    if command not in GIT_OPERATIONS:
        if (command not in _SUBCOMMANDS and not command.startswith("-") and not after
                and not sys.stdin.isatty()):
            return EXIT_OK  # an operation of a newer git: helpers ignore what they don't know
        return None
    options = _fast_options(before + after, ("--socket", "--timeout", "--profile"))
    timeout = _number(options.get("--timeout") if options else None, DEFAULT_TIMEOUT)
    if options is None or not timeout:
        return None
    from ._cli import git
    from ._git_credential import CredentialInputError

    try:
        return git.OPERATIONS[command](options, timeout)
    except CredentialInputError as exc:
        fail(f"cannot read the credential description from git: {exc}")
        return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        code = _fast(args)
        if code is None:
            from ._cli.commands import run

            code = run(args)
        return code
    except KeyboardInterrupt:
        fail("interrupted")
        return 130
    except BrokenPipeError:
        return EXIT_OK
