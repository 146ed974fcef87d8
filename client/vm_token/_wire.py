"""One request, one reply, over the daemon's socket: shared by Client and the vm-token shim.

Built on the C module `_socket` rather than `socket` (which pulls in enum, selectors and
more): `vm-token token` runs this on every call and must start almost as fast as the
interpreter itself.

Before anything is sent, a connection proves it leads to our own daemon: the socket's peer
(SO_PEERCRED) must run as our uid, as root, or as the one uid we were told to trust
(`daemon_uid`, `$VM_TOKEN_DAEMON_UID`: a daemon of another user or container sharing its
token socket), and the fallback directory `/tmp/vm-token-<uid>/` must be ours and private.
Otherwise another local user who got there first would receive our password and requests,
and hand us tokens of their account.

A peer whose uid is not mapped into our user namespace shows as the overflow uid (65534),
whoever it is: in a user namespace of our own, such a daemon is refused even when that is
our own uid there, with a message that says why and how to map it.
"""

from __future__ import annotations

import _socket
import os
import sys
from time import monotonic, sleep

from . import _frames, _minipack
from .errors import DaemonNotRunning, Error, ProtocolError, UntrustedDaemon, error_for_code

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


class Closed(Exception):
    """The daemon closed the connection."""


# How long a client waits for the daemon unless told otherwise: the fast path, Client and
# AsyncClient alike.
DEFAULT_TIMEOUT = 5.0

# A connection the daemon closed: worth one reconnect when it was an idle, reused one.
DISCONNECTED = (Closed, ConnectionResetError, BrokenPipeError)
# Everything `exchange` raises; `translate` turns each into a vm_token error.
FAILURES = (Closed, OSError, _frames.MalformedFrame, _frames.FrameTooLarge)

# Linux's struct ucred is three native ints: pid, uid, gid.
_UCRED_SIZE = 12
_INT = 4
# Linux's struct timeval (for SO_RCVTIMEO/SO_SNDTIMEO) is two C longs: seconds, microseconds.
_LONG = 8 if sys.maxsize > 2**32 else 4
_HEADER_SIZE = _frames.HEADER_SIZE
# The largest frame fits the receive buffer, so a reply that has arrived takes one call.
_RECEIVE_SIZE = _frames.HEADER_SIZE + _frames.MAX_FRAME
_S_IFMT, _S_IFDIR = 0o170000, 0o040000


def _remaining(deadline: float) -> float:
    left = deadline - monotonic()
    if left <= 0:
        raise TimeoutError
    return left


def check_directory(path: str) -> None:
    """Refuse a socket in the fallback directory `/tmp/vm-token-<uid>/` unless that directory
    is ours and closed to others. (`$XDG_RUNTIME_DIR` is private by definition; a path the
    user names is theirs to vouch for.)"""
    directory = _frames.fallback_directory()
    if path.rpartition("/")[0] != directory:
        return
    try:
        info = os.lstat(directory)
    except FileNotFoundError:
        raise DaemonNotRunning(path) from None
    except OSError as exc:
        raise Error(f"cannot check {directory}: {exc.strerror or exc}") from exc
    if info.st_mode & _S_IFMT != _S_IFDIR:
        raise UntrustedDaemon(f"{directory} is not a directory: refusing to use a socket there")
    if info.st_uid != os.getuid():
        raise UntrustedDaemon(
            f"{directory} is owned by uid {info.st_uid}, not you: refusing to use the "
            "vm-tokend socket in it (another user may have created it; remove it, or set "
            "XDG_RUNTIME_DIR or VM_TOKEN_SOCKET)")
    if info.st_mode & 0o077:
        raise UntrustedDaemon(
            f"{directory} is accessible to other users (mode {info.st_mode & 0o7777:04o}): "
            f"refusing to use the vm-tokend socket in it; `chmod 700 {directory}` if it is "
            "yours")


