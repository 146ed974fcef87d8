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
