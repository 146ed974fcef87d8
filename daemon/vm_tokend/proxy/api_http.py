"""HTTP/1.1 towards the API: h11 client connections over trio, pooled per origin.

Why not httpx, which the daemon uses for its own calls: a proxy wants the opposite of a
friendly client. No default headers, no cookie jar, no decoding, no redirects, the client's
framing kept (Content-Length stays, chunked stays), raw bytes both ways; httpx had to be
argued out of each, and its layers cost the proxy about 40 % of its CPU per small request
and four copies of every body byte (measured with py-spy, bench row 4b/4c). h11 is the same
parser httpx uses underneath; this module only drives it.

    pool = ApiPool(origin, context, connect_timeout=10, read_timeout=300)
    api = await pool.checkout()                 # Refusal 503 proxy_busy after POOL_TIMEOUT
    try:
        await api.send(h11.Request(...))        # Host and framing set by the caller
        await api.send_body(chunks)             # if it has one
        response = await api.receive_head(method)  # h11.Response (1xx skipped)
        async for piece in api.body(): ...      # the raw body (never decoded)
    finally:
        await pool.checkin(api)  # back to the pool if the exchange ended cleanly, or closed

A Content-Length body of the API's is moved as it comes off the socket once h11 has read
the head: h11 decides the framing, and copying exactly that many bytes needs no parser;
h11's own reader would copy each byte three more times. The connection then starts its
next exchange with a fresh h11 state, as start_next_cycle would.
"""

from __future__ import annotations

import select
import ssl
from collections.abc import AsyncGenerator, Iterable
from contextlib import aclosing
from typing import Final
from urllib.parse import urlsplit

import h11
import trio

from .routes import Refusal

__all__ = ["ApiConnection", "ApiGone", "ApiPool"]

# One read from the API: a bulk download costs the event loop a pass per read.
RECEIVE_SIZE: Final = 1 << 20
MAX_HEAD: Final = 64 * 1024
# How long a request waits for a free connection to the API before a 503.
POOL_TIMEOUT: Final = 10.0
MAX_CONNECTIONS: Final = 100  # per API origin, as httpx's default
MAX_IDLE: Final = 20
# An idle connection older than this is closed rather than reused: servers close theirs
# after some seconds of silence (httpx's keepalive_expiry is 5 s; a guess that works).
IDLE_EXPIRY: Final = 5.0


class ApiGone(Exception):
    """The API's connection broke, or the API went silent past the read timeout."""

    def __init__(self, message: str, *, timeout: bool = False,
                 before_answer: bool = False) -> None:
        super().__init__(message)
        self.timeout = timeout
        # not a byte of an answer came: the API may never have seen the request (it had
        # closed an idle connection just as we reused it)
        self.before_answer = before_answer


