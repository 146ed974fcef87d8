"""What the fast path (`vm_token.cli`), git's helper operations (`git`) and the full CLI
(`commands`) share: exit codes, one-line errors and one request to the daemon. A leaf: it
imports only the wire modules, so the fast path stays fast and no two CLI modules import
each other.
"""

from __future__ import annotations

import os  # loaded by every interpreter at start-up anyway: costs nothing
import sys

from .. import _frames, _wire, errors

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

DEFAULT_TIMEOUT = _wire.DEFAULT_TIMEOUT
EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_LOGIN = 4  # log in first (as `gh auth token`'s 4: "authentication required")
# The daemon's refusals that a login ends: none yet, or the session ended (sent as
# not_logged_in, its message naming the kind of login), or the password was rejected.
LOGIN_CODES = frozenset({_frames.NOT_LOGGED_IN, "login_required",
                         _frames.CREDENTIALS_REJECTED})

EXIT_CODES_HELP = """\
exit codes:
  0  success (and, for git's get/store/erase, also when there is nothing to answer)
  1  refused by the daemon: unknown VideoManager, API unavailable, ...
  2  usage error, or unreadable input from git
  3  the daemon is not reachable
  4  log in first: not logged in, the login session ended, or the credentials were
     rejected (the message says which, and what to run)
"""


def fail(message: str) -> None:
    sys.stderr.write(f"vm-token: {message}\n")


def exit_code(exc: errors.Error) -> int:
    """Report `exc` on one line of stderr; the exit code that goes with it."""
    if isinstance(exc, errors.DaemonError):
        fail(f"{exc.message} ({exc.code})")
        return EXIT_LOGIN if exc.code in LOGIN_CODES else EXIT_REFUSED
    fail(str(exc))
    return EXIT_UNREACHABLE


# git's helper operations, answered on the fast path (`git`); the full CLI only names them.
GIT_OPERATIONS = ("get", "erase", "store")


def ask(options: dict[str, str], message: dict[str, Any], timeout: float) -> dict[str, Any]:
    path = options.get("--socket") or _frames.default_socket_path()
    message["v"] = _frames.PROTOCOL_VERSION
    return _wire.request_once(path, message, timeout)


def profile_field(options: dict[str, str], *, environment: bool) -> dict[str, Any]:
    """The `profile` field: `--profile`, else (if `environment`) `$VM_TOKEN_PROFILE`; none
    when neither names one (the daemon's default profile)."""
    profile = options.get("--profile")
    if profile is None and environment:
        profile = os.environ.get("VM_TOKEN_PROFILE")
    return {"profile": profile} if profile else {}
