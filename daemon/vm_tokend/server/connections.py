"""The server: peer check, framing, limits, and each request handed to the dispatcher.

It serves any trio listener — the daemon's Unix socket (`listener`), or memory streams in
tests. Each connection is one task. It checks the peer's uid (SO_PEERCRED), then reads frames
(4-byte big-endian length + msgpack map), answers each in turn, and is closed when it sits
idle too long, stalls half-way through a frame, does not read its reply, or announces an
oversize frame. At most MAX_CONNECTIONS are open at once; past that, a newcomer waits a
moment for a slot and then the connection idle the longest makes room, so a crowd of
silent connections cannot lock a real client out. A client that hangs up while its
request waits ends the request and frees its slot at once; requests that wait on a person
(login_wait) have a cap of their own, so that they never fill every slot.
"""

from __future__ import annotations

import logging
import math
import os
import select
import traceback
import types
from collections.abc import Awaitable, Callable, Coroutine, Generator
from pathlib import Path
from typing import Any, Final, TypeVar, cast

import trio

from vm_token import protocol

from ..peers import Peer, PeerRule, socket_peer
from ..refusals import RefusalLog
from ..text import quote

__all__ = ["Server", "error_reply"]

log = logging.getLogger(__name__)

T = TypeVar("T")
Stream = trio.abc.Stream

# A client sends a whole frame at once; one that stops half-way is broken or hostile.
FRAME_TIMEOUT: Final = 10.0
# Clients keep a connection open between requests; five minutes idle is plenty.
IDLE_TIMEOUT: Final = 300.0
# A client that does not read its reply for this long is dropped.
SEND_TIMEOUT: Final = 10.0
MAX_CONNECTIONS: Final = 512
# In-flight requests get this long to finish at shutdown.
DRAIN_TIMEOUT: Final = 2.0
RECEIVE_SIZE: Final = 64 * 1024


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

# Each connection's timeouts are the deadline of its cancel scope, moved as it goes from
# phase to phase; nothing polls. Moving a deadline costs trio more than everything else
# the daemon does for a request it answers at once, so the idle deadline is set this
# share of IDLE_TIMEOUT further than needed and moved only once that slack is used up:
# a busy connection moves it once in half a minute, an idle one is closed between
# IDLE_TIMEOUT and IDLE_TIMEOUT + 10 % after its last request. A guess, and a generous one.
IDLE_SLACK: Final = 0.1
IDLE, MID_FRAME, BUSY, SENDING = "idle", "mid-frame", "busy", "sending"
# When every slot is taken, a newcomer waits this long for one to free before the
# connection idle the longest is closed for it: bursts of real clients are not evicted,
# a crowd of silent ones does not lock a real client out.
EVICTION_GRACE: Final = 0.2
# Requests that may wait long, on a person (login_wait: until a login ends), and how many
# may wait at once: beyond it they are refused at once, so that a crowd of them never
# leaves a `get` without room. One person logs in once at a time; a guess, and generous.
LONG_OPS: Final = frozenset({protocol.LOGIN_WAIT})
MAX_LONG_WAITS: Final = 32
# While a request is in progress, what the client sends meanwhile (pipelined requests) is
# read and kept, up to this much; beyond it the rest waits in the kernel (and a hang-up
# is noticed only once the request is done).
PIPELINE_ROOM: Final = protocol.HEADER_SIZE + protocol.MAX_FRAME


def _hung_up(sock: trio.socket.SocketType) -> bool:
    """After end-of-file: whether the peer is gone, rather than done sending (a client
    may shut down its writing side and still read its reply). A Unix stream socket whose
    peer closed, or shut down both ways, reports POLLHUP."""
    poller = select.poll()
    poller.register(sock.fileno(), 0)  # POLLHUP and POLLERR are always reported
    return any(events & (select.POLLHUP | select.POLLERR) for _, events in poller.poll(0))


class _Watcher:
    """The task that watches a connection while its request waits (see _watch)."""

    __slots__ = ("done", "scope")

    def __init__(self) -> None:
        self.scope = trio.CancelScope()  # cancelled once the request is answered
        self.done = trio.Event()


