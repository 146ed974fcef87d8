"""One request, one reply, over the daemon's socket: shared by Client and the vm-token shim.

Built on the C module `_socket` rather than `socket` (which pulls in enum, selectors and
more): `vm-token token` runs this on every call and must start almost as fast as the
interpreter itself.
"""

from __future__ import annotations

import _socket
from time import monotonic, sleep

from . import _minipack, protocol
from .errors import DaemonNotRunning, Error, ProtocolError, error_for_code

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


class Closed(Exception):
    """The daemon closed the connection."""


# A connection the daemon closed: worth one reconnect when it was an idle, reused one.
DISCONNECTED = (Closed, ConnectionResetError, BrokenPipeError)
# Everything `exchange` raises; `translate` turns each into a vm_token error.
FAILURES = (Closed, OSError, protocol.MalformedFrame, protocol.FrameTooLarge)


def _remaining(deadline: float) -> float:
    left = deadline - monotonic()
    if left <= 0:
        raise TimeoutError
    return left


def connect(path: str, deadline: float) -> _socket.socket:
    """A connection to the daemon; DaemonNotRunning when nothing answers."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        pause = 0.001
        while True:
            sock.settimeout(_remaining(deadline))
            try:
                sock.connect(path)
                break
            except BlockingIOError:
                # The daemon's accept queue is full (a burst of clients): Unix sockets say
                # EAGAIN rather than queue us. Try again until the deadline.
                sleep(min(pause, _remaining(deadline)))
                pause = min(pause * 2, 0.05)
    except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError) as exc:
        sock.close()
        raise DaemonNotRunning(path) from exc
    except PermissionError as exc:
        sock.close()
        raise Error(f"no permission to connect to {path}") from exc
    except TimeoutError as exc:
        sock.close()
        raise ProtocolError(f"vm-tokend at {path} did not accept the connection in time") from exc
    except OSError as exc:
        sock.close()
        raise Error(f"cannot connect to {path}: {exc.strerror or exc}") from exc
    except BaseException:
        sock.close()
        raise
    return sock


def _receive_exactly(sock: _socket.socket, size: int, deadline: float) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        sock.settimeout(_remaining(deadline))
        chunk = sock.recv(size - len(chunks))
        if not chunk:
            raise Closed
        chunks += chunk
    return bytes(chunks)


def exchange(
    sock: _socket.socket, frame: bytes, deadline: float, unpackb: protocol.Unpacker | None = None
) -> dict[str, Any]:
    """Send one frame, return the reply map. Raises FAILURES (TimeoutError is an OSError);
    `translate` turns them into vm_token errors."""
    sock.settimeout(_remaining(deadline))
    sock.sendall(frame)
    header = _receive_exactly(sock, protocol.HEADER_SIZE, deadline)
    body = _receive_exactly(sock, protocol.frame_length(header), deadline)
    if unpackb is None:
        return protocol.decode_body(body)
    return protocol.decode_body(body, unpackb)


def translate(exc: BaseException, timeout: float) -> Error:
    """The vm_token error for a failure of `exchange`."""
    if isinstance(exc, DISCONNECTED):
        return ProtocolError("vm-tokend closed the connection without answering")
    if isinstance(exc, TimeoutError):
        return ProtocolError(f"vm-tokend did not answer within {timeout:g} s")
    if isinstance(exc, protocol.MalformedFrame | protocol.FrameTooLarge):
        return ProtocolError(f"vm-tokend sent a reply this client cannot read: {exc}")
    if isinstance(exc, OSError):
        return ProtocolError(f"talking to vm-tokend failed: {exc.strerror or exc}")
    return ProtocolError(str(exc))


def check(reply: dict[str, Any]) -> dict[str, Any]:
    """The reply if it says ok; the matching DaemonError otherwise."""
    ok = reply.get("ok")
    if ok is True:
        return reply
    error = reply.get("error")
    if ok is False and isinstance(error, dict):
        code, message = error.get("code"), error.get("message")
        if isinstance(code, str) and isinstance(message, str):
            raise error_for_code(code, message)
    raise ProtocolError("vm-tokend sent a reply this client does not understand")


def request_once(path: str, message: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Connect, ask, close: what a short-lived process like the shim needs (pure-Python
    msgpack: for one message, importing the C extension costs more than it saves)."""
    deadline = monotonic() + timeout
    sock = connect(path, deadline)
    try:
        frame = protocol.encode_frame(message, _minipack.packb)
        reply = exchange(sock, frame, deadline, _minipack.unpackb)
    except FAILURES as exc:
        raise translate(exc, timeout) from exc
    finally:
        sock.close()
    return check(reply)
