"""The Unix-socket server: socket setup, peer check, framing, limits, dispatch.

Each connection is one task. It checks the peer's uid with SO_PEERCRED, then reads frames
(4-byte big-endian length + msgpack map), answers each in turn, and is closed when it sits
idle too long, stalls half-way through a frame, does not read its reply, or announces an
oversize frame. At most MAX_CONNECTIONS are open at once; past that, a newcomer waits a
moment for a slot and then the connection idle the longest makes room, so a crowd of
silent connections cannot lock a real client out.
"""

from __future__ import annotations

import errno
import logging
import os
import socket as stdlib_socket
import stat
import struct
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import trio

from vm_token import protocol

from .text import quote

__all__ = [
    "Server",
    "error_reply",
    "SocketAlreadyServed",
    "SocketSetupError",
    "bind_unix_socket",
]

log = logging.getLogger(__name__)

# A client sends a whole frame at once; one that stops half-way is broken or hostile.
FRAME_TIMEOUT: Final = 10.0
# Clients keep a connection open between requests; five minutes idle is plenty.
IDLE_TIMEOUT: Final = 300.0
# A client that does not read its reply for this long is dropped.
SEND_TIMEOUT: Final = 10.0
MAX_CONNECTIONS: Final = 512
# In-flight requests get this long to finish at shutdown.
DRAIN_TIMEOUT: Final = 2.0
# Connections waiting to be accepted. A burst of clients beyond it would see EAGAIN on
# connect (Unix sockets do not queue more); the kernel caps it at net.core.somaxconn.
LISTEN_BACKLOG: Final = 4096
RECEIVE_SIZE: Final = 64 * 1024

_PEERCRED: Final = struct.Struct("3i")  # struct ucred: pid, uid, gid


class SocketSetupError(Exception):
    """The socket path cannot be used safely; the message says why."""


class SocketAlreadyServed(SocketSetupError):
    """Another daemon answers on the socket."""


# -- the listening socket --------------------------------------------------------------------


def _check_private_directory(directory: Path) -> None:
    try:
        directory.mkdir(mode=0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise SocketSetupError(f"cannot create {directory}: {exc.strerror}") from None
    info = directory.lstat()
    if not stat.S_ISDIR(info.st_mode):
        raise SocketSetupError(f"{directory} is not a directory")
    if info.st_uid != os.getuid():
        raise SocketSetupError(
            f"{directory} belongs to uid {info.st_uid}, not to this user ({os.getuid()}); "
            "refusing to put the socket there"
        )
    if info.st_mode & 0o077:
        raise SocketSetupError(
            f"{directory} is accessible to other users (mode {stat.S_IMODE(info.st_mode):04o}); "
            f"make it private with `chmod 700 {directory}`"
        )


def _clear_stale_socket(path: Path) -> None:
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise SocketSetupError(f"{path} exists and is not a socket; remove it or pick another")
    probe = stdlib_socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)  # nothing listens: a leftover of a crashed daemon
        return
    except OSError:
        pass  # e.g. a full backlog: somebody is listening
    finally:
        probe.close()
    raise SocketAlreadyServed(f"another vm-tokend is already serving on {path}")


@dataclass
class BoundSocket:
    sock: stdlib_socket.socket
    path: Path | None  # set when we created the file, and so must remove it
    inode: int = 0

    def remove(self) -> None:
        """Remove the socket file, if it is still the one we made."""
        if self.path is None:
            return
        try:
            if self.path.lstat().st_ino == self.inode:
                self.path.unlink()
        except FileNotFoundError:
            pass


def bind_unix_socket(path: Path) -> BoundSocket:
    """A listening socket at `path` in a private directory, mode 0600."""
    _check_private_directory(path.parent)
    _clear_stale_socket(path)
    sock = stdlib_socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise SocketAlreadyServed(f"another vm-tokend is starting on {path}") from None
        raise SocketSetupError(f"cannot bind {path}: {exc.strerror}") from None
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    sock.listen(LISTEN_BACKLOG)
    return BoundSocket(sock, path, path.lstat().st_ino)


