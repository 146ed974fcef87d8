"""AsyncClient: the Client's operations for async code, under trio or asyncio.

It keeps a small pool of connections to the daemon (the protocol answers one request at
a time per connection) and lends one to each request, so any number of tasks can share
one AsyncClient while the daemon sees at most `max_connections` connections from it.
Which library runs the event loop is found out at each call; trio is imported only if it
is the one running.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from os import PathLike
from types import TracebackType
from typing import Any, Protocol

from . import _wire, protocol
from ._wire import DEFAULT_TIMEOUT
from .client import (
    VideoManager,
    get_fields,
    invalidate_fields,
    next_page,
    resolve_profile,
    videomanagers_from_reply,
)
from .errors import DaemonNotRunning, Error, ProtocolError
from .token import Token

__all__ = ["AsyncClient"]

DEFAULT_MAX_CONNECTIONS = 4


class _Stream(Protocol):
    async def send_all(self, data: bytes) -> None: ...
    async def receive_exactly(self, size: int) -> bytes: ...
    def close(self) -> None: ...
    def socket(self) -> Any: ...  # what _wire.check_peer asks: anything with getsockopt


class _Semaphore(Protocol):
    async def acquire(self) -> Any: ...
    def release(self) -> None: ...


class _Library(Protocol):
    name: str

    def semaphore(self, value: int) -> _Semaphore: ...
    def timeout(self, seconds: float) -> Any: ...  # an async context manager
    async def connect(self, path: str) -> _Stream: ...


# -- asyncio --------------------------------------------------------------------------------


class _AsyncioStream:
    def __init__(self, reader: Any, writer: Any) -> None:
        self._reader, self._writer = reader, writer

    async def send_all(self, data: bytes) -> None:
        self._writer.write(data)
        await self._writer.drain()

    async def receive_exactly(self, size: int) -> bytes:
        import asyncio

        try:
            data: bytes = await self._reader.readexactly(size)
        except asyncio.IncompleteReadError:
            raise _wire.Closed from None
        return data

    def close(self) -> None:
        self._writer.close()  # the transport closes at once; nothing left to wait for

    def socket(self) -> Any:
        return self._writer.get_extra_info("socket")


class _Asyncio:
    name = "asyncio"

    def semaphore(self, value: int) -> _Semaphore:
        import asyncio

        return asyncio.Semaphore(value)

    def timeout(self, seconds: float) -> Any:
        import asyncio

        return asyncio.timeout(seconds)

    async def connect(self, path: str) -> _Stream:
        import asyncio

        reader, writer = await asyncio.open_unix_connection(path)
        return _AsyncioStream(reader, writer)


# -- trio -----------------------------------------------------------------------------------


class _TrioStream:
    def __init__(self, stream: Any) -> None:
        self._stream = stream

    async def send_all(self, data: bytes) -> None:
        import trio

        try:
            await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise _wire.Closed from exc

    async def receive_exactly(self, size: int) -> bytes:
        import trio

        chunks = bytearray()
        while len(chunks) < size:
            try:
                chunk = await self._stream.receive_some(size - len(chunks))
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise _wire.Closed from exc
            if not chunk:
                raise _wire.Closed
            chunks += chunk
        return bytes(chunks)

    def close(self) -> None:
        self._stream.socket.close()

    def socket(self) -> Any:
        return self._stream.socket


class _Trio:
    name = "trio"

    def semaphore(self, value: int) -> _Semaphore:
        import trio

        return trio.Semaphore(value)

    @asynccontextmanager
    async def timeout(self, seconds: float) -> AsyncIterator[None]:
        import trio

        try:
            with trio.fail_after(seconds):
                yield
        except trio.TooSlowError:
            raise TimeoutError from None

    async def connect(self, path: str) -> _Stream:
        import trio

        return _TrioStream(await trio.open_unix_socket(path))


def _running_library() -> _Library:
    trio = sys.modules.get("trio")
    if trio is not None:
        try:
            trio.lowlevel.current_task()
        except RuntimeError:
            pass
        else:
            return _Trio()
    import asyncio

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        raise RuntimeError("vm_token.AsyncClient needs a running trio or asyncio loop") from None
    return _Asyncio()


class _Lease:
    __slots__ = ("healthy", "reused", "stream")

    def __init__(self, stream: _Stream, *, reused: bool) -> None:
        self.stream = stream
        self.reused = reused
        # Set once the whole reply came back: only then can the stream be reused. After an
        # error or a cancellation its reply may still arrive, and would answer the next
        # request (the protocol has no request ids): such a stream is closed.
        self.healthy = False


# -- the client -----------------------------------------------------------------------------


class AsyncClient:
    """Connections to vm-tokend for async code; share one between any number of tasks.

        async with vm_token.AsyncClient() as vt:
            token = await vt.get_token("Marketing", min_ttl=60)

    Each call takes at most `timeout` seconds, waiting for a free connection included. A
    client belongs to the event loop that first used it. `profile` as for Client: the
    daemon's profile every request is for (default: `$VM_TOKEN_PROFILE`, else the daemon's);
    `daemon_uid` too: a daemon uid to trust besides ours and root (`$VM_TOKEN_DAEMON_UID`).
    """

    def __init__(
        self,
        socket: str | PathLike[str] | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        profile: str | None = None,
        daemon_uid: int | None = None,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.socket_path = str(socket) if socket is not None else protocol.default_socket_path()
        self.timeout = timeout
        self.profile = resolve_profile(profile)
        self.daemon_uid = _wire.resolve_daemon_uid(daemon_uid)
        self.max_connections = max_connections
        self._library: _Library | None = None
        self._slots: _Semaphore | None = None
        self._idle: list[_Stream] = []
        self._closed = False

    # -- operations (the same as Client's) ------------------------------------------------

    async def hello(self) -> dict[str, Any]:
        return await self.request(protocol.HELLO)

    async def get_token(
        self, videomanager: str | int | None = None, *, min_ttl: float = 0
    ) -> Token:
        fields = get_fields(videomanager, min_ttl)
        return Token.from_reply(await self.request(protocol.GET, **fields))

    async def list_videomanagers(self) -> list[VideoManager]:
        result: list[VideoManager] = []
        offset: int | None = 0
        while offset is not None:
            reply = await self.request(protocol.LIST, **({"offset": offset} if offset else {}))
            result += videomanagers_from_reply(reply)
            offset = next_page(reply, offset)
        return result

    async def status(self) -> dict[str, Any]:
        return await self.request(protocol.STATUS)

    async def invalidate(
        self, token: str | Token, videomanager: str | int | None = None
    ) -> bool:
        fields = invalidate_fields(token, videomanager)
        return bool((await self.request(protocol.INVALIDATE, **fields)).get("invalidated"))

    async def login(self, username: str, password: str) -> dict[str, Any]:
        return await self.request(protocol.LOGIN, username=username, password=password)

    async def logout(self) -> None:
        await self.request(protocol.LOGOUT)

    async def aclose(self) -> None:
        self._closed = True
        while self._idle:
            self._idle.pop().close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- the pool -------------------------------------------------------------------------

    async def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send one request; the reply's fields, or the DaemonError it carries. The request
        is for the client's profile unless `fields` name one."""
        if self._closed:
            raise Error("this AsyncClient is closed")
        if self.profile is not None:
            fields.setdefault("profile", self.profile)
        library = self._bind()
        frame = protocol.encode_frame({"v": protocol.PROTOCOL_VERSION, "op": op, **fields})
        try:
            async with library.timeout(self.timeout):
                async with self._lease(library) as lease:
                    try:
                        reply = await self._exchange(lease.stream, frame)
                    except _wire.DISCONNECTED:
                        if not lease.reused:
                            raise
                        # An idle connection the daemon closed, or a restarted daemon.
                        lease.stream.close()
                        lease.stream = await self._connect(library)
                        reply = await self._exchange(lease.stream, frame)
                    lease.healthy = True
        except TimeoutError as exc:
            raise ProtocolError(f"vm-tokend did not answer within {self.timeout:g} s") from exc
        except _wire.FAILURES as exc:
            raise _wire.translate(exc, self.timeout) from exc
        return _wire.check(reply)

    def _bind(self) -> _Library:
        library = _running_library()
        if self._library is None:
            self._library = library
            self._slots = library.semaphore(self.max_connections)
        elif self._library.name != library.name:
            raise RuntimeError(
                f"this AsyncClient was first used under {self._library.name}, "
                f"now under {library.name}; use one client per event loop")
        return self._library

    @asynccontextmanager
    async def _lease(self, library: _Library) -> AsyncIterator[_Lease]:
        """A connection for one request: an idle one, or a new one if none is idle."""
        assert self._slots is not None
        await self._slots.acquire()
        lease: _Lease | None = None
        try:
            if self._idle:
                lease = _Lease(self._idle.pop(), reused=True)
            else:
                lease = _Lease(await self._connect(library), reused=False)
            yield lease
        finally:
            if lease is not None:
                if lease.healthy and not self._closed:
                    self._idle.append(lease.stream)
                else:
                    lease.stream.close()
            self._slots.release()

    async def _connect(self, library: _Library) -> _Stream:
        """A new connection, checked before anything is sent (see _wire): the daemon runs
        as us, as root or as daemon_uid, and the /tmp fallback directory is ours and private."""
        _wire.check_directory(self.socket_path)
        try:
            stream = await library.connect(self.socket_path)
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError) as exc:
            raise DaemonNotRunning(self.socket_path) from exc
        try:
            _wire.check_peer(stream.socket(), self.socket_path, self.daemon_uid)
        except BaseException:
            stream.close()
            raise
        return stream

    @staticmethod
    async def _exchange(stream: _Stream, frame: bytes) -> dict[str, Any]:
        await stream.send_all(frame)
        header = await stream.receive_exactly(protocol.HEADER_SIZE)
        body = await stream.receive_exactly(protocol.frame_length(header))
        return protocol.decode_body(body)
