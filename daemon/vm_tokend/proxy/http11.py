"""One HTTP/1.1 connection from a client, spoken with h11 over a trio stream.

The shape of h11's own trio server example: a keep-alive loop that asks h11 for the next
event, with a deadline per read; `100 Continue` when the client waits for it; answers the
proxy makes itself (`answer`) always carry `X-VM-Token-Error` and a JSON body, so a client
never mistakes them for the API's.
"""

from __future__ import annotations

import json
import select
import socket
from typing import Final

import h11
import trio

__all__ = ["ClientGone", "Conversation", "ERROR_HEADER"]

# What one receive may take from the client; h11 buffers at most this much of a header.
RECEIVE_SIZE: Final = 1024 * 1024
# The largest request head (request line + headers) a client may send.
MAX_HEAD: Final = 64 * 1024
ERROR_HEADER: Final = b"x-vm-token-error"
# A request's head (request line and headers) must be whole this long after its first byte.
HEAD_TIMEOUT: Final = 10.0
# The send buffer asked for once a body streams to a client. The default (208 KiB on
# Linux) makes every 1 MiB read from the API four or five passes through the event loop;
# 4 MiB made a bare relay twice as fast here. The kernel grants at most net.core.wmem_max.
STREAM_SNDBUF: Final = 4 * 1024 * 1024


class ClientGone(Exception):
    """The client closed the connection, broke the protocol, or stalled past its deadline."""


class Conversation:
    """h11's state for one client connection, and the stream under it."""

    def __init__(self, stream: trio.abc.Stream, *, idle_timeout: float,
                 read_timeout: float) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self.idle_timeout = idle_timeout  # between requests
        self.read_timeout = read_timeout  # within a request (its body)
        self.method = b""  # of the request being answered
        self._sndbuf_set = False

    async def next_event(self, *, between_requests: bool = False) -> h11.Event:
        """The next event from the client; ClientGone if it closes, stalls or breaks the
        protocol (after answering 400 when that is still possible)."""
        timeout = self.idle_timeout if between_requests else self.read_timeout
        deadline = trio.current_time() + timeout
        head_started = False
        while True:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                await self._refuse_malformed(exc)
                raise ClientGone("malformed request") from exc
            if event is h11.PAUSED:  # only while we still owe an answer: never here
                raise ClientGone("the connection is paused")
            if event is not h11.NEED_DATA:
                assert isinstance(event, h11.Event)
                if isinstance(event, h11.Request):
                    self.method = event.method
                return event
            with trio.move_on_at(deadline) as waited:
                try:
                    data = await self.stream.receive_some(RECEIVE_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    raise ClientGone("connection lost") from exc
            if waited.cancelled_caught:
                raise ClientGone("client stalled")
            if between_requests and data and not head_started:
                # the head has begun: it must be whole within HEAD_TIMEOUT (a byte now and
                # then must not hold a connection), however long the client was idle before
                head_started = True
                deadline = trio.current_time() + HEAD_TIMEOUT
            elif not between_requests:
                deadline = trio.current_time() + timeout  # a body: per read, not overall
            self.conn.receive_data(bytes(data))  # b"" is the end of the input

    async def send(self, *events: h11.Event) -> None:
        """Send events in one write (a head and a short body leave together); ClientGone
        if the client cannot take them."""
        pieces: list[bytes] = []
        for event in events:
            try:
                pieces.append(self.conn.send(event) or b"")
            except h11.LocalProtocolError as exc:
                raise ClientGone(f"cannot send {type(event).__name__}: {exc}") from exc
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        if data:
            # a client that stops reading must not hold the API's connection forever
            with trio.move_on_after(self.read_timeout) as sending:
                try:
                    await self.stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    raise ClientGone("connection lost") from exc
            if sending.cancelled_caught:
                raise ClientGone("client stopped reading")

    def gone(self) -> bool:
        """Whether the client has left, asked without waiting (while it waits for an
        answer). On TCP an end of input counts, as nginx takes it (a client that shuts
        down its sending side and waits, as `nc -N` does, loses an answer slower than
        HANGUP_CHECK); on a Unix socket only a hang-up (POLLHUP), so such a client is
        served there."""
        sock = getattr(self.stream, "socket", None)
        if not isinstance(sock, trio.socket.SocketType):
            return False  # a stream without a socket (tests): never told
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLRDHUP)
        events = poller.poll(0)
        flags = events[0][1] if events else 0
        if flags & (select.POLLHUP | select.POLLERR):  # closed, or shut down both ways
            return True
        return sock.family != socket.AF_UNIX and bool(flags & select.POLLRDHUP)

    def streaming(self) -> None:
        """A long body is about to go to the client: a send buffer for it (once)."""
        if self._sndbuf_set:
            return
        self._sndbuf_set = True
        sock = getattr(self.stream, "socket", None)
        if isinstance(sock, trio.socket.SocketType):
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, STREAM_SNDBUF)
            except OSError:
                pass  # the default buffer works, only slower

    async def continue_if_asked(self) -> None:
        """`100 Continue` for a client that waits for it before sending its body."""
        if self.conn.they_are_waiting_for_100_continue:
            await self.send(h11.InformationalResponse(status_code=100, headers=[]))

    async def answer(self, status: int, code: str, message: str,
                     headers: list[tuple[bytes, bytes]] | None = None) -> None:
        """An answer of the proxy's own: `X-VM-Token-Error: code`, `{"error", "message"}`
        (its head only, to a HEAD)."""
        body = json.dumps({"error": code, "message": message}).encode() + b"\n"
        head = h11.Response(status_code=status, headers=[
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (ERROR_HEADER, code.encode()),
            (b"cache-control", b"no-store"),
            *(headers or []),
        ])
        if self.method == b"HEAD":
            await self.send(head, h11.EndOfMessage())
        else:
            await self.send(head, h11.Data(data=body), h11.EndOfMessage())

    async def _refuse_malformed(self, exc: h11.RemoteProtocolError) -> None:
        if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        status = exc.error_status_hint if 400 <= exc.error_status_hint < 500 else 400
        try:
            await self.answer(status, "bad_request", f"not a request this proxy can read: {exc}",
                              headers=[(b"connection", b"close")])
        except ClientGone:
            pass

    def request_read(self) -> bool:
        """Whether the client's request has been read whole, taking only what h11 holds
        already (a request without a body ends with its head)."""
        if self.conn.their_state is h11.SEND_BODY:
            try:
                if not isinstance(self.conn.next_event(), h11.EndOfMessage):
                    return False  # body bytes, or none yet: they stay unread
            except h11.RemoteProtocolError:
                return False
        return self.conn.their_state is h11.DONE

    def ready_for_next(self) -> bool:
        """After a whole exchange: whether the connection may carry another request."""
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
            return True
        return False