def peer_uid(sock: trio.socket.SocketType) -> int | None:
    try:
        raw = sock.getsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_PEERCRED, _PEERCRED.size)
    except OSError:
        return None
    _, uid, _ = _PEERCRED.unpack(raw)
    return int(uid)


# -- requests -------------------------------------------------------------------------------


def error_reply(code: str, message: str) -> dict[str, Any]:
    return {"ok": False, "error": {"code": code, "message": message}}


def _where(exc: BaseException) -> str:
    """file:line where `exc` was raised: enough to find a bug, nothing of the data."""
    frames = traceback.extract_tb(exc.__traceback__)
    return f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"


_INTERNAL_FRAME: Final = protocol.encode_frame(
    error_reply(protocol.INTERNAL, "internal error in vm-tokend; see its log"))


# -- connections ------------------------------------------------------------------------------


# After an accept() that failed for want of resources, wait this long before the next.
ACCEPT_PAUSE: Final = 0.1


# A connection is in one phase at a time; the timeouts of each are enforced by a sweeper
# (see Server._sweep) rather than by a cancel scope per phase: moving a deadline costs
# trio more than everything else the daemon does for a request.
IDLE, MID_FRAME, BUSY, SENDING = "idle", "mid-frame", "busy", "sending"
# How often the sweeper looks; timeouts fire up to this much late.
SWEEP_INTERVAL: Final = 0.5
# When every slot is taken, a newcomer waits this long for one to free before the
# connection idle the longest is closed for it: bursts of real clients are not evicted,
# a crowd of silent ones does not lock a real client out.
EVICTION_GRACE: Final = 0.2


class _Connection:
    __slots__ = ("phase", "scope", "since", "stream")

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.scope = trio.CancelScope()
        self.phase = IDLE
        self.since = trio.current_time()  # when the current phase began

    def enter(self, phase: str) -> None:
        self.phase = phase
        self.since = trio.current_time()


