"""The server in-process: peer check, framing limits, timeouts, room for clients.

Most tests serve memory streams (`MemoryListener`) on trio's MockClock (pytest-trio's
`autojump_clock`, which starts at 0 and jumps straight to the next deadline once every task
waits). The server's timeouts are constructor parameters, so these tests give it round
numbers and assert the exact virtual time at which a connection is dropped or answered.

Three stay on a real Unix socket, on the wall clock, with `fail_after` upper bounds only,
because the socket itself is their subject:

- test_socket_is_private: the mode of the socket's file and of its directory.
- test_a_client_that_hangs_up_ends_its_request_and_frees_its_slot and
  test_a_client_done_sending_still_gets_the_reply_it_waits_for: a hang-up is told from a
  client that only shut down its writing side by POLLHUP, which only a real socket reports
  (on a memory stream, end of input while a request waits is "done sending"). They also
  pass the peer check through real SO_PEERCRED, the server's default.
"""

from __future__ import annotations

import errno
import gc
import math
import os
import socket as stdlib_socket
import stat
import struct
from collections import defaultdict
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import msgpack
import pytest
import trio
from trio.testing import (
    lockstep_stream_one_way_pair,
    memory_stream_one_way_pair,
    memory_stream_pair,
    wait_all_tasks_blocked,
)

from tests.fakes import VMS, FakeBackend, credentials, running_keeper
from vm_token import protocol
from vm_tokend.keeper.account import Account
from vm_tokend.keeper.answers import Answers
from vm_tokend.peers import Peer, PeerRule, socket_peer
from vm_tokend.server.connections import IDLE_SLACK, Server
from vm_tokend.server.dispatch import Dispatcher
from vm_tokend.server.listener import bind_unix_socket
from vm_tokend.server.routing import Routes
from vm_tokend.upstream.base import VideoManagerRef

# -- memory streams -------------------------------------------------------------------------


class ServerEnd(trio.abc.Stream):
    """The server's end of a memory connection: the stream it was given, and the virtual
    time at which the server closed it."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.closed = trio.Event()
        self.closed_at: float | None = None

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.stream.receive_some(max_bytes)

    async def aclose(self) -> None:
        if self.closed_at is None:
            self.closed_at = trio.current_time()
            self.closed.set()
        await self.stream.aclose()


Pair = Callable[[], tuple[trio.abc.Stream, trio.abc.Stream]]


class MemoryListener(trio.abc.Listener[trio.abc.Stream]):
    """A listener whose connections are memory stream pairs: connect() hands the server
    one end and returns the other. Its backlog is unbounded, like a socket's (4096)."""

    def __init__(self) -> None:
        self._backlog, self._incoming = trio.open_memory_channel[ServerEnd](math.inf)
        self._ends: dict[trio.abc.Stream, ServerEnd] = {}  # by the client's end

    async def connect(self, pair: Pair = memory_stream_pair) -> trio.abc.Stream:
        client, server = pair()
        end = self._ends[client] = ServerEnd(server)
        self._backlog.send_nowait(end)
        await trio.lowlevel.checkpoint()
        return client

    async def accept(self) -> trio.abc.Stream:
        return await self._incoming.receive()

    async def aclose(self) -> None:
        self._incoming.close()
        await trio.lowlevel.checkpoint()

    def closed_at(self, client: trio.abc.Stream) -> float | None:
        """When the server closed the connection of `client`; None while it is open."""
        return self._ends[client].closed_at

    async def dropped(self, client: trio.abc.Stream) -> float:
        """The virtual time at which the server closed the connection of `client`."""
        end = self._ends[client]
        await end.closed.wait()
        assert end.closed_at is not None
        return end.closed_at


def replies_in_lockstep() -> tuple[trio.abc.Stream, trio.abc.Stream]:
    """A connection whose requests are buffered, but each reply waits until the client
    has read it: a client that does not read blocks the server's send at once, as a
    full socket buffer would."""
    up_send, up_receive = memory_stream_one_way_pair()
    down_send, down_receive = lockstep_stream_one_way_pair()
    return trio.StapledStream(up_send, down_receive), trio.StapledStream(down_send, up_receive)


def as_uid(uid: int):
    """A `peer` for memory streams: a peer of this uid (and as its own group)."""
    return lambda stream: Peer(uid, uid, 1)


ours = as_uid(os.getuid())


@asynccontextmanager
async def running(server: Server):
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        yield
        server.stop()


@asynccontextmanager
async def in_memory(handle, **options):
    """A server answering with `handle` on a MemoryListener."""
    listener = MemoryListener()
    options.setdefault("peer", ours)
    server = Server(listener, handle, **options)
    async with running(server):
        yield server, listener


@asynccontextmanager
async def serving(backend=None, *, token_only: bool = False, **options):
    """A keeper on the fake backend and a server on memory streams, stopped at the end;
    `token_only`: served as the token socket serves it."""
    async def login(profile: str | None, username: str, password: str) -> None:
        pass  # the keeper's session is not replaced: the dispatcher then waits on it

    async with running_keeper(backend or FakeBackend()) as keeper:
        dispatcher = Dispatcher(keeper, version="test", login=login,
                                describe=lambda profile: {}, routes=Routes(keeper))
        handle = dispatcher.token_only() if token_only else dispatcher
        async with in_memory(handle, fast=dispatcher.fast_reply, **options) as (
                server, listener):
            yield server, listener, keeper


