"""The frame format and the protocol's names, without a codec: what the shim's fast path needs.

`vm_token.protocol` is the public face of this module: it adds msgpack's C codec as the
default. The fast path packs with `_minipack` and must not import msgpack (about 3.5 ms),
so it imports this module, never `protocol` — an import-linter contract holds that.
"""

from __future__ import annotations

import os

# typing costs milliseconds to import: the shim does not pay for it.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import Any, Final

    Packer = Callable[[Any], bytes]
    Unpacker = Callable[[Any], Any]  # bytes, or a memoryview of them

PROTOCOL_VERSION: Final = 1

HEADER_SIZE: Final = 4
# 64 KiB is far above any legitimate request (the largest is `login`, a few hundred bytes)
# and any reply (a `status` with a few hundred VideoManagers), and small enough that a
# hostile client cannot make the daemon buffer much.
MAX_FRAME: Final = 64 * 1024

# Operations.
HELLO: Final = "hello"
GET: Final = "get"
LIST: Final = "list"
STATUS: Final = "status"
INVALIDATE: Final = "invalidate"
LOGIN: Final = "login"
LOGOUT: Final = "logout"
# Interactive logins (browser, device code): the daemon keeps the flow's secrets.
LOGIN_START: Final = "login_start"
LOGIN_FINISH: Final = "login_finish"
LOGIN_WAIT: Final = "login_wait"
LOGIN_CANCEL: Final = "login_cancel"
OPS: Final = frozenset({HELLO, GET, LIST, STATUS, INVALIDATE, LOGIN, LOGOUT, LOGIN_START,
                        LOGIN_FINISH, LOGIN_WAIT, LOGIN_CANCEL})

# Error codes carried in {"ok": false, "error": {"code", "message"}}.
BAD_REQUEST: Final = "bad_request"
NOT_LOGGED_IN: Final = "not_logged_in"
CREDENTIALS_REJECTED: Final = "credentials_rejected"
UNKNOWN_VIDEOMANAGER: Final = "unknown_videomanager"
UNKNOWN_HOST: Final = "unknown_host"
FORBIDDEN: Final = "forbidden"
UPSTREAM_UNAVAILABLE: Final = "upstream_unavailable"
UNSUPPORTED_VERSION: Final = "unsupported_version"
LOGIN_FAILED: Final = "login_failed"
UNKNOWN_PROFILE: Final = "unknown_profile"
# An op the socket does not serve: the token-only socket serves hello, get, invalidate
# and list.
FORBIDDEN_OP: Final = "forbidden_op"
INTERNAL: Final = "internal"
ERROR_CODES: Final = frozenset(
    {
        BAD_REQUEST,
        NOT_LOGGED_IN,
        CREDENTIALS_REJECTED,
        UNKNOWN_VIDEOMANAGER,
        UNKNOWN_HOST,
        FORBIDDEN,
        UPSTREAM_UNAVAILABLE,
        UNSUPPORTED_VERSION,
        LOGIN_FAILED,
        UNKNOWN_PROFILE,
        FORBIDDEN_OP,
        INTERNAL,
    }
)


class MalformedFrame(ValueError):
    """A frame body that is not one msgpack map."""


class FrameTooLarge(ValueError):
    """A frame header announcing more than MAX_FRAME bytes."""


def encode_frame(message: dict[str, Any], pack: Packer) -> bytes:
    """Serialize one message as a complete frame (header + body)."""
    body = pack(message)
    if len(body) > MAX_FRAME:
        raise FrameTooLarge(f"message of {len(body)} bytes exceeds the {MAX_FRAME}-byte limit")
    return len(body).to_bytes(HEADER_SIZE, "big") + body


def frame_length(header: bytes | bytearray | memoryview) -> int:
    """The body length announced by a 4-byte header; FrameTooLarge past the limit."""
    if len(header) != HEADER_SIZE:
        raise ValueError(f"a frame header is {HEADER_SIZE} bytes, not {len(header)}")
    length = int.from_bytes(header, "big")
    if length > MAX_FRAME:
        raise FrameTooLarge(f"frame of {length} bytes exceeds the {MAX_FRAME}-byte limit")
    return length


def decode_body(body: bytes | memoryview, unpackb: Unpacker) -> dict[str, Any]:
    """Parse one frame body; MalformedFrame unless it is exactly one msgpack map with str keys."""
    try:
        message = unpackb(body)
    except Exception as exc:  # msgpack raises a zoo of types; any of them means "malformed"
        raise MalformedFrame("not a valid msgpack message") from exc
    if not isinstance(message, dict):
        raise MalformedFrame(f"expected a msgpack map, got {type(message).__name__}")
    if not all(isinstance(key, str) for key in message):
        raise MalformedFrame("map keys must be strings")
    return message


def default_socket_path(environ: Mapping[str, str] | None = None) -> str:
    """Where the daemon listens unless told otherwise.

    `$VM_TOKEN_SOCKET`, else `$XDG_RUNTIME_DIR/vm-token/socket`, else
    `/tmp/vm-token-<uid>/socket` (the daemon refuses that directory unless it owns it and
    only it can enter it, so another user cannot plant a socket there).
    """
    if environ is None:
        environ = os.environ
    explicit = environ.get("VM_TOKEN_SOCKET")
    if explicit:
        return explicit
    runtime = environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "vm-token", "socket")
    return f"{fallback_directory()}/socket"


def fallback_directory() -> str:
    """`/tmp/vm-token-<uid>`, the socket's directory without `$XDG_RUNTIME_DIR`. Anyone can
    create it first: the daemon and the clients use it only if it is ours and private."""
    return f"/tmp/vm-token-{os.getuid()}"  # noqa: S108 - checked for ownership and mode