@types.coroutine
def _on_first_wait(coro: Coroutine[Any, Any, T], waiting: Callable[[], None]
                   ) -> Generator[Any, Any, T]:
    """`await coro`, calling `waiting()` the first time it yields to trio, that is when it
    is about to wait rather than finish at once.

    Most requests are answered without ever waiting, and watching the connection costs
    a task and two epoll calls — a `hello` took 0.35 ms instead of 0.1 with a watcher
    each: only a request that waits gets one. The loop is what `yield from` does, but for the
    first step, which is ours to take."""
    try:
        trap = coro.send(None)
    except StopIteration as finished:
        return cast(T, finished.value)
    waiting()
    while True:
        try:
            value = yield trap
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:  # Cancelled, say: the coroutine handles it
            try:
                trap = coro.throw(exc)
            except StopIteration as finished:
                return cast(T, finished.value)
        else:
            try:
                trap = coro.send(value)
            except StopIteration as finished:
                return cast(T, finished.value)


class _Connection:
    __slots__ = ("buffer", "peer", "phase", "scope", "since", "sock", "stream")

    def __init__(self, stream: trio.abc.Stream, peer: Peer | None) -> None:
        self.stream = stream
        self.peer = peer
        # a Unix socket's: replies are written to it at once, and a hang-up is told from
        # a client done sending by POLLHUP (other streams have neither)
        self.sock = stream.socket if isinstance(stream, trio.SocketStream) else None
        self.scope = trio.CancelScope()  # its deadline is the phase's timeout
        self.phase = IDLE
        self.since = trio.current_time()  # when the current phase began
        self.buffer = bytearray()  # received, not yet taken as a frame