# -- a real socket --------------------------------------------------------------------------


@asynccontextmanager
async def on_a_socket(private_dir, handle, **options):
    """A server answering with `handle` on a private Unix socket, peers checked by
    SO_PEERCRED."""
    bound = bind_unix_socket(private_dir / "vm-token" / "socket")
    server = Server(bound.listener(), handle, on_close=bound.remove, **options)
    try:
        async with running(server):
            yield server, bound.path
    finally:  # closed by the server when it stops, but not if the test failed
        bound.sock.close()
        bound.remove()


@pytest.fixture
async def connect():
    streams = []

    async def open_one(path):
        stream = await trio.open_unix_socket(str(path))
        streams.append(stream)
        return stream

    yield open_one
    for stream in streams:
        await stream.aclose()


# -- the client's side ----------------------------------------------------------------------


async def receive(stream, count: int) -> list[dict]:
    """The next `count` replies, however the bytes arrive."""
    buffer = b""
    replies: list[dict] = []
    while len(replies) < count:
        if len(buffer) >= 4 and len(buffer) >= 4 + (size := struct.unpack(">I", buffer[:4])[0]):
            replies.append(msgpack.unpackb(buffer[4:4 + size]))
            buffer = buffer[4 + size:]
            continue
        data = await stream.receive_some()
        if not data:
            raise EOFError
        buffer += data
    assert buffer == b"", "more bytes than replies"
    return replies


async def ask(stream, message: dict) -> dict:
    await stream.send_all(protocol.encode_frame(message))
    (reply,) = await receive(stream, 1)
    return reply


async def closed(stream) -> bool:
    try:
        return await stream.receive_some() == b""
    except trio.BrokenResourceError:
        return True


HELLO = {"v": 1, "op": "hello"}


@dataclass
class Waits:
    """What waiting_handler saw: `wait` and `login_wait` requests wait until the event
    `release[key]` is set (`key` from the request, None if it has none)."""

    started: int = 0
    cancelled: int = 0
    answered: int = 0
    release: defaultdict[Any, trio.Event] = field(
        default_factory=lambda: defaultdict(trio.Event))


def waiting_handler(waits: Waits):
    async def handle(request):
        if request["op"] in ("wait", protocol.LOGIN_WAIT):
            waits.started += 1
            try:
                await waits.release[request.get("key")].wait()
            except trio.Cancelled:
                waits.cancelled += 1
                raise
            waits.answered += 1
            return {"ok": True, "waited": True}
        if request["op"] == "big":
            return {"ok": True, "blob": "x" * 60_000}
        return {"ok": True}

    return handle


# -- on a real socket -----------------------------------------------------------------------


async def test_socket_is_private(private_dir):
    bound = bind_unix_socket(private_dir / "vm-token" / "socket")
    try:
        assert stat.S_IMODE(os.stat(private_dir / "vm-token").st_mode) == 0o700
        assert bound.path is not None
        assert stat.S_IMODE(os.stat(bound.path).st_mode) == 0o600
    finally:
        bound.sock.close()
        bound.remove()
    assert not (private_dir / "vm-token" / "socket").exists()


async def test_a_client_that_hangs_up_ends_its_request_and_frees_its_slot(private_dir,
                                                                           connect):
    waits = Waits()
    # No eviction within the test's bound: only the hang-up can free the slot.
    with trio.fail_after(5):
        async with on_a_socket(private_dir, waiting_handler(waits), max_connections=2,
                               max_long_waits=1, eviction_grace=60) as (server, path):
            first = await connect(path)
            await first.send_all(protocol.encode_frame({"v": 1, "op": "login_wait"}))
            await wait_all_tasks_blocked()
            assert waits.started == 1
            await first.aclose()
            await wait_all_tasks_blocked()
            assert server.open_connections == 0
            assert (waits.cancelled, waits.answered) == (1, 0)
            # Both slots free: two clients are served without waiting for an eviction,
            # and the one place for a long wait is free too.
            second, third = await connect(path), await connect(path)
            await second.send_all(protocol.encode_frame({"v": 1, "op": "login_wait"}))
            assert (await ask(third, HELLO))["ok"]
            await wait_all_tasks_blocked()
            assert waits.started == 2
            waits.release[None].set()
            assert await receive(second, 1) == [{"ok": True, "waited": True}]
            # SO_PEERCRED told the server our own uid each time.
            assert (server.accepted, server.refused_peers) == (3, 0)


async def test_a_client_done_sending_still_gets_the_reply_it_waits_for(private_dir, connect):
    """shutdown(SHUT_WR) after the request is not hanging up (`socat`, `nc -N` do it)."""
    waits = Waits()
    with trio.fail_after(5):
        async with on_a_socket(private_dir, waiting_handler(waits)) as (server, path):
            stream = await connect(path)
            await stream.send_all(protocol.encode_frame({"v": 1, "op": "wait"}))
            await stream.send_eof()
            await wait_all_tasks_blocked()  # the daemon has seen the end of the input
            assert waits.started == 1 and server.open_connections == 1
            waits.release[None].set()
            assert await receive(stream, 1) == [{"ok": True, "waited": True}]
            assert await closed(stream)
            assert (waits.cancelled, waits.answered) == (0, 1)