class ApiConnection:
    """One connection to the API and h11's client state on it."""

    def __init__(self, stream: trio.abc.Stream, read_timeout: float) -> None:
        self.stream = stream
        self.read_timeout = read_timeout
        self.conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
        self.idle_since = trio.current_time()
        self.reusable = True  # False once anything went wrong: it is then closed
        self.reused = False  # it served an exchange before this one
        self._answered = False  # a byte of the current exchange's answer came
        self._raw_left: int | None = None  # bytes of a Content-Length body not yet read
        self._head: list[tuple[bytes, bytes]] = []  # the last answer's headers

    async def send(self, event: h11.Event) -> None:
        if isinstance(event, h11.Request):
            self._answered = False
        try:
            data = self.conn.send(event)
        except h11.LocalProtocolError as exc:  # a request h11 will not send as it is
            self.reusable = False
            raise ApiGone(f"cannot send {type(event).__name__}: {exc}") from exc
        if data:
            await self._send_all(data)

    async def _send_all(self, data: bytes) -> None:
        with trio.move_on_after(self.read_timeout) as sending:
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self.reusable = False
                raise ApiGone("the API closed the connection",
                              before_answer=not self._answered) from exc
        if sending.cancelled_caught:
            self.reusable = False
            raise ApiGone("the API stopped reading", timeout=True)

    async def send_body(self, chunks: AsyncGenerator[bytes, None] | bytes) -> bool:
        """Send the request's body; False when the API hung up meanwhile (it may have
        answered early, e.g. a 401 before reading a long body: read its answer next)."""
        try:
            if isinstance(chunks, bytes):
                await self.send(h11.Data(data=chunks))
            else:
                async with aclosing(chunks):  # closed at once if an early answer ends it
                    async for chunk in chunks:
                        await self.send(h11.Data(data=chunk))
            await self.send(h11.EndOfMessage())
        except ApiGone as exc:
            if exc.timeout:
                raise
            return False
        return True

    async def _receive(self, silence: float | None = None) -> bytes:
        """One read; one that waits past `silence` (default: read_timeout) ends with the
        API's silence as ApiGone(timeout). math.inf: the caller's deadline bounds it."""
        with trio.move_on_after(self.read_timeout if silence is None else silence) as waiting:
            try:
                data = await self.stream.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self.reusable = False
                raise ApiGone("the API's connection broke",
                              before_answer=not self._answered) from exc
        if waiting.cancelled_caught:
            self.reusable = False
            raise ApiGone("the API did not answer in time", timeout=True)
        self._answered = self._answered or bool(data)
        return bytes(data)

    async def _next_event(self, silence: float | None = None) -> h11.Event:
        while True:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                self.reusable = False
                if not self._answered:  # h11's word for a close before any answer
                    raise ApiGone("the API closed the connection without an answer",
                                  before_answer=True) from exc
                raise ApiGone(f"the API's answer is not HTTP/1.1: {exc}") from exc
            if event is h11.NEED_DATA:
                self.conn.receive_data(await self._receive(silence))
                continue
            if event is h11.PAUSED:  # cannot be: we never send while they do
                self.reusable = False
                raise ApiGone("the API's connection is out of step")
            assert isinstance(event, h11.Event)
            return event

    async def receive_head(self, method: bytes, *, silence: float | None = None
                           ) -> h11.Response:
        """The API's answer's head; 1xx answers (100 Continue, 103) are skipped. Each read
        may wait `silence` (default: read_timeout; math.inf: as long as the caller's
        cancel scope lets it, which then bounds a stream of 1xx answers too)."""
        while True:
            event = await self._next_event(silence)
            if isinstance(event, h11.Response):
                break
            if isinstance(event, h11.ConnectionClosed):
                self.reusable = False
                raise ApiGone("the API closed the connection without an answer",
                              before_answer=not self._answered)
            if not isinstance(event, h11.InformationalResponse):
                self.reusable = False
                raise ApiGone(f"unexpected {type(event).__name__} from the API")
        self._head = list(event.headers)
        length = _content_length(event.headers)
        # RFC 9112 6.3: an answer to HEAD, and a 204 or 304, has no body whatever its
        # Content-Length says (1xx are skipped above; CONNECT is never sent)
        if length is not None and method != b"HEAD" and event.status_code not in (204, 304):
            self._raw_left = length  # h11 framed it: exactly `length` bytes follow
        return event

    def take_buffered(self) -> tuple[bytes, bool]:
        """What of a Content-Length body already came with the head, taken without
        waiting, and whether that is all of it: (b"", False) when nothing is at hand."""
        if self._raw_left is None:
            return b"", False
        buffered, _ = self.conn.trailing_data
        if len(buffered) != self._raw_left:  # partial, or more than it said: the slow way
            return b"", False
        self._finish_raw(keep_alive=self._keeps_alive())
        return bytes(buffered), True

    async def body(self) -> AsyncGenerator[bytes, None]:
        """The body of the answer whose head receive_head() gave, raw; then the
        connection is ready for its next exchange (or not reusable)."""
        if self._raw_left is not None:
            async for piece in self._raw_body():
                yield piece
            return
        while True:
            event = await self._next_event()
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                self.reusable = False
                raise ApiGone(f"the API's answer broke off ({type(event).__name__})")
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        else:
            self.reusable = False

    async def _raw_body(self) -> AsyncGenerator[bytes, None]:
        assert self._raw_left is not None
        buffered, closed = self.conn.trailing_data
        left = self._raw_left
        keep_alive = self._keeps_alive()
        self.reusable = False  # until the whole body went through
        if buffered:
            piece = buffered[:left]
            left -= len(piece)
            extra = len(buffered) - len(piece)
            yield bytes(piece)
            if extra:  # the API sent more than it said: never reuse this connection
                keep_alive = False
        while left > 0:
            if closed:
                raise ApiGone("the API's answer broke off")
            data = await self._receive()
            if not data:
                raise ApiGone("the API's answer broke off")
            if len(data) > left:
                data, keep_alive = data[:left], False
            left -= len(data)
            yield data
        self._finish_raw(keep_alive)

    def _finish_raw(self, keep_alive: bool) -> None:
        self._raw_left = None
        if keep_alive and self.conn.our_state is h11.DONE:
            # what start_next_cycle() would leave: a fresh exchange on this connection
            self.conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
            self.reusable = True
        else:
            self.reusable = False

    def _keeps_alive(self) -> bool:
        """h11's rule for the answer just read: HTTP/1.1 and no `Connection: close` (our
        requests never ask to close)."""
        return self.conn.their_http_version == b"1.1" and not any(
            name == b"connection" and b"close" in [t.strip() for t in value.lower().split(b",")]
            for name, value in self._head)

    def stale(self) -> bool:
        """Whether an idle connection should not be reused: too old, or the API already
        closed it (it is then readable: an EOF or stray bytes)."""
        if trio.current_time() - self.idle_since > IDLE_EXPIRY:
            return True
        sock = getattr(self.stream, "socket", None) or \
            getattr(getattr(self.stream, "transport_stream", None), "socket", None)
        if sock is None:
            return False
        try:
            readable, _, _ = select.select([sock.fileno()], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self.stream.aclose()


def _content_length(headers: Iterable[tuple[bytes, bytes]]) -> int | None:
    framing = {name: value for name, value in headers
               if name in (b"content-length", b"transfer-encoding")}
    if b"transfer-encoding" in framing or b"content-length" not in framing:
        return None
    return int(framing[b"content-length"])  # h11 checked it is one number


class ApiPool:
    """Connections to one API origin: at most MAX_CONNECTIONS, up to MAX_IDLE kept."""

    def __init__(self, origin: str, context: ssl.SSLContext | None, *,
                 connect_timeout: float, read_timeout: float) -> None:
        parts = urlsplit(origin)
        self.origin = origin
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.authority = parts.netloc.encode("ascii")  # the Host header the API gets
        self.tls = context if parts.scheme == "https" else None
        if parts.scheme == "https" and context is None:
            self.tls = ssl.create_default_context()
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._slots = trio.Semaphore(MAX_CONNECTIONS)
        self._idle: list[ApiConnection] = []

    async def checkout(self) -> ApiConnection:
        """A connection for one exchange: an idle one, or a new one."""
        with trio.move_on_after(POOL_TIMEOUT) as waiting:
            await self._slots.acquire()
        if waiting.cancelled_caught:
            raise Refusal(503, "proxy_busy", "every connection to the API is in use; retry")
        try:
            return await self._checkout()
        except BaseException:
            self._slots.release()
            raise

    async def checkin(self, api: ApiConnection) -> None:
        """Back to the pool if its exchange ended cleanly; closed otherwise."""
        try:
            # bytes already past the answer (a body after a HEAD, or more than it said)
            # would be read as the next answer: such a connection is closed
            if api.reusable and api.conn.our_state is h11.IDLE \
                    and not api.conn.trailing_data[0] and len(self._idle) < MAX_IDLE:
                api.idle_since = trio.current_time()
                api.reused = True
                self._idle.append(api)
            else:
                await api.aclose()
        finally:
            self._slots.release()

    async def _checkout(self) -> ApiConnection:
        while self._idle:
            api = self._idle.pop()  # the most recent: the least likely to be closed
            if not api.stale():
                return api
            await api.aclose()
        return await self._connect()

    async def _connect(self) -> ApiConnection:
        tcp: trio.SocketStream | None = None
        try:
            with trio.fail_after(self.connect_timeout):
                tcp = await trio.open_tcp_stream(self.host, self.port)
                stream: trio.abc.Stream = tcp
                if self.tls is not None:
                    secured = trio.SSLStream(tcp, self.tls, server_hostname=self.host,
                                             https_compatible=True)
                    await secured.do_handshake()
                    stream = secured
        except trio.TooSlowError:
            await _close(tcp)
            raise Refusal(504, "upstream_timeout",
                          f"the API did not accept a connection within "
                          f"{self.connect_timeout:g} s") from None
        except (OSError, trio.BrokenResourceError) as exc:
            await _close(tcp)  # a refused handshake's socket: closed now, not by the GC
            raise Refusal(502, "upstream_unavailable",
                          f"cannot reach the API: {_reason(exc)}") from None
        except BaseException:
            await _close(tcp)
            raise
        return ApiConnection(stream, self.read_timeout)

    async def aclose(self) -> None:
        while self._idle:
            await self._idle.pop().aclose()


async def _close(tcp: trio.SocketStream | None) -> None:
    if tcp is not None:
        await trio.aclose_forcefully(tcp)


def _reason(exc: BaseException) -> str:
    cause = exc.__cause__ or exc
    if isinstance(cause, ssl.SSLCertVerificationError):
        return f"its certificate is not trusted ({cause.verify_message})"
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    return type(cause).__name__