class Server:
    """Serves `handle` on `listener` until stop() is called; `on_close` runs once the
    listener is closed (it removes the socket's file). Connections whose `peer` the
    `rule` does not admit (by default: neither ours nor root's) are closed unanswered,
    and logged at most once a minute."""

    def __init__(
        self,
        listener: trio.abc.Listener[Stream],
        handle: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]],
        *,
        fast: Callable[[bytes], bytes | None] | None = None,
        peer: Callable[[Stream], Peer | None] = socket_peer,
        rule: PeerRule | None = None,
        name: str = "",
        on_close: Callable[[], None] | None = None,
        max_connections: int = MAX_CONNECTIONS,
        max_long_waits: int = MAX_LONG_WAITS,
        frame_timeout: float = FRAME_TIMEOUT,
        idle_timeout: float = IDLE_TIMEOUT,
        send_timeout: float = SEND_TIMEOUT,
        eviction_grace: float = EVICTION_GRACE,
        drain_timeout: float = DRAIN_TIMEOUT,
        accept_pause: float = ACCEPT_PAUSE,
    ) -> None:
        self._listener = listener
        self._peer = peer
        self.rule = rule or PeerRule(root=True)  # replaced on a reload
        self._refusals = RefusalLog(where=name)
        self._on_close = on_close
        self._handle = handle
        self._fast = fast  # a reply frame straight from a request body, when it can
        self._slots = trio.Semaphore(max_connections)
        self._max_long_waits = max_long_waits
        self._long_waits = 0
        self._frame_timeout = frame_timeout
        self._idle_timeout = idle_timeout
        self._idle_slack = idle_timeout * IDLE_SLACK
        self._send_timeout = send_timeout
        self._eviction_grace = eviction_grace
        self._drain_timeout = drain_timeout
        self._accept_pause = accept_pause
        self._connections: set[_Connection] = set()
        self._handlers: trio.Nursery | None = None
        self._stop = trio.Event()
        self._stopping = False
        self.refused_peers = 0
        self.accepted = 0

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    def stop(self) -> None:
        self._stop.set()

    def set_rule(self, rule: PeerRule) -> None:
        """Admit by `rule` from now on, and close the open connections it does not admit:
        a uid no longer allowed keeps no connection it had (a reload)."""
        self.rule = rule
        for connection in list(self._connections):
            if not rule.admits(connection.stream, connection.peer):
                connection.scope.cancel()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as handlers:
            self._handlers = handlers
            async with trio.open_nursery() as acceptor:
                acceptor.start_soon(self._accept_loop, handlers)
                task_status.started()
                await self._stop.wait()
                acceptor.cancel_scope.cancel()
            # Stop accepting, drop idle connections, give in-flight requests a moment.
            self._stopping = True
            try:
                with trio.CancelScope(shield=True):  # closed, and its file gone, whatever
                    await self._listener.aclose()
            finally:
                if self._on_close is not None:
                    self._on_close()
            for connection in list(self._connections):
                if connection.phase in (IDLE, MID_FRAME):
                    connection.scope.cancel()
            handlers.cancel_scope.deadline = trio.current_time() + self._drain_timeout

    async def _accept_loop(self, handlers: trio.Nursery) -> None:
        while True:
            try:
                self._slots.acquire_nowait()
            except trio.WouldBlock:
                with trio.move_on_after(self._eviction_grace) as waiting:
                    await self._slots.acquire()
                if waiting.cancelled_caught:
                    self._make_room()
                    await self._slots.acquire()
            try:
                stream = await self._listener.accept()
            except OSError as exc:
                # Out of descriptors or memory (trio's listener itself passes over a
                # connection aborted before we took it): not a reason to stop serving
                # everybody else, nor to spin.
                self._slots.release()
                log.warning("cannot accept a connection: %s; pausing",
                            exc.strerror or type(exc).__name__)
                await trio.sleep(self._accept_pause)
                continue
            except BaseException:
                self._slots.release()
                raise
            handlers.start_soon(self._serve_connection, stream)

    def _make_room(self) -> None:
        """Close the connection that has been idle the longest (never one mid-request)."""
        idle = [c for c in self._connections if c.phase == IDLE]
        if idle:
            oldest = min(idle, key=lambda c: c.since)
            log.debug("closing the longest idle connection to make room")
            oldest.scope.cancel()

    async def _serve_connection(self, stream: Stream) -> None:
        counting = False  # whether this task writes the refusals' count, once closed
        try:
            peer = self._peer(stream)
            if self.rule.admits(stream, peer):
                await self._serve_admitted(stream, peer)
            else:
                self.refused_peers += 1
                counting = self._refusals.refused(None if peer is None else peer.uid)
        finally:
            self._slots.release()
            if isinstance(stream, trio.SocketStream):
                stream.socket.close()  # synchronous: no checkpoint, so no shield needed
            else:
                await trio.aclose_forcefully(stream)
        if counting:
            await self._refusals.write_count(self._stop)

    async def _serve_admitted(self, stream: Stream, peer: Peer | None) -> None:
        connection = _Connection(stream, peer)
        self._connections.add(connection)
        self.accepted += 1
        try:
            with connection.scope:
                await self._converse(connection)
            if connection.scope.cancelled_caught and not self._stopping:
                log.debug("dropped a connection that timed out, hung up or made room "
                          "(%s)", connection.phase)
        finally:
            self._connections.discard(connection)

    def _idle(self, connection: _Connection) -> None:
        """Enter the idle phase: the deadline IDLE_TIMEOUT from now, give or take the slack
        (see IDLE_SLACK)."""
        connection.phase = IDLE
        now = connection.since = trio.current_time()
        deadline = connection.scope.deadline
        if not now + self._idle_timeout <= deadline <= now + self._idle_timeout \
                + self._idle_slack:
            connection.scope.deadline = now + self._idle_timeout + self._idle_slack

    async def _converse(self, connection: _Connection) -> None:
        stream, buffer = connection.stream, connection.buffer
        while not self._stopping:
            self._idle(connection)
            if not buffer and not await _receive(stream, buffer):
                return
            try:
                body = _take_frame(buffer)
                if body is None:
                    # A frame must be whole within FRAME_TIMEOUT of its first byte.
                    connection.phase = MID_FRAME
                    connection.scope.deadline = trio.current_time() + self._frame_timeout
                    while body is None:
                        if not await _receive(stream, buffer):
                            return
                        body = _take_frame(buffer)
            except protocol.FrameTooLarge:
                log.debug("dropped a client that announced an oversize frame")
                return
            connection.phase = BUSY
            frame = self._fast_reply(body)
            if frame is None:
                frame = await self._full_reply(connection, body)
            if not await _send(connection, frame, self._send_timeout):
                return

    def _fast_reply(self, body: bytes) -> bytes | None:
        if self._fast is None:
            return None
        try:
            return self._fast(body)
        except Exception as exc:
            log.error("internal error (%s at %s) answering a request on the fast path",
                      type(exc).__name__, _where(exc))
            return _INTERNAL_FRAME

    async def _full_reply(self, connection: _Connection, body: bytes) -> bytes:
        """The reply frame for one request the fast path did not answer. If it has to
        wait, a client that hangs up meanwhile ends it (see _watch); a crowd of long waits
        is refused rather than let in (see LONG_OPS)."""
        try:
            request = protocol.decode_body(body)
        except protocol.MalformedFrame as exc:
            return protocol.encode_frame(error_reply(protocol.BAD_REQUEST, str(exc)))
        op = request.get("op")
        long = isinstance(op, str) and op in LONG_OPS  # any msgpack value may come
        if long:
            if self._long_waits >= self._max_long_waits:
                return protocol.encode_frame(error_reply(
                    protocol.LOGIN_FAILED,
                    f"too many clients are waiting for logins (at most "
                    f"{self._max_long_waits} at once); close some and try again"))
            self._long_waits += 1
        # No deadline while busy: the keeper bounds its own waits, and a login_wait lasts
        # as long as the person takes.
        connection.scope.deadline = math.inf
        watcher: _Watcher | None = None

        def waiting() -> None:
            nonlocal watcher
            assert self._handlers is not None
            watcher = _Watcher()
            self._handlers.start_soon(_watch, connection, watcher)

        try:
            frame = await _on_first_wait(self._answer(request), waiting)
        finally:
            if long:
                self._long_waits -= 1
            if watcher is not None:
                watcher.scope.cancel()
        if watcher is not None:
            await watcher.done.wait()  # it no longer reads from the connection
        return frame

    async def _answer(self, request: dict[str, Any]) -> bytes:
        """The reply frame to `request`. Whatever goes wrong, the client gets an answer
        that fits and the connection stays usable."""
        try:
            return protocol.encode_frame(await self._handle(request))
        except Exception as exc:
            # One line, without the request (it may hold a password) and without the
            # exception's text (it may repeat part of it): the op and the kind of failure.
            op = request.get("op")
            log.error("internal error (%s at %s) answering a %s request", type(exc).__name__,
                      _where(exc), quote(op, 40) if isinstance(op, str) else "malformed")
            return _INTERNAL_FRAME