def small_send_buffer(stream: trio.abc.Stream) -> Peer:
    """`peer` for a real socket that also shrinks the accepted socket's send buffer, so
    that a 60 KB reply is written in parts (the kernel takes ~16 KB at once)."""
    assert isinstance(stream, trio.SocketStream)
    stream.socket.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_SNDBUF, 8192)
    peer = socket_peer(stream)
    assert peer is not None
    return peer


async def test_on_a_socket_a_reply_is_sent_whole_as_the_client_reads_or_it_is_dropped(
        private_dir, connect):
    """The part of a reply the socket takes at once, then the rest as the client reads:
    never a byte twice, never out of order; a client that stops reading is dropped after
    send_timeout, with the reply it stopped in cut short."""
    reply = protocol.encode_frame({"ok": True, "blob": "x" * 60_000})
    with trio.fail_after(10):
        async with on_a_socket(private_dir, waiting_handler(Waits()),
                               peer=small_send_buffer, send_timeout=0.5) as (server, path):
            stream = await connect(path)
            await stream.send_all(protocol.encode_frame({"v": 1, "op": "big"}) * 3)
            data = bytearray()
            while len(data) < 3 * len(reply):
                data += await stream.receive_some(4096)
                await trio.sleep(0.001)  # a slow reader
            assert data == reply * 3
            await stream.send_all(protocol.encode_frame({"v": 1, "op": "big"}))
            while server.open_connections:  # noqa: ASYNC110 - a real socket's drop, bounded
                await trio.sleep(0.01)
            rest = bytearray()
            while chunk := await stream.receive_some():
                rest += chunk
    assert 0 < len(rest) < len(reply) and reply.startswith(rest)


# -- timeouts and limits, on virtual time ---------------------------------------------------


class FailingOnce(MemoryListener):
    """Its first accept() fails as when the process is out of file descriptors."""

    def __init__(self) -> None:
        super().__init__()
        self.accepts: list[float] = []

    async def accept(self) -> trio.abc.Stream:
        self.accepts.append(trio.current_time())
        if len(self.accepts) == 1:
            raise OSError(errno.EMFILE, "Too many open files")
        return await super().accept()


async def test_a_failed_accept_pauses_then_serving_goes_on(autojump_clock, caplog):
    listener = FailingOnce()
    # one slot: had the failed accept kept it, nobody would be served again
    server = Server(listener, waiting_handler(Waits()), peer=ours, accept_pause=0.25,
                    max_connections=1)
    with trio.fail_after(60):
        async with running(server):
            client = await listener.connect()
            assert await ask(client, HELLO) == {"ok": True}
    assert listener.accepts[:2] == [0.0, 0.25]
    assert caplog.messages.count("cannot accept a connection: Too many open files; pausing") == 1


async def test_stalled_frame_and_idle_connection_are_dropped(autojump_clock):
    """A frame must be whole within frame_timeout of its first byte, however it trickles
    in; a connection that never sends is closed idle_timeout after it opened, plus the
    slack the server takes (IDLE_SLACK of it)."""
    frame = protocol.encode_frame(HELLO)
    assert 10.0 * IDLE_SLACK == 1.0
    with trio.fail_after(60):
        # send_timeout outside [idle_timeout, + slack]: see the next test
        async with serving(frame_timeout=3.0, idle_timeout=10.0, send_timeout=3.0) as (
                server, listener, _):
            assert trio.current_time() == 0.0
            idle, stalled, slow = [await listener.connect() for _ in range(3)]

            async def stall() -> None:  # still sending, but not whole by 1 + 3
                await trio.sleep_until(1.0)
                await stalled.send_all(frame[:5])
                await trio.sleep_until(3.0)
                await stalled.send_all(frame[5:7])

            async def trickle() -> None:  # whole 2.5 s after its first byte
                await trio.sleep_until(1.0)
                await slow.send_all(frame[:1])
                await trio.sleep_until(3.5)
                await slow.send_all(frame[1:])
                assert (await receive(slow, 1))[0]["ok"]
                assert trio.current_time() == 3.5

            async with trio.open_nursery() as nursery:
                nursery.start_soon(stall)
                nursery.start_soon(trickle)
                assert await closed(stalled)
                assert trio.current_time() == 4.0
                assert await closed(idle)
                assert trio.current_time() == 11.0
                assert await closed(slow)  # idle since its reply at 3.5
                assert trio.current_time() == 14.5
            assert [await listener.dropped(c) for c in (stalled, idle, slow)] \
                == [4.0, 11.0, 14.5]
            assert server.open_connections == 0


@pytest.mark.parametrize(("send_timeout", "after_reply"), [(3.0, 11.0), (10.5, 10.5)],
                         ids=["deadline-moved", "deadline-kept"])
