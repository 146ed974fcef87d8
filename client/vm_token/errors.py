"""Exceptions raised by the vm_token client.

    Error
    ├── DaemonNotRunning          nothing answers on the socket
    ├── UntrustedDaemon           the socket (or its /tmp directory) is another user's
    ├── ProtocolError             the daemon's answer made no sense, or the connection broke
    └── DaemonError               the daemon answered with an error; `.code` is the wire code
        ├── BadRequest            bad_request
        ├── NotLoggedIn           not_logged_in
        ├── CredentialsRejected   credentials_rejected
        ├── UnknownVideoManager   unknown_videomanager
        ├── UnknownHost           unknown_host (a git host that is not the API's)
        ├── Forbidden             forbidden
        ├── UpstreamUnavailable   upstream_unavailable
        ├── UnsupportedVersion    unsupported_version
        ├── LoginFailed           login_failed (an interactive login ended without tokens)
        ├── UnknownProfile        unknown_profile (no profile of that name is configured)
        ├── ForbiddenOp           forbidden_op (not served on this socket: a token-only one)
        └── InternalError         internal

Messages never contain a token or a password: the daemon never puts one in an error, and
the client never adds one.
"""

from __future__ import annotations

from . import _frames

__all__ = [
    "BadRequest",
    "CredentialsRejected",
    "DaemonError",
    "DaemonNotRunning",
    "Error",
    "Forbidden",
    "ForbiddenOp",
    "InternalError",
    "LoginFailed",
    "NotLoggedIn",
    "ProtocolError",
    "UnknownHost",
    "UnknownProfile",
    "UnknownVideoManager",
    "UnsupportedVersion",
    "UntrustedDaemon",
    "UpstreamUnavailable",
    "error_for_code",
]


class Error(Exception):
    """Base class of every exception vm_token raises."""


class DaemonNotRunning(Error):
    """Nothing answers on the daemon's socket."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        super().__init__(
            f"vm-tokend is not running (nothing answers on {socket_path}); start it with "
            "`vm-tokend`, or `systemctl --user start vm-tokend.socket` if it is installed "
            "as a service"
        )


class UntrustedDaemon(Error):
    """The socket, or the /tmp directory it is in, belongs to another user; nothing was sent.

    A daemon of another uid (root excepted, and the uid named by `daemon_uid` or
    $VM_TOKEN_DAEMON_UID) could be anyone's: it would receive the password and requests,
    and answer with tokens of its own account."""


class ProtocolError(Error):
    """The connection broke or the daemon's reply was not understood."""


class DaemonError(Error):
    """The daemon refused the request; `code` is the protocol's error code."""

    code: str = _frames.INTERNAL  # per class; set on the class, never on instances

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)


class BadRequest(DaemonError):
    code = _frames.BAD_REQUEST


class NotLoggedIn(DaemonError):
    code = _frames.NOT_LOGGED_IN


class CredentialsRejected(DaemonError):
    code = _frames.CREDENTIALS_REJECTED


class UnknownVideoManager(DaemonError):
    code = _frames.UNKNOWN_VIDEOMANAGER


class UnknownHost(DaemonError):
    code = _frames.UNKNOWN_HOST


class Forbidden(DaemonError):
    code = _frames.FORBIDDEN


class UpstreamUnavailable(DaemonError):
    code = _frames.UPSTREAM_UNAVAILABLE


class UnsupportedVersion(DaemonError):
    code = _frames.UNSUPPORTED_VERSION


class LoginFailed(DaemonError):
    code = _frames.LOGIN_FAILED


class UnknownProfile(DaemonError):
    code = _frames.UNKNOWN_PROFILE


class ForbiddenOp(DaemonError):
    """The socket does not serve that request: a token-only socket (the setting
    token_socket) serves hello, get, invalidate and list."""

    code = _frames.FORBIDDEN_OP


class InternalError(DaemonError):
    code = _frames.INTERNAL


_BY_CODE: dict[str, type[DaemonError]] = {
    cls.code: cls
    for cls in (
        BadRequest,
        NotLoggedIn,
        CredentialsRejected,
        UnknownVideoManager,
        UnknownHost,
        Forbidden,
        UpstreamUnavailable,
        UnsupportedVersion,
        LoginFailed,
        UnknownProfile,
        ForbiddenOp,
        InternalError,
    )
}


def error_for_code(code: str, message: str) -> DaemonError:
    """The exception for a wire error code; unknown codes (a newer daemon) map to DaemonError."""
    cls = _BY_CODE.get(code)
    if cls is None:
        error = DaemonError(f"{message} ({code})")
        return error
    return cls(message)