DAEMON_UID_VARIABLE = "VM_TOKEN_DAEMON_UID"


def resolve_daemon_uid(daemon_uid: int | None) -> int | None:
    """The daemon uid to trust besides ours and root: `daemon_uid`, else
    `$VM_TOKEN_DAEMON_UID` (if set and not empty); Error when it is no uid."""
    if daemon_uid is None:
        text = os.environ.get(DAEMON_UID_VARIABLE, "").strip()
        if not text:
            return None
        if not text.isdecimal() or not text.isascii():
            raise Error(f"{DAEMON_UID_VARIABLE} must be a uid number, not {text[:20]!r}")
        daemon_uid = int(text)
    if isinstance(daemon_uid, bool) or not isinstance(daemon_uid, int) \
            or not 0 <= daemon_uid < 2**32 - 1:
        raise Error(f"daemon_uid must be a uid number, not {daemon_uid!r}")
    return daemon_uid


def _read_proc(path: str) -> str:
    try:
        with open(path, encoding="ascii") as f:
            return f.read()
    except (OSError, ValueError):
        return ""


def _unmapped(uid: int) -> bool:
    """Whether `uid`, as a peer shows here, is the overflow uid of a user namespace that
    is not the machine's: then it stands for every uid the namespace does not map. (The
    machine's namespace maps every uid to itself: 65534 there is a real user, nobody.)"""
    if _read_proc("/proc/self/uid_map").split() == ["0", "0", "4294967295"]:
        return False
    overflow = _read_proc("/proc/sys/kernel/overflowuid").strip()
    return uid == (int(overflow) if overflow.isdecimal() else 65534)


def check_peer(sock: Any, path: str, daemon_uid: int | None = None) -> None:
    """Refuse a daemon that runs as another user (root is trusted: it could read our memory
    anyway), unless it is `daemon_uid`. A client told `daemon_uid` trusts that uid and its
    own, not root (unless root is its own uid, or the one named): the socket is then on a
    volume shared with other containers, whose root can reach the volume but not our
    memory. `sock` is anything with `getsockopt`: a `_socket`, trio's or asyncio's
    socket."""
    try:
        raw = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, _UCRED_SIZE)
    except OSError as exc:
        raise Error(f"cannot check who runs vm-tokend at {path}: {exc.strerror or exc}") from exc
    uid = int.from_bytes(raw[_INT:2 * _INT], sys.byteorder)
    if uid == 0 and daemon_uid in (None, 0):
        return
    unmapped = _unmapped(uid)
    if uid in (os.getuid(), daemon_uid) and not unmapped:
        return  # (root only when it is our own uid, or the one named)
    if unmapped:
        raise UntrustedDaemon(
            f"vm-tokend at {path} shows as uid {uid}, the overflow uid: its real uid is not "
            "mapped into this user namespace (a container's), so it cannot be told from any "
            "other user; run the container with `podman run --userns=keep-id`, or run both "
            "sides as one uid")
    if daemon_uid is not None:
        raise UntrustedDaemon(
            f"vm-tokend at {path} is owned by uid {uid}, not by you or uid {daemon_uid} "
            f"(the daemon uid you named): refusing to use it")
    raise UntrustedDaemon(
        f"vm-tokend at {path} is owned by uid {uid}, not you: refusing to use it (if you "
        f"trust that user's daemon, set {DAEMON_UID_VARIABLE}={uid})")


def connect(path: str, deadline: float, daemon_uid: int | None = None) -> _socket.socket:
    """A connection to our own daemon; DaemonNotRunning when nothing answers, UntrustedDaemon
    when another user's process does."""
    check_directory(path)
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
        check_peer(sock, path, daemon_uid)
        # From here on the socket blocks, bounded by the kernel's SO_RCVTIMEO/SO_SNDTIMEO
        # (see Connection): Python's own timeouts poll before every call.
        sock.settimeout(None)
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


