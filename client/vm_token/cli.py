"""`vm-token`: tokens for shell scripts, CI jobs and git, from a running vm-tokend.

Start-up time is the point of this module. `token`, `header` and git's `get`, `store`
and `erase` run on a hand-written fast path that imports nothing but the wire protocol
(no argparse, socket, re, typing, json or datetime); anything it does not recognise —
`--help`, a typo, the other subcommands — goes to the argparse front end, which may import
what it likes.

Exit codes: 0 success, 1 refused by the daemon, 2 usage, 3 daemon not reachable.
"""

from __future__ import annotations

import os  # loaded by every interpreter at start-up anyway: costs nothing
import sys

from . import _wire, errors, protocol

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Any

    from ._git_credential import Credential

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

DEFAULT_TIMEOUT = 5.0
# git sends a few hundred bytes; anything near this is not git.
MAX_CREDENTIAL_INPUT = 1 << 20

EXIT_CODES_HELP = """\
exit codes:
  0  success (and, for git's get/store/erase, also when there is nothing to answer)
  1  refused by the daemon: not logged in, credentials rejected, unknown VideoManager,
     API unavailable, ...
  2  usage error, or unreadable input from git
  3  the daemon is not reachable
"""


def fail(message: str) -> None:
    sys.stderr.write(f"vm-token: {message}\n")


def exit_code(exc: errors.Error) -> int:
    """Report `exc` on one line of stderr; the exit code that goes with it."""
    if isinstance(exc, errors.DaemonError):
        fail(f"{exc.message} ({exc.code})")
        return EXIT_REFUSED
    fail(str(exc))
    return EXIT_UNREACHABLE


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


def _ask(options: dict[str, str], message: dict[str, Any], timeout: float) -> dict[str, Any]:
    path = options.get("--socket") or protocol.default_socket_path()
    message["v"] = protocol.PROTOCOL_VERSION
    return _wire.request_once(path, message, timeout)


def _profile(options: dict[str, str], *, environment: bool) -> dict[str, Any]:
    """The `profile` field: `--profile`, else (if `environment`) `$VM_TOKEN_PROFILE`; none
    when neither names one (the daemon's default profile)."""
    profile = options.get("--profile")
    if profile is None and environment:
        profile = os.environ.get("VM_TOKEN_PROFILE")
    return {"profile": profile} if profile else {}


def _fast_get_token(args: list[str], header: bool) -> int | None:
    options = _fast_options(args, ("--vm", "--min-ttl", "--socket", "--timeout", "--profile"))
    if options is None:
        return None
    min_ttl = _number(options.get("--min-ttl"), 0.0)
    timeout = _number(options.get("--timeout"), DEFAULT_TIMEOUT)
    if min_ttl is None or not timeout:
        return None
    message: dict[str, Any] = {"op": protocol.GET, **_profile(options, environment=True)}
    if "--vm" in options:
        message["vm"] = options["--vm"]
    if min_ttl:
        message["min_ttl"] = min_ttl
    try:
        reply = _ask(options, message, timeout)
    except errors.Error as exc:
        return exit_code(exc)
    token = reply["token"]
    sys.stdout.write(f"Authorization: Bearer {token}\n" if header else f"{token}\n")
    return EXIT_OK


def _read_credential() -> Credential:
    """Read git's description up to a blank line or EOF (a caller may keep stdin open)."""
    from ._git_credential import MAX_LINE, CredentialInputError, parse

    lines = []
    total = 0
    while True:
        line = sys.stdin.buffer.readline(MAX_LINE + 1)
        lines.append(line)
        total += len(line)
        if not line or line in (b"\n", b"\r\n") or len(line) > MAX_LINE:
            break  # the end, or a line too long: parse() says which
        if total > MAX_CREDENTIAL_INPUT:
            raise CredentialInputError("input is too long for a credential description")
    return parse(b"".join(lines))


def _git_fields(credential: Credential, options: dict[str, str]) -> dict[str, Any] | None:
    """The fields of a request for git, None without a host: `host` and `protocol` (the
    daemon answers only for a profile's API host, and picks the profile by it), `user`
    (git's username: of two profiles on one host, the one of that user) and the profile
    of `--profile`. Not `$VM_TOKEN_PROFILE`: git's host says which profile, and a shell's
    setting must not send one account's token to another's host."""
    host = credential.get("host")
    if not host:
        return None
    fields = {"host": host, "protocol": credential.get("protocol") or "https",
              **_profile(options, environment=False)}
    user = credential.get("username")
    if user:
        fields["user"] = user
    return fields


def _git_get(options: dict[str, str], timeout: float) -> int:
    from ._git_credential import format_answer, videomanager_from_path

    credential = _read_credential()
    fields = _git_fields(credential, options)
    if fields is None:
        return EXIT_OK
    by_path = videomanager_from_path(credential.get("path"))
    vm = by_path or credential.get("username")
    message: dict[str, Any] = {"op": protocol.GET, **fields}
    if vm:
        message["vm"] = vm
    try:
        try:
            reply = _ask(options, message, timeout)
        except errors.UnknownVideoManager:
            if by_path or not vm:
                raise
            # A username that names no VideoManager is just a username: the default.
            del message["vm"]
            reply = _ask(options, message, timeout)
    except errors.UnknownHost:
        return EXIT_OK  # not the API's host: never hand the token elsewhere
    except errors.Error as exc:
        exit_code(exc)
        return EXIT_OK  # git falls through to its next helper, or prompts
    expiry = str(int(reply["expires_at"]))
    if credential.has_capability("authtype"):
        answer = [("capability[]", "authtype"), ("authtype", "Bearer"),
                  ("credential", reply["token"]), ("ephemeral", "1"),
                  ("password_expiry_utc", expiry)]
    else:
        answer = [("username", reply.get("username") or "token"),
                  ("password", reply["token"]), ("password_expiry_utc", expiry)]
    sys.stdout.write(format_answer(answer))
    return EXIT_OK


def _git_erase(options: dict[str, str], timeout: float) -> int:
    credential = _read_credential()
    fields = _git_fields(credential, options)
    token = credential.get("credential") or credential.get("password")
    if fields is None or not token:
        return EXIT_OK
    try:
        _ask(options, {"op": protocol.INVALIDATE, "token": token, **fields}, timeout)
    except errors.UnknownHost:
        pass
    except errors.Error as exc:
        exit_code(exc)
    return EXIT_OK


def _git_store(options: dict[str, str], timeout: float) -> int:
    _read_credential()  # read (git writes it all), check, and keep nothing
    return EXIT_OK


GIT_OPERATIONS: dict[str, Callable[[dict[str, str], float], int]] = {
    "get": _git_get,
    "erase": _git_erase,
    "store": _git_store,
}
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
    operation = GIT_OPERATIONS.get(command)
    if operation is None:
        if (command not in _SUBCOMMANDS and not command.startswith("-") and not after
                and not sys.stdin.isatty()):
            return EXIT_OK  # an operation of a newer git: helpers ignore what they don't know
        return None
    options = _fast_options(before + after, ("--socket", "--timeout", "--profile"))
    timeout = _number(options.get("--timeout") if options else None, DEFAULT_TIMEOUT)
    if options is None or not timeout:
        return None
    from ._git_credential import CredentialInputError

    try:
        return operation(options, timeout)
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