async def test_idle_is_counted_from_the_last_reply_give_or_take_the_slack(
        autojump_clock, send_timeout, after_reply):
    """A connection is closed between idle_timeout and idle_timeout + IDLE_SLACK of it
    after its last reply. Exactly: a deadline already inside that window is kept (moving
    it costs more than answering a request), any other is moved to the window's far end.
    A reply sent on a memory stream leaves the deadline send_timeout after it: 3 s is
    outside the window [10, 11] and moved to 11, 10.5 s is inside and kept."""
    assert 10.0 <= after_reply <= 10.0 + 10.0 * IDLE_SLACK == 11.0
    with trio.fail_after(60):
        async with serving(idle_timeout=10.0, send_timeout=send_timeout) as (
                server, listener, _):
            silent, talker = await listener.connect(), await listener.connect()
            for at in (2.0, 5.0):
                await trio.sleep_until(at)
                assert (await ask(talker, HELLO))["ok"]
            assert await listener.dropped(silent) == 11.0  # its deadline set at 0
            assert await listener.dropped(talker) == 5.0 + after_reply
            assert await closed(silent) and await closed(talker)


async def test_the_longest_idle_connection_makes_room(autojump_clock):
    """Every slot taken (at 2, as a newcomer arrives): eviction_grace later, the connection
    idle the longest (not the oldest) is closed and the newcomer served."""
    with trio.fail_after(60):
        async with serving(max_connections=3, eviction_grace=0.5) as (server, listener, _):
            oldest = await listener.connect()  # at 0
            await trio.sleep_until(1.0)
            longest_idle = await listener.connect()
            await trio.sleep_until(1.5)
            assert (await ask(oldest, HELLO))["ok"]  # idle since 1.5
            await trio.sleep_until(2.0)
            latest = await listener.connect()
            newcomer = await listener.connect()
            assert (await ask(newcomer, HELLO))["ok"]
            assert trio.current_time() == 2.5
            assert [listener.closed_at(c) for c in (oldest, longest_idle, latest)] \
                == [None, 2.5, None]
            assert await closed(longest_idle)
            for stream in (oldest, latest):
                assert (await ask(stream, HELLO))["ok"]
            assert server.open_connections == 3 and trio.current_time() == 2.5


@pytest.mark.parametrize("uid", [4242, None], ids=["another-user", "no-uid"])
async def test_other_users_are_closed_without_a_reply(autojump_clock, uid):
    """Only our uid and root are served; a stream whose peer's uid is unknown (None: the
    default `peer`, SO_PEERCRED, on a stream that is not a socket) is refused too."""
    if uid == os.getuid():
        pytest.skip(f"running as uid {uid}")
    peer = socket_peer if uid is None else as_uid(uid)
    with trio.fail_after(5):
        async with in_memory(waiting_handler(Waits()), peer=peer) as (
                server, listener):
            stream = await listener.connect()
            with pytest.raises((EOFError, trio.BrokenResourceError)):
                await ask(stream, HELLO)
            assert await listener.dropped(stream) == 0.0
            assert (server.refused_peers, server.accepted) == (1, 0)


@pytest.mark.parametrize("uid", [os.getuid(), 0], ids=["ours", "root"])
async def test_our_uid_and_root_are_served(autojump_clock, uid):
    with trio.fail_after(5):
        async with in_memory(waiting_handler(Waits()), peer=as_uid(uid)) as (
                server, listener):
            assert await ask(await listener.connect(), HELLO) == {"ok": True}
            assert (server.refused_peers, server.accepted) == (0, 1)


async def test_the_token_socket_serves_tokens_and_forbids_every_other_op(autojump_clock):
    with trio.fail_after(30):
        async with serving(token_only=True) as (server, listener, keeper):
            stream = await listener.connect()
            hello = await ask(stream, HELLO)
            assert hello["ok"] and hello["ops"] == ["get", "hello", "invalidate", "list"]
            got = await ask(stream, {"v": 1, "op": "get", "vm": "Sales"})
            assert got["ok"] and got["videomanager_id"] == "2", got
            assert (await ask(stream, {"v": 1, "op": "list"}))["total"] == len(VMS)
            assert (await ask(stream, {"v": 1, "op": "invalidate", "token": "x"}))["ok"]
            for op in sorted(protocol.OPS - {"hello", "get", "list", "invalidate"}):
                reply = await ask(stream, {"v": 1, "op": op, "username": "u",
                                           "password": "p", "method": "browser"})
                assert reply["error"]["code"] == "forbidden_op", (op, reply)
                assert f"{op} is not served on the token socket" in reply["error"]["message"]
            unknown = await ask(stream, {"v": 1, "op": "frobnicate"})
            assert unknown["error"]["code"] == "bad_request"
            assert keeper.state(None)["state"] == "logged_in"  # the logout was refused


async def test_a_new_rule_closes_the_connections_it_does_not_admit(autojump_clock):
    uids = iter([4242, 4243])
    with trio.fail_after(10):
        async with in_memory(waiting_handler(Waits()), peer=lambda stream: Peer(
                next(uids), 1, 1), rule=PeerRule(root=False, uids=frozenset({4242, 4243}))
                             ) as (server, listener):
            kept, dropped = await listener.connect(), await listener.connect()
            for stream in (kept, dropped):
                assert await ask(stream, HELLO) == {"ok": True}
            server.set_rule(PeerRule(root=False, uids=frozenset({4242})))
            assert await closed(dropped)
            assert await ask(kept, HELLO) == {"ok": True}
            assert server.open_connections == 1