class Connection:
    """One checked connection to the daemon, for one request at a time.

    The socket blocks, and the kernel bounds each send and receive (SO_SNDTIMEO,
    SO_RCVTIMEO) by what is left of the request's deadline, in whole milliseconds, set
    again only when that changes — about once per connection. Python's socket timeouts
    would poll() before every call instead: that cost a quarter of a round trip. The reply
    is received into one buffer, in one call unless it has not all arrived yet.
    """

    __slots__ = ("_limit_ms", "_unpackb", "_view", "path", "sock")

    def __init__(self, path: str, deadline: float, unpackb: _frames.Unpacker,
                 daemon_uid: int | None = None) -> None:
        self.path = path
        self.sock = connect(path, deadline, daemon_uid)
        self._limit_ms = 0
        self._unpackb = unpackb
        self._view = memoryview(bytearray(_RECEIVE_SIZE))

    def close(self) -> None:
        self.sock.close()

    def _limit(self, deadline: float) -> None:
        limit_ms = int((deadline - monotonic()) * 1000)
        if limit_ms <= 0:
            raise TimeoutError  # (and 0 would mean "no limit" to the kernel)
        if limit_ms != self._limit_ms:
            value = ((limit_ms // 1000).to_bytes(_LONG, sys.byteorder)
                     + (limit_ms % 1000 * 1000).to_bytes(_LONG, sys.byteorder))
            self.sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_SNDTIMEO, value)
            self.sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_RCVTIMEO, value)
            self._limit_ms = limit_ms

    def exchange(self, frame: bytes, deadline: float) -> dict[str, Any]:
        """Send one frame, return the reply map. Raises FAILURES (TimeoutError is an
        OSError); `translate` turns them into vm_token errors."""
        view = self._view
        try:
            self._limit(deadline)
            self.sock.sendall(frame)
            self._limit(deadline)
            size = self.sock.recv_into(view)
            if size < _HEADER_SIZE:
                size = self._receive(_HEADER_SIZE, size, deadline)
            end = _HEADER_SIZE + _frames.frame_length(view[:_HEADER_SIZE])
            if size < end:
                size = self._receive(end, size, deadline)
        except BlockingIOError:  # EAGAIN: the kernel's time limit ran out
            raise TimeoutError from None
        if size > end:
            # One question at a time, so one answer: more is not our daemon speaking.
            raise _frames.MalformedFrame("more data than one reply")
        # The client reads only the fields it knows, so unlike the daemon it needs no check
        # that every key is a string.
        try:
            reply = self._unpackb(view[_HEADER_SIZE:end])
        except Exception as exc:  # each msgpack implementation has its own zoo of errors
            raise _frames.MalformedFrame("not a valid msgpack message") from exc
        if type(reply) is not dict:
            raise _frames.MalformedFrame("the reply is not a msgpack map")
        return reply

    def _receive(self, wanted: int, size: int, deadline: float) -> int:
        """Receive until `wanted` bytes are in the buffer; the number there."""
        while size < wanted:
            self._limit(deadline)
            more = self.sock.recv_into(self._view[size:])
            if not more:
                raise Closed
            size += more
        return size


def translate(exc: BaseException, timeout: float) -> Error:
    """The vm_token error for a failure of `exchange`."""
    if isinstance(exc, DISCONNECTED):
        return ProtocolError("vm-tokend closed the connection without answering")
    if isinstance(exc, TimeoutError):
        return ProtocolError(f"vm-tokend did not answer within {timeout:g} s")
    if isinstance(exc, _frames.MalformedFrame | _frames.FrameTooLarge):
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
    frame = _frames.encode_frame(message, _minipack.packb)
    connection = Connection(path, deadline, _minipack.unpackb, resolve_daemon_uid(None))
    try:
        reply = connection.exchange(frame, deadline)
    except FAILURES as exc:
        raise translate(exc, timeout) from exc
    finally:
        connection.close()
    return check(reply)