class Server:
    """Serves `handle` on a listening Unix socket until stop() is called."""

    def __init__(
        self,
        bound: BoundSocket,
        handle: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]],
        *,
        fast: Callable[[bytes], bytes | None] | None = None,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self._bound = bound
        self._listener = trio.socket.from_stdlib_socket(bound.sock)
        self._handle = handle
        self._fast = fast  # a reply frame straight from a request body, when it can
        self._slots = trio.Semaphore(max_connections)
        self._connections: set[_Connection] = set()
        self._stop = trio.Event()
        self._stopping = False
        self.refused_peers = 0
        self.accepted = 0

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    def stop(self) -> None:
        self._stop.set()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as handlers:
            async with trio.open_nursery() as acceptor:
                acceptor.start_soon(self._accept_loop, handlers)
                acceptor.start_soon(self._sweep)
                task_status.started()
                await self._stop.wait()
                acceptor.cancel_scope.cancel()
            # Stop accepting, drop idle connections, give in-flight requests a moment.
            self._stopping = True
            self._listener.close()
            self._bound.remove()
            for connection in list(self._connections):
                if connection.phase in (IDLE, MID_FRAME):
                    connection.scope.cancel()
            handlers.cancel_scope.deadline = trio.current_time() + DRAIN_TIMEOUT

    async def _accept_loop(self, handlers: trio.Nursery) -> None:
        while True:
            try:
                self._slots.acquire_nowait()
            except trio.WouldBlock:
                with trio.move_on_after(EVICTION_GRACE) as waiting:
                    await self._slots.acquire()
                if waiting.cancelled_caught:
                    self._make_room()
                    await self._slots.acquire()
            try:
                sock, _ = await self._listener.accept()
            except OSError as exc:
                # Out of descriptors or memory, a connection aborted before we took it:
                # none of them is a reason to stop serving everybody else.
                self._slots.release()
                if exc.errno not in (errno.ECONNABORTED, errno.EPROTO, errno.EINTR):
                    log.warning("cannot accept a connection: %s; pausing",
                                exc.strerror or type(exc).__name__)
                    await trio.sleep(ACCEPT_PAUSE)
                continue
            except BaseException:
                self._slots.release()
                raise
            handlers.start_soon(self._serve_connection, trio.SocketStream(sock))

    def _make_room(self) -> None:
        """Close the connection that has been idle the longest (never one mid-request)."""
        idle = [c for c in self._connections if c.phase == IDLE]
        if idle:
            oldest = min(idle, key=lambda c: c.since)
            log.debug("closing the longest idle connection to make room")
            oldest.scope.cancel()

    async def _sweep(self) -> None:
        while True:
            await trio.sleep(SWEEP_INTERVAL)
            now = trio.current_time()
            limits = {IDLE: IDLE_TIMEOUT, MID_FRAME: FRAME_TIMEOUT, SENDING: SEND_TIMEOUT}
            for connection in self._connections:
                limit = limits.get(connection.phase)
                if limit is not None and now - connection.since >= limit:
                    log.debug("dropped a connection that timed out (%s)", connection.phase)
                    connection.scope.cancel()

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        try:
            uid = peer_uid(stream.socket)
            if uid is None or uid not in (os.getuid(), 0):
                self.refused_peers += 1
                log.warning("refused a connection from uid %s", uid)
                return
            connection = _Connection(stream)
            self._connections.add(connection)
            self.accepted += 1
            try:
                with connection.scope:
                    await self._converse(connection)
            finally:
                self._connections.discard(connection)
        finally:
            self._slots.release()
            stream.socket.close()  # synchronous: no checkpoint, so no shield needed

    async def _converse(self, connection: _Connection) -> None:
        stream = connection.stream
        buffer = bytearray()
        while not self._stopping:
            if not buffer and not await self._receive(stream, buffer):
                return
            try:
                body = self._take_frame(buffer)
                if body is None:
                    connection.enter(MID_FRAME)
                    while body is None:
                        if not await self._receive(stream, buffer):
                            return
                        body = self._take_frame(buffer)
            except protocol.FrameTooLarge:
                log.debug("dropped a client that announced an oversize frame")
                return
            connection.phase = BUSY  # no timeout: the keeper bounds its own waits
            frame = await self._reply(body)
            connection.enter(SENDING)
            try:
                await stream.send_all(frame)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            connection.enter(IDLE)

    async def _reply(self, body: bytes) -> bytes:
        """The reply frame for one request frame. Whatever goes wrong, the client gets an
        answer that fits and the connection stays usable."""
        op: Any = None
        try:
            if self._fast is not None:
                frame = self._fast(body)
                if frame is not None:
                    return frame
            try:
                request = protocol.decode_body(body)
            except protocol.MalformedFrame as exc:
                return protocol.encode_frame(error_reply(protocol.BAD_REQUEST, str(exc)))
            op = request.get("op")
            return protocol.encode_frame(await self._handle(request))
        except Exception as exc:
            # One line, without the request (it may hold a password) and without the
            # exception's text (it may repeat part of it): the op and the kind of failure.
            log.error("internal error (%s at %s) answering a %s request", type(exc).__name__,
                      _where(exc), quote(op, 40) if isinstance(op, str) else "malformed")
            return _INTERNAL_FRAME

    @staticmethod
    def _take_frame(buffer: bytearray) -> bytes | None:
        """A whole frame's body from the front of `buffer`, None if incomplete;
        FrameTooLarge if the header announces too much."""
        if len(buffer) < protocol.HEADER_SIZE:
            return None
        length = protocol.frame_length(bytes(buffer[: protocol.HEADER_SIZE]))
        end = protocol.HEADER_SIZE + length
        if len(buffer) < end:
            return None
        body = bytes(buffer[protocol.HEADER_SIZE:end])
        del buffer[:end]
        return body

    @staticmethod
    async def _receive(stream: trio.SocketStream, buffer: bytearray) -> bool:
        """Append what arrives to `buffer`; False once the peer has gone."""
        try:
            data = await stream.receive_some(RECEIVE_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        buffer += data
        return bool(data)