async def test_a_burst_beyond_the_limit_waits_and_is_served(autojump_clock):
    """Twenty clients at once, two slots: each waits for one that frees, none is evicted
    and none waits for an eviction (no virtual time passes)."""
    with trio.fail_after(10):
        async with serving(max_connections=2) as (server, listener, _):
            replies = []

            async def client() -> None:
                stream = await listener.connect()
                replies.append(await ask(stream, {"v": 1, "op": "get"}))
                await stream.aclose()

            async with trio.open_nursery() as clients:
                for _ in range(20):
                    clients.start_soon(client)
            assert len(replies) == 20 and all(r["ok"] for r in replies)
            assert trio.current_time() == 0.0 and server.accepted == 20


async def test_long_waits_have_their_own_cap(autojump_clock):
    waits = Waits()
    with trio.fail_after(7200):
        async with in_memory(waiting_handler(waits), max_long_waits=2, idle_timeout=20.0) as (
                server, listener):
            waiters = [await listener.connect() for _ in range(3)]
            for key, waiter in enumerate(waiters):
                await waiter.send_all(protocol.encode_frame(
                    {"v": 1, "op": "login_wait", "key": key}))
            await wait_all_tasks_blocked()
            assert waits.started == 2
            refused = (await receive(waiters[2], 1))[0]
            assert refused["error"]["code"] == "login_failed"
            assert "at most 2" in refused["error"]["message"]
            assert trio.current_time() == 0.0  # refused at once
            # Other requests never count against the cap.
            assert (await ask(waiters[2], HELLO))["ok"]
            # A wait lasts as long as the person takes: no deadline while it waits, when
            # an idle connection is closed after 20 s (+ 2 s of slack).
            await trio.sleep(3600)
            assert await listener.dropped(waiters[2]) == 22.0
            assert server.open_connections == 2
            waits.release[0].set()  # its place is free as soon as it is answered
            assert await receive(waiters[0], 1) == [{"ok": True, "waited": True}]
            late = await listener.connect()
            await late.send_all(protocol.encode_frame({"v": 1, "op": "login_wait", "key": 2}))
            await wait_all_tasks_blocked()
            assert waits.started == 3
            waits.release[1].set()
            waits.release[2].set()
            for waiter in (waiters[1], late):
                assert await receive(waiter, 1) == [{"ok": True, "waited": True}]
            assert (await ask(waiters[1], HELLO))["ok"]
            assert trio.current_time() == 3600.0 and server.open_connections == 3


async def test_a_client_that_does_not_read_its_replies_is_dropped(autojump_clock):
    """A reply gets send_timeout to be taken, counted from when it is sent: a client that
    reads late but in time is served, one that stops reading is dropped."""
    with trio.fail_after(60):
        async with in_memory(waiting_handler(Waits()), send_timeout=3.0) as (
                server, listener):
            stream = await listener.connect(replies_in_lockstep)
            await stream.send_all(protocol.encode_frame({"v": 1, "op": "big"}) * 3)
            await trio.sleep(2.0)  # the first reply waits 2 s to be read
            (first,) = await receive(stream, 1)
            assert len(first["blob"]) == 60_000
            # The second is sent at 2 and never read.
            assert await listener.dropped(stream) == 5.0
            assert server.open_connections == 0


async def test_requests_sent_while_one_waits_are_kept_and_answered_in_order(autojump_clock):
    waits = Waits()
    with trio.fail_after(60):
        async with in_memory(waiting_handler(waits)) as (server, listener):
            stream = await listener.connect()
            await stream.send_all(protocol.encode_frame({"v": 1, "op": "wait"}))
            await wait_all_tasks_blocked()
            assert waits.started == 1
            await stream.send_all(protocol.encode_frame(HELLO)
                                  + protocol.encode_frame({"v": 1, "op": "big"}))
            await wait_all_tasks_blocked()  # read by the daemon meanwhile
            await trio.sleep(30)
            waits.release[None].set()
            waited, hello, big = await receive(stream, 3)
            assert waited["waited"] and hello == {"ok": True} and len(big["blob"]) == 60_000
            assert trio.current_time() == 30.0


async def test_stop_closes_idle_connections_and_gives_requests_the_drain_time(autojump_clock):
    waits = Waits()
    listener = MemoryListener()
    closed: list[float] = []
    server = Server(listener, waiting_handler(waits), peer=ours, drain_timeout=2.0,
                    on_close=lambda: closed.append(trio.current_time()))
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            idle = await listener.connect()
            quick, slow = await listener.connect(), await listener.connect()
            await quick.send_all(protocol.encode_frame({"v": 1, "op": "wait", "key": "q"}))
            await slow.send_all(protocol.encode_frame({"v": 1, "op": "wait", "key": "s"}))
            await wait_all_tasks_blocked()
            await trio.sleep(5)
            server.stop()
            await trio.sleep(1.5)
            waits.release["q"].set()  # finishes within the drain time: answered
            assert await receive(quick, 1) == [{"ok": True, "waited": True}]
        ended = trio.current_time()
    assert closed == [5.0]  # the socket's file goes as the listener closes
    assert listener.closed_at(idle) == 5.0  # at once
    assert listener.closed_at(quick) == 6.5  # after its reply: no new request is read
    assert listener.closed_at(slow) == ended == 7.0  # the drain time is up
    assert (waits.answered, waits.cancelled) == (1, 1)
    with pytest.raises(trio.ClosedResourceError):
        await listener.accept()  # the listener was closed


