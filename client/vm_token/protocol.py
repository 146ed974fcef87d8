"""The wire protocol between vm-tokend and its clients — the one module both sides import.

A frame is a 4-byte big-endian length followed by that many bytes of one msgpack map.
docs/PROTOCOL.md describes it for people writing clients in other languages; keep the two
in step.

The names and the framing are defined in `_frames` (without a codec, for the shim's fast
path, which packs with `_minipack`); this module adds msgpack's C codec as the default, for
the daemon and the library, imported when first used.
"""

from __future__ import annotations

from . import _frames
from ._frames import (
    BAD_REQUEST,
    CREDENTIALS_REJECTED,
    ERROR_CODES,
    FORBIDDEN,
    FORBIDDEN_OP,
    GET,
    HEADER_SIZE,
    HELLO,
    INTERNAL,
    INVALIDATE,
    LIST,
    LOGIN,
    LOGIN_CANCEL,
    LOGIN_FAILED,
    LOGIN_FINISH,
    LOGIN_START,
    LOGIN_WAIT,
    LOGOUT,
    MAX_FRAME,
    NOT_LOGGED_IN,
    OPS,
    PROTOCOL_VERSION,
    STATUS,
    UNKNOWN_HOST,
    UNKNOWN_PROFILE,
    UNKNOWN_VIDEOMANAGER,
    UNSUPPORTED_VERSION,
    UPSTREAM_UNAVAILABLE,
    FrameTooLarge,
    MalformedFrame,
    default_socket_path,
    fallback_directory,
    frame_length,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


# Everything the protocol names: ops, error codes, limits, framing (defined in _frames).
__all__ = [
    "BAD_REQUEST",
    "CREDENTIALS_REJECTED",
    "ERROR_CODES",
    "FORBIDDEN",
    "FORBIDDEN_OP",
    "FrameTooLarge",
    "GET",
    "HEADER_SIZE",
    "HELLO",
    "INTERNAL",
    "INVALIDATE",
    "LIST",
    "LOGIN",
    "LOGIN_CANCEL",
    "LOGIN_FAILED",
    "LOGIN_FINISH",
    "LOGIN_START",
    "LOGIN_WAIT",
    "LOGOUT",
    "MAX_FRAME",
    "MalformedFrame",
    "NOT_LOGGED_IN",
    "OPS",
    "PROTOCOL_VERSION",
    "STATUS",
    "UNKNOWN_HOST",
    "UNKNOWN_PROFILE",
    "UNKNOWN_VIDEOMANAGER",
    "UNSUPPORTED_VERSION",
    "UPSTREAM_UNAVAILABLE",
    "decode_body",
    "default_socket_path",
    "encode_frame",
    "fallback_directory",
    "frame_length",
]


def packb(message: Any) -> bytes:
    import msgpack  # when first used: a program that wants only the names never loads it

    packed: bytes = msgpack.packb(message, use_bin_type=True)
    return packed


def _unpackb(body: bytes | memoryview) -> Any:
    import msgpack

    # unpackb bounds every string, array and map by the input's length, and the input is
    # at most MAX_FRAME bytes: a hostile frame cannot make it allocate much.
    return msgpack.unpackb(body, raw=False, strict_map_key=True)


def encode_frame(message: dict[str, Any], pack: _frames.Packer = packb) -> bytes:
    """Serialize one message as a complete frame (header + body)."""
    return _frames.encode_frame(message, pack)


def decode_body(body: bytes | memoryview,
                unpackb: _frames.Unpacker = _unpackb) -> dict[str, Any]:
    """Parse one frame body; MalformedFrame unless it is exactly one msgpack map with str keys."""
    return _frames.decode_body(body, unpackb)
