"""The proxy's server (proxy/service.ProxyServer) on trio's MockClock: how it stops, and
what its health answer says.

Memory streams stand in for the clients' sockets (tests/test_server.MemoryListener), a gate
that admits everyone for the proxy's gates, and a fake daemon whose `status` takes as long
as the Host header says for the daemon: requests "in flight" for exactly that long.
pytest-trio's `autojump_clock` (at 0 when a test starts) makes each time exact.
"""

from __future__ import annotations

from typing import Any

import h11
import trio

from tests.test_server import MemoryListener
from vm_tokend.peers import PeerRule
from vm_tokend.proxy.gates import Admission
from vm_tokend.proxy.service import ProxyServer

DRAIN = 10.0
HEALTH = "/_vm-token/health"


class EveryoneGate:
    """Admits every connection; the Host header is the profile."""

    rule = PeerRule(root=True)

    async def admits(self, stream: trio.abc.Stream) -> Admission:
        return Admission(True, 1000, 1)

    async def profile(self, request: h11.Request) -> str | None:
        host = dict(request.headers).get(b"host", b"localhost").decode()
        return None if host == "localhost" else host


class FakeDaemon:
    """Answers `status` after the seconds a profile named `slow-N` says (at once for any
    other), naming the profile `answers_for` when asked for none (as the daemon does with
    its default_profile, or vm_token.AsyncClient with $VM_TOKEN_PROFILE)."""

    def __init__(self, answers_for: str | None = None) -> None:
        self.answers_for = answers_for
        self.asked: list[dict[str, Any]] = []

    async def request(self, op: str, **fields: Any) -> dict[str, Any]:
        self.asked.append({"op": op, **fields})
        profile = fields.get("profile")
        if isinstance(profile, str) and profile.startswith("slow-"):
            await trio.sleep(float(profile.removeprefix("slow-")))
        reply: dict[str, Any] = {"ok": True, "state": "logged_in"}
        if profile is not None or self.answers_for is not None:
            reply["profile"] = profile if profile is not None else self.answers_for
        return reply

    async def hello(self) -> dict[str, Any]:
        return {"ok": True, "profiles": []}


def health(host: str = "localhost", *, close: bool = False) -> bytes:
    last = "Connection: close\r\n" if close else ""
    return f"GET {HEALTH} HTTP/1.1\r\nHost: {host}\r\n{last}\r\n".encode()


async def read_all(stream: trio.abc.Stream) -> tuple[bytes, float]:
    """Everything the proxy sends until it closes the connection, and the time it did."""
    got = b""
    while chunk := await stream.receive_some(65536):
        got += chunk
    return got, trio.current_time()


async def test_stop_closes_idle_clients_at_once_and_drains_requests_in_flight(
        autojump_clock):
    """Stopped at 10 s: a client idle between requests (a keep-alive pool's, after an
    answer at 0 s; one that connected and never asked) is closed at 10 s, not at the
    drain's end; a request answered at 15 s is answered; one that would take until 100 s
    is cut at 10 + DRAIN = 20 s, and serve() returns then."""
    listener = MemoryListener()
    server = ProxyServer([(listener, EveryoneGate())], FakeDaemon(),  # type: ignore[arg-type]
                         drain_timeout=DRAIN)
    ended: dict[str, tuple[bytes, float]] = {}

    async def client(name: str, request: bytes, at: float = 0.0) -> None:
        stream = await listener.connect()
        await trio.sleep(at)
        await stream.send_all(request)
        ended[name] = await read_all(stream)

    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        nursery.start_soon(client, "kept alive", health())
        nursery.start_soon(client, "never asked", b"")
        nursery.start_soon(client, "answered in the drain", health("slow-15"), 0.0)
        nursery.start_soon(client, "cut at the drain's end", health("slow-100"), 0.0)
        await trio.sleep(10)
        server.stop()
    assert trio.current_time() == 10 + DRAIN

    kept, kept_at = ended["kept alive"]
    assert kept.startswith(b"HTTP/1.1 200 ") and kept.count(b"HTTP/1.1") == 1
    assert kept_at == 10.0
    assert ended["never asked"] == (b"", 10.0)
    answered, answered_at = ended["answered in the drain"]
    assert answered.startswith(b"HTTP/1.1 200 ") and b'"profile": "slow-15"' in answered
    assert answered_at == 15.0
    assert ended["cut at the drain's end"] == (b"", 20.0)


async def test_a_head_begun_when_stopping_is_read_and_answered(autojump_clock):
    """A client half-way through its request's head when the proxy stops is not cut off
    as idle: its request is whole at 11 s, and answered then."""
    listener = MemoryListener()
    server = ProxyServer([(listener, EveryoneGate())], FakeDaemon(),  # type: ignore[arg-type]
                         drain_timeout=DRAIN)
    request = health()
    got: list[tuple[bytes, float]] = []

    async def client() -> None:
        stream = await listener.connect()
        await trio.sleep(9)
        await stream.send_all(request[:10])
        await trio.sleep(2)
        await stream.send_all(request[10:])
        got.append(await read_all(stream))

    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        nursery.start_soon(client)
        await trio.sleep(10)
        server.stop()
    [(answer, at)] = got
    assert answer.startswith(b"HTTP/1.1 200 ") and at == 11.0


async def test_health_names_the_profile_the_daemon_answered_for(autojump_clock):
    """With no profile named (Host: localhost), the daemon answers for its default_profile,
    or the client library for $VM_TOKEN_PROFILE: the health answer says which, not
    "default"."""
    for answers_for, expected in (("customer", b'"profile": "customer"'),
                                  (None, b'"profile": "default"')):
        listener = MemoryListener()
        daemon = FakeDaemon(answers_for)
        server = ProxyServer([(listener, EveryoneGate())], daemon)  # type: ignore[arg-type]
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            stream = await listener.connect()
            await stream.send_all(health(close=True))
            answer, _ = await read_all(stream)
            server.stop()
        assert answer.startswith(b"HTTP/1.1 200 ") and expected in answer, answer
        assert daemon.asked == [{"op": "status"}]