async def test_on_a_memory_stream_the_end_of_input_is_done_sending(autojump_clock):
    """Only a socket tells a hang-up (POLLHUP, see above): on any other stream, the end of
    the input while a request waits leaves the request to finish and be answered."""
    waits = Waits()
    with trio.fail_after(5):
        async with in_memory(waiting_handler(waits)) as (server, listener):
            stream = await listener.connect()
            await stream.send_all(protocol.encode_frame({"v": 1, "op": "wait"}))
            await stream.send_eof()
            await wait_all_tasks_blocked()
            assert waits.started == 1 and server.open_connections == 1
            waits.release[None].set()
            assert await receive(stream, 1) == [{"ok": True, "waited": True}]
            assert await closed(stream)
            assert (waits.cancelled, waits.answered) == (0, 1)


async def test_list_and_status_wait_for_the_login_in_flight(autojump_clock):
    backend = FakeBackend(delay=2.0)
    with trio.fail_after(5):
        async with serving(backend) as (server, listener, keeper):
            stream = await listener.connect()
            bad = await ask(stream, {"v": 1, "op": "list", "wait": "yes"})
            assert bad["error"]["code"] == "bad_request" and "'wait'" in bad["error"]["message"]
            assert (await ask(stream, {"v": 1, "op": "list"}))["total"] == 0  # in flight
            assert (await ask(stream, {"v": 1, "op": "status", "wait": False}))["state"] \
                == "logging_in"
            assert trio.current_time() == 0.0
            status = await ask(stream, {"v": 1, "op": "status", "wait": True})
            assert status["state"] == "logged_in" and status["videomanagers_total"] == 4
            assert trio.current_time() == 2.0 == backend.log[0].ended  # when the login ended
            listing = await ask(stream, {"v": 1, "op": "list", "wait": True})
            assert listing["total"] == 4 and "failed" not in listing
            assert trio.current_time() == 2.0


async def test_list_waiting_names_the_profile_whose_login_failed(autojump_clock):
    with trio.fail_after(5):
        async with serving(FakeBackend(delay=2.0, password="other")) as (
                server, listener, keeper):
            stream = await listener.connect()
            refused = await ask(stream, {"v": 1, "op": "list", "wait": True})
            assert refused["error"]["code"] == "credentials_rejected"
            assert "rejected the credentials" in refused["error"]["message"]
            assert trio.current_time() == 2.0


# -- requests and replies -------------------------------------------------------------------


async def test_several_requests_share_a_connection(autojump_clock):
    with trio.fail_after(5):
        async with serving() as (server, listener, keeper):
            stream = await listener.connect()
            # Two frames in one write, a third after: each answered, in order.
            await stream.send_all(protocol.encode_frame(HELLO)
                                  + protocol.encode_frame({"v": 1, "op": "get", "vm": "2"}))
            await stream.send_all(protocol.encode_frame({"v": 1, "op": "list"}))
            hello, got, listing = await receive(stream, 3)
            assert hello["protocol"] == 1
            assert got["ok"] and got["videomanager_id"] == "2"
            assert [vm["id"] for vm in listing["videomanagers"]] == [vm.id for vm in VMS]


async def test_requests_answered_and_status_has_no_token(autojump_clock):
    with trio.fail_after(5):
        async with serving() as (server, listener, keeper):
            stream = await listener.connect()
            got = await ask(stream, {"v": 1, "op": "get", "vm": "sales", "min_ttl": 10})
            assert got["ok"] and got["videomanager_name"] == "Sales"
            assert got["videomanager_id"] == "2" and got["expires_at"] > 0
            status = await ask(stream, {"v": 1, "op": "status"})
            listing = await ask(stream, {"v": 1, "op": "list"})
            assert got["token"] not in repr(status) and got["token"] not in repr(listing)
            assert status["requests"] == 2 and status["state"] == "logged_in"
            bad = await ask(stream, {"v": 1, "op": "invalidate"})
            assert bad["error"]["code"] == "bad_request" and "'token'" in bad["error"]["message"]
            again = await ask(stream, {"v": 1, "op": "invalidate", "token": got["token"]})
            assert again == {"ok": True, "invalidated": True}
            await stream.aclose()


async def test_internal_errors_become_internal_replies(autojump_clock, monkeypatch):
    with trio.fail_after(5):
        async with serving() as (server, listener, keeper):
            def broken(*args, **kwargs):
                raise RuntimeError("boom")
            monkeypatch.setattr(keeper, "list", broken)
            stream = await listener.connect()
            reply = await ask(stream, {"v": 1, "op": "list"})
            assert reply["error"]["code"] == "internal"
            assert (await ask(stream, HELLO))["ok"]


def fits(reply: dict) -> bool:
    return len(protocol.packb(reply)) <= protocol.MAX_FRAME


@pytest.mark.parametrize("request_", [
    {"v": 1, "op": "get", "vm": "\x01" * 16384},
    {"v": 1, "op": "get", "vm": "\U0001f600" * 4096},
    {"v": 1, "op": "invalidate", "token": "t", "vm": "\x01" * 16384},
    {"v": 1, "op": "invalidate", "token": "t" * 16384, "vm": "\x01" * 16000},
    {"v": 1, "op": "get", "host": "\x01" * 16384},
    {"v": 1, "op": "get", "host": "127.0.0.1", "protocol": "\x01" * 16384},
    {"v": 1, "op": "login", "username": "\x01" * 16384, "password": "p"},
    {"v": 1, "op": "\x01" * 16384},
    {"v": 1, "op": {"login_wait": 1}},
], ids=["get", "get-emoji", "invalidate", "invalidate-long-token", "host", "scheme",
        "login", "op", "op-map"])
