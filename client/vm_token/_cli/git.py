"""git's credential-helper operations `get`, `erase` and `store`, on the fast path: one
request each, nothing imported but the wire modules and `_git_credential`."""

from __future__ import annotations

import sys

from .. import _frames, errors
from .._git_credential import (
    MAX_LINE,
    CredentialInputError,
    format_answer,
    parse,
    videomanager_from_path,
)
from .shared import EXIT_OK, ask, exit_code, profile_field

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from .._git_credential import Credential

# git sends a few hundred bytes; anything near this is not git.
MAX_CREDENTIAL_INPUT = 1 << 20


def read_description() -> Credential:
    """Read git's description up to a blank line or EOF (a caller may keep stdin open)."""
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


def git_fields(credential: Credential, options: dict[str, str]) -> dict[str, Any] | None:
    """The fields of a request for git, None without a host: `host` and `protocol` (the
    daemon answers only for a profile's API host, and picks the profile by it), `user`
    (git's username: of two profiles on one host, the one of that user) and the profile
    of `--profile`. Not `$VM_TOKEN_PROFILE`: git's host says which profile, and a shell's
    setting must not send one account's token to another's host."""
    host = credential.get("host")
    if not host:
        return None
    fields = {"host": host, "protocol": credential.get("protocol") or "https",
              **profile_field(options, environment=False)}
    user = credential.get("username")
    if user:
        fields["user"] = user
    return fields


def get(options: dict[str, str], timeout: float) -> int:
    credential = read_description()
    fields = git_fields(credential, options)
    if fields is None:
        return EXIT_OK
    by_path = videomanager_from_path(credential.get("path"))
    vm = by_path or credential.get("username")
    message: dict[str, Any] = {"op": _frames.GET, **fields}
    if vm:
        message["vm"] = vm
    try:
        try:
            reply = ask(options, message, timeout)
        except errors.UnknownVideoManager:
            if by_path or not vm:
                raise
            # A username that names no VideoManager is just a username: the default.
            del message["vm"]
            reply = ask(options, message, timeout)
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


def erase(options: dict[str, str], timeout: float) -> int:
    credential = read_description()
    fields = git_fields(credential, options)
    token = credential.get("credential") or credential.get("password")
    if fields is None or not token:
        return EXIT_OK
    try:
        ask(options, {"op": _frames.INVALIDATE, "token": token, **fields}, timeout)
    except errors.UnknownHost:
        pass
    except errors.Error as exc:
        exit_code(exc)
    return EXIT_OK


def store(options: dict[str, str], timeout: float) -> int:
    read_description()  # read (git writes it all), check, and keep nothing
    return EXIT_OK


OPERATIONS: dict[str, Callable[[dict[str, str], float], int]] = {
    "get": get,
    "erase": erase,
    "store": store,
}