async def _send(connection: _Connection, frame: bytes, patience: float) -> bool:
    """Send a reply; False if the client is gone. A reply (64 KiB at most) almost always
    fits the socket's buffer and is written at once, with no deadline to set; only a
    client that does not read gets `patience` (SEND_TIMEOUT) to take the rest."""
    connection.phase = SENDING
    sent = 0
    if connection.sock is not None:
        try:
            sent = os.write(connection.sock.fileno(), frame)
        except BlockingIOError:
            pass
        except OSError:  # EPIPE, ECONNRESET: gone
            return False
    if sent == len(frame):
        return True
    connection.since = trio.current_time()
    connection.scope.deadline = connection.since + patience
    try:
        await connection.stream.send_all(memoryview(frame)[sent:])
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return False
    return True


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


async def _receive(stream: Stream, buffer: bytearray) -> bool:
    """Append what arrives to `buffer`; False once the peer has gone."""
    try:
        data = await stream.receive_some(RECEIVE_SIZE)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return False
    buffer += data
    return bool(data)


async def _watch(connection: _Connection, watcher: _Watcher) -> None:
    """While a request waits: keep what the client sends meanwhile (pipelined
    requests), and end the connection — the request with it — if the client hangs up.
    Its slot is free at once, whatever the request was waiting for."""
    stream, buffer = connection.stream, connection.buffer
    try:
        with watcher.scope:
            while len(buffer) < PIPELINE_ROOM:
                try:
                    data = await stream.receive_some(RECEIVE_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = None  # reset, or closed by the connection's own end
                if data:
                    buffer += data
                    continue
                if data is None or (connection.sock is not None
                                    and _hung_up(connection.sock)):
                    log.debug("a client hung up while its request was in progress")
                    connection.scope.cancel()
                return  # or only done sending: it still reads its reply
    finally:
        watcher.done.set()