async def test_replies_repeat_little_of_what_the_client_sent(autojump_clock, request_):
    with trio.fail_after(5):
        async with serving() as (server, listener, keeper):
            stream = await listener.connect()
            reply = await ask(stream, request_)
            assert reply["ok"] is False
            assert reply["error"]["code"] in ("bad_request", "unknown_videomanager",
                                              "unknown_host")
            assert len(reply["error"]["message"]) < 600
            assert (await ask(stream, {"v": 1, "op": "get"}))["ok"]  # same connection


async def test_unencodable_replies_become_internal_and_the_connection_survives(
        autojump_clock, caplog):
    async def handle(request):
        if request["op"] == "huge":
            return {"ok": True, "blob": "x" * (protocol.MAX_FRAME + 1)}
        if request["op"] == "odd":
            return {"ok": True, "value": object()}
        return {"ok": True}

    with trio.fail_after(5):
        async with in_memory(handle) as (server, listener):
            stream = await listener.connect()
            for op in ("huge", "odd"):
                reply = await ask(stream, {"v": 1, "op": op})
                assert reply["error"]["code"] == "internal"
                assert (await ask(stream, {"v": 1, "op": "fine"})) == {"ok": True}
    lines = [r for r in caplog.records if "internal error" in r.getMessage()]
    assert len(lines) == 2 and all(r.exc_info is None for r in lines)
    assert "xxxxxxxx" not in caplog.text


async def test_list_and_status_page_any_number_of_videomanagers(autojump_clock):
    many = tuple(VideoManagerRef(str(1000 + i), f"VideoManager number {i} " + "é" * 150)
                 for i in range(2000))
    with trio.fail_after(10):
        async with serving(FakeBackend(videomanagers=many)) as (_, listener, keeper):
            stream = await listener.connect()
            seen: list[str] = []
            offset = None
            pages = 0
            while True:
                request = {"v": 1, "op": "list"}
                if offset is not None:
                    request["offset"] = offset
                reply = await ask(stream, request)
                assert fits(reply) and reply["total"] == 2000
                seen += [vm["id"] for vm in reply["videomanagers"]]
                pages += 1
                offset = reply.get("next")
                if offset is None:
                    break
            assert seen == [vm.id for vm in many] and pages > 1
            status = await ask(stream, {"v": 1, "op": "status"})
            assert fits(status) and status["videomanagers_total"] == 2000
            assert 0 < len(status["videomanagers"]) < 2000
            bad = await ask(stream, {"v": 1, "op": "list", "offset": -1})
            assert bad["error"]["code"] == "bad_request"
            past = await ask(stream, {"v": 1, "op": "list", "offset": 5000})
            assert past["videomanagers"] == [] and "next" not in past


async def test_invalidate_with_a_token_that_is_not_ascii_is_a_bad_request(autojump_clock):
    with trio.fail_after(5):
        async with serving() as (server, listener, keeper):
            stream = await listener.connect()
            await ask(stream, {"v": 1, "op": "get"})
            reply = await ask(stream, {"v": 1, "op": "invalidate", "token": "tökén"})
            assert reply["error"]["code"] == "bad_request"
            odd: list[object] = [1.5, [], {}, True, b"1"]
            for vm in odd:
                reply = await ask(stream, {"v": 1, "op": "invalidate", "token": "t", "vm": vm})
                assert reply["error"]["code"] == "bad_request"


async def test_the_fast_path_answers_exactly_what_the_full_one_would(autojump_clock):
    backend = FakeBackend(lifetime=3)  # refreshed at 2 s: the test is done by then
    with trio.fail_after(5):
        async with serving(backend) as (server, listener, keeper):
            stream = await listener.connect()
            plain = {"v": 1, "op": "get"}
            first = await ask(stream, plain)
            again = [await ask(stream, plain) for _ in range(5)]
            assert all(reply == first for reply in again)
            assert (await ask(stream, {"v": 1, "op": "status"}))["requests"] == 7
            # A reported token is never served again from the cache.
            await ask(stream, {"v": 1, "op": "invalidate", "token": first["token"]})
            fresh = await ask(stream, plain)
            assert fresh["ok"] and fresh["token"] != first["token"]
            assert fresh["token"] == backend.access_tokens()[-1]
            # min_ttl: served from the cache while the token is valid for more than that,
            # fetched from the moment it is not (valid for exactly min_ttl).
            held = await ask(stream, {"v": 1, "op": "get", "vm": "2"})
            obtained = backend.times("refresh", "2")[-1]
            assert obtained == 0.0
            wanting = {"v": 1, "op": "get", "vm": "2", "min_ttl": 2.5}
            assert (await ask(stream, wanting))["token"] == held["token"]  # 3 s left
            await trio.sleep_until(obtained + 0.4)
            assert (await ask(stream, wanting))["token"] == held["token"]  # 2.6 s left
            await trio.sleep_until(obtained + 0.5)
            newer = await ask(stream, wanting)  # 2.5 s left: a new one
            assert newer["token"] != held["token"]
            assert backend.times("refresh", "2") == [0.0, 0.5]
            # What the full path refuses, the fast one does too: v must be an int.
            for v in (1.0, True):
                odd = await ask(stream, {"v": v, "op": "get"})
                assert odd["error"]["code"] == "bad_request"
            # Fields the fast path does not know (a git host) take the full path's checks.
            other = await ask(stream, {"v": 1, "op": "get", "host": "elsewhere.example"})
            assert other["error"]["code"] == "unknown_host"
            # After logout nothing is served, and no copy of a token is kept.
            await keeper.start_session(None)
            gone = await ask(stream, plain)
            assert gone["error"]["code"] == "not_logged_in"
            gc.collect()
            assert len(server._handle._frames) == 0


