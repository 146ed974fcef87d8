"""The proxy's client connection (proxy/http11.Conversation) on trio's MockClock.

Memory streams stand in for the client's socket, and pytest-trio's `autojump_clock` (at 0
when a test starts, jumping straight to the next deadline once every task waits) makes
each deadline an exact virtual time: a head trickled a byte at a time, a client idle
between requests, a body that stops coming, a client that stops reading.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import h11
import pytest
import trio
from trio.testing import lockstep_stream_pair, memory_stream_pair

from vm_tokend.proxy.http11 import HEAD_TIMEOUT, ClientGone, Conversation

# The proxy's defaults (service.IDLE_TIMEOUT, READ_TIMEOUT), written out: what is tested
# here is that Conversation keeps to the timeouts it is given, to the (virtual) second.
IDLE = 60.0
READ = 300.0

HEAD = b"GET /v1/vms HTTP/1.1\r\nHost: localhost\r\n\r\n"


def conversation(stream: trio.abc.Stream) -> Conversation:
    return Conversation(stream, idle_timeout=IDLE, read_timeout=READ)


async def dropped_at(call: Callable[[], Awaitable[object]]) -> float:
    """The virtual time at which `call` gave up on the client (ClientGone)."""
    with pytest.raises(ClientGone):
        await call()
    return trio.current_time()


async def test_a_head_trickled_a_byte_at_a_time_is_dropped_ten_seconds_after_it_began(
        autojump_clock):
    """A byte every 0.5 s is never 60 s of silence, yet the head must be whole within
    HEAD_TIMEOUT of its first byte: dropped at exactly 5 + 10 s."""
    client, server = memory_stream_pair()
    talk = conversation(server)
    head = b"GET /v1/vms HTTP/1.1\r\nHost: localhost\r\nX-Slow: " + b"a" * 100
    sent: list[float] = []

    async def trickle() -> None:
        await trio.sleep(5)  # idle first: that time does not count against the head
        for byte in head:
            await client.send_all(bytes([byte]))
            sent.append(trio.current_time())
            await trio.sleep(0.5)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trickle)
        assert await dropped_at(lambda: talk.next_event(between_requests=True)) \
            == 5 + HEAD_TIMEOUT == 15.0
        nursery.cancel_scope.cancel()
    assert sent[0] == 5.0 and len(sent) < len(head)  # it was still coming, slowly


async def test_a_client_idle_for_59_seconds_then_asking_is_served(autojump_clock):
    client, server = memory_stream_pair()
    talk = conversation(server)

    async def ask() -> None:
        await trio.sleep(59)
        await client.send_all(HEAD)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ask)
        request = await talk.next_event(between_requests=True)
    assert isinstance(request, h11.Request) and request.target == b"/v1/vms"
    assert trio.current_time() == 59.0


async def test_a_client_idle_for_the_idle_timeout_is_dropped(autojump_clock):
    _, server = memory_stream_pair()
    assert await dropped_at(lambda: conversation(server).next_event(between_requests=True)) \
        == IDLE


async def test_a_head_begun_late_has_its_own_ten_seconds(autojump_clock):
    """Idle for 55 s, then a head in two parts 9 s apart: whole at 64 s, past the idle
    timeout counted from the start, within HEAD_TIMEOUT of its first byte: served."""
    client, server = memory_stream_pair()
    talk = conversation(server)

    async def ask() -> None:
        await trio.sleep(55)
        await client.send_all(HEAD[:10])
        await trio.sleep(9)
        await client.send_all(HEAD[10:])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ask)
        request = await talk.next_event(between_requests=True)
    assert isinstance(request, h11.Request)
    assert trio.current_time() == 64.0


async def test_a_body_silent_for_the_read_timeout_is_dropped_then(autojump_clock):
    """Within a request the deadline is per read: a byte at 200 s keeps the body going
    past 300 s in all; then nothing, and it is dropped at exactly 200 + 300 s."""
    client, server = memory_stream_pair()
    talk = conversation(server)
    await client.send_all(b"POST /v1/vms/1001/videos HTTP/1.1\r\nHost: localhost\r\n"
                          b"Content-Length: 10\r\n\r\nabc")
    assert isinstance(await talk.next_event(between_requests=True), h11.Request)
    data = await talk.next_event()
    assert isinstance(data, h11.Data) and data.data == b"abc"

    async def more() -> None:
        await trio.sleep(200)
        await client.send_all(b"def")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(more)
        data = await talk.next_event()
    assert isinstance(data, h11.Data) and data.data == b"def"
    assert trio.current_time() == 200.0
    assert await dropped_at(talk.next_event) == 200 + READ


async def test_a_client_that_stops_reading_is_dropped_after_the_read_timeout(
        autojump_clock):
    """Lockstep streams: a send waits until the client has read it all, as a full socket
    buffer would. The client never reads its answer: the send gives up at 7 + 300 s."""
    client, server = lockstep_stream_pair()
    talk = conversation(server)

    async def ask() -> None:
        await client.send_all(HEAD)  # and never reads

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ask)
        assert isinstance(await talk.next_event(between_requests=True), h11.Request)
    await trio.sleep(7)  # the API takes its time
    response = h11.Response(status_code=200, headers=[(b"content-length", b"5")])
    assert await dropped_at(lambda: talk.send(response)) == 7 + READ
