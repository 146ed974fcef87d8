"""Raw frames to a running vm-tokend, and the shape every reply must have.

For the hostile-input tests: they send what no well-behaved client would, so they do not
use vm_token.Client (which refuses to build such frames) but a plain socket.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

import msgpack

from vm_token import protocol

# "Every message that repeats client input caps what it repeats": a message is a sentence
# or two, never a page. A bound of our own, well above any message the daemon writes.
MAX_MESSAGE = 600


class NoReply(AssertionError):
    """The daemon closed the connection instead of answering."""


def connect(path, timeout: float = 15.0) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        raise
    return sock


def send_frame(sock: socket.socket, body: bytes) -> None:
    sock.sendall(struct.pack(">I", len(body)) + body)


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return bytes(data)


def read_frame(sock: socket.socket) -> bytes:
    """One reply's body; NoReply if the connection ends first."""
    try:
        header = _read_exactly(sock, protocol.HEADER_SIZE)
    except ConnectionResetError:
        header = b""
    if len(header) < protocol.HEADER_SIZE:
        raise NoReply("the daemon closed the connection instead of answering")
    (length,) = struct.unpack(">I", header)
    assert length <= protocol.MAX_FRAME, f"a reply of {length} bytes exceeds the frame limit"
    body = _read_exactly(sock, length)
    assert len(body) == length, "the daemon closed the connection in the middle of a reply"
    return body


def check_reply(body: bytes) -> dict[str, Any]:
    """The reply as a map, after asserting it has the protocol's shape."""
    assert len(body) <= protocol.MAX_FRAME
    reply = msgpack.unpackb(body, raw=False)
    assert isinstance(reply, dict), f"a reply that is not a map: {type(reply).__name__}"
    assert reply.get("ok") in (True, False), f"a reply without ok: {sorted(reply)}"
    if reply["ok"] is False:
        error = reply.get("error")
        assert isinstance(error, dict), "an error reply without an error map"
        assert error.get("code") in protocol.ERROR_CODES, f"unknown code {error.get('code')!r}"
        message = error.get("message")
        assert isinstance(message, str) and message, "an error without a message"
        assert len(message) <= MAX_MESSAGE, (
            f"a {error['code']} message of {len(message)} characters: {message[:120]!r}…"
        )
    return reply


def ask(path, message: dict[str, Any], timeout: float = 15.0) -> dict[str, Any]:
    """Send one request map on a fresh connection; its checked reply."""
    sock = connect(path, timeout)
    try:
        send_frame(sock, msgpack.packb(message, use_bin_type=True))
        return check_reply(read_frame(sock))
    finally:
        sock.close()


def summary(value: Any, limit: int = 40) -> str:
    """A short description of a request for assertion messages: types and sizes, and
    never a password."""
    if isinstance(value, dict):
        items = []
        for key, item in list(value.items())[:12]:
            shown = "<password>" if key == "password" else summary(item, limit)
            items.append(f"{summary(key, 20)}: {shown}")
        return "{" + ", ".join(items) + (", …}" if len(value) > 12 else "}")
    if isinstance(value, list | tuple):
        inner = ", ".join(summary(item, limit) for item in value[:6])
        return f"[{inner}{', …' if len(value) > 6 else ''}] (len {len(value)})"
    if isinstance(value, str | bytes) and len(value) > limit:
        return f"{value[:limit]!r}… (len {len(value)})"
    return repr(value)[: limit * 2]