def many_videomanagers(count: int, prefix: str = "") -> tuple[VideoManagerRef, ...]:
    return tuple(VideoManagerRef(f"{prefix}{1000 + i}", f"VideoManager {prefix}{i} "
                                 + "é" * 100) for i in range(count))


async def test_a_long_list_is_made_once_per_change_not_per_request(autojump_clock,
                                                                    monkeypatch):
    """`status` and `list` answer from the list made when the state last changed: with
    10,000 VideoManagers, making it for each request cost 30 ms (and STATUS= once a second)."""
    renders: list[int] = []
    render = Answers._render

    def counted(self, vms, now):
        renders.append(len(vms.listed))
        return render(self, vms, now)

    monkeypatch.setattr(Answers, "_render", counted)
    many = many_videomanagers(2000)
    backend = FakeBackend(videomanagers=many, login_vm=many[0].id)
    with trio.fail_after(10):
        async with serving(backend) as (server, listener, keeper):
            stream = await listener.connect()
            await ask(stream, {"v": 1, "op": "get"})
            renders.clear()
            for _ in range(20):
                assert (await ask(stream, {"v": 1, "op": "status"}))["state"] == "logged_in"
                assert (await ask(stream, {"v": 1, "op": "list", "offset": 1500}))["total"] \
                    == 2000
            assert renders == [2000]
            # A new token is a change: the next answer shows it.
            got = await ask(stream, {"v": 1, "op": "get", "vm": many[1500].id})
            listing = await ask(stream, {"v": 1, "op": "list", "offset": 1500})
            assert listing["videomanagers"][0]["expires_at"] == got["expires_at"]
            assert renders == [2000, 2000]


async def no_login(profile: str | None, username: str, password: str) -> None:
    raise AssertionError("no login expected")


async def test_list_pages_run_across_profiles(autojump_clock):
    other = FakeBackend(videomanagers=many_videomanagers(700, "b"))
    async with running_keeper(FakeBackend(videomanagers=many_videomanagers(700, "a"))) as \
            keeper:
        account = Account(other)

        async def prepare() -> None:
            await account.start(credentials())

        await keeper.add("other", account, prepare)
        dispatcher = Dispatcher(keeper, version="test", login=no_login,
                                describe=lambda profile: {}, routes=Routes(keeper))
        async with in_memory(dispatcher, fast=dispatcher.fast_reply) as (server, listener):
            with trio.fail_after(10):
                stream = await listener.connect()
                seen: list[tuple[str, str]] = []
                request: dict[str, Any] = {"v": 1, "op": "list", "wait": True}
                while True:
                    reply = await ask(stream, request)
                    assert fits(reply) and reply["total"] == 1400
                    seen += [(vm["profile"], vm["id"]) for vm in reply["videomanagers"]]
                    if "next" not in reply:
                        break
                    request = {"v": 1, "op": "list", "offset": reply["next"]}
                assert seen == [("default", vm.id) for vm in many_videomanagers(700, "a")] \
                    + [("other", vm.id) for vm in many_videomanagers(700, "b")]


def test_the_socket_file_appears_only_once_it_listens(private_dir, monkeypatch):
    """A client that finds the file can connect: it is linked into place after listen()
    (a busy machine can preempt a daemon between bind and listen), and the name it was
    bound under is gone."""
    real_link = os.link
    linked: list[str] = []

    def link(source, target):
        probe = stdlib_socket.socket(stdlib_socket.AF_UNIX)
        probe.connect(str(source))  # already listening: no ECONNREFUSED
        probe.close()
        linked.append(str(target))
        real_link(source, target)

    monkeypatch.setattr(os, "link", link)
    path = private_dir / "vm-token" / "socket"
    bound = bind_unix_socket(path)
    try:
        assert linked == [str(path)]
        assert sorted(p.name for p in path.parent.iterdir()) == ["socket"]
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    finally:
        bound.sock.close()
        bound.remove()


def test_without_hard_links_the_socket_is_renamed_into_place(private_dir, monkeypatch):
    """A file system that refuses link() (FUSE mounts, vboxsf): rename instead."""
    def no_link(source, target):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_link)
    path = private_dir / "vm-token" / "socket"
    bound = bind_unix_socket(path)
    try:
        assert sorted(p.name for p in path.parent.iterdir()) == ["socket"]
        probe = stdlib_socket.socket(stdlib_socket.AF_UNIX)
        probe.connect(str(path))
        probe.close()
    finally:
        bound.sock.close()
        bound.remove()
    assert not path.exists()
