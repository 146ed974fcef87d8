"""The socket server in-process: peer check, framing limits, timeouts, room for clients."""

from __future__ import annotations

import gc
import os
import stat
import struct
from contextlib import asynccontextmanager
from typing import Any

import msgpack
import pytest
import trio

from tests.fakes import VMS, FakeBackend, credentials, running_keeper
from vm_token import protocol
from vm_tokend.keeper.account import Account
from vm_tokend.keeper.answers import Answers
from vm_tokend.server.connections import Server
from vm_tokend.server.dispatch import Dispatcher
from vm_tokend.server.listener import bind_unix_socket
from vm_tokend.upstream.base import VideoManagerRef


@asynccontextmanager
async def serving(private_dir, backend=None, **options):
    """A keeper on the fake backend and a server on a private socket, stopped at the end."""
    async def login(profile: str | None, username: str, password: str) -> None:
        pass  # the keeper's session is not replaced: the dispatcher then waits on it

    async with running_keeper(backend or FakeBackend()) as keeper, \
            trio.open_nursery() as nursery:
        bound = bind_unix_socket(private_dir / "vm-token" / "socket")
        dispatcher = Dispatcher(keeper, version="test", login=login,
                                describe=lambda profile: {})
        server = Server(bound.listener(), dispatcher, fast=dispatcher.fast_reply,
                        on_close=bound.remove, **options)
        await nursery.start(server.serve)
        yield server, bound.path, keeper
        server.stop()


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


async def test_several_requests_share_a_connection(private_dir, connect):
    with trio.fail_after(5):
        async with serving(private_dir) as (server, path, keeper):
            stream = await connect(path)
            # Two frames in one write, a third after: each answered, in order.
            await stream.send_all(protocol.encode_frame({"v": 1, "op": "hello"})
                                  + protocol.encode_frame({"v": 1, "op": "get", "vm": "2"}))
            await stream.send_all(protocol.encode_frame({"v": 1, "op": "list"}))
            hello, got, listing = await receive(stream, 3)
            assert hello["protocol"] == 1
            assert got["ok"] and got["videomanager_id"] == "2"
            assert [vm["id"] for vm in listing["videomanagers"]] == [vm.id for vm in VMS]


async def test_requests_answered_and_status_has_no_token(private_dir, connect):
    with trio.fail_after(5):
        async with serving(private_dir) as (server, path, keeper):
            stream = await connect(path)
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


async def test_stalled_frame_and_idle_connection_are_dropped(private_dir, connect):
    with trio.fail_after(5):
        async with serving(private_dir, frame_timeout=0.3, idle_timeout=0.6) as (
                server, path, keeper):
            stalled = await connect(path)
            await stalled.send_all(struct.pack(">I", 100) + b"\x80")
            idle = await connect(path)
            started = trio.current_time()
            assert await closed(stalled)
            assert 0.25 <= trio.current_time() - started < 0.6
            assert await closed(idle)
            assert trio.current_time() - started >= 0.55


async def test_the_longest_idle_connection_makes_room(private_dir, connect):
    with trio.fail_after(5):
        async with serving(private_dir, max_connections=3) as (server, path, keeper):
            crowd = []
            for _ in range(3):
                crowd.append(await connect(path))
                await trio.sleep(0.01)
            newcomer = await connect(path)
            assert (await ask(newcomer, {"v": 1, "op": "hello"}))["ok"]
            assert await closed(crowd[0])  # the oldest idle one went
            assert (await ask(crowd[2], {"v": 1, "op": "hello"}))["ok"]


async def test_other_users_are_closed_without_a_reply(private_dir, connect):
    if os.getuid() == 4242:
        pytest.skip("running as uid 4242")
    with trio.fail_after(5):
        async with serving(private_dir, peer_uid=lambda stream: 4242) as (server, path, keeper):
            stream = await connect(path)
            with pytest.raises((EOFError, trio.BrokenResourceError)):
                await ask(stream, {"v": 1, "op": "hello"})
            assert server.refused_peers == 1


async def test_internal_errors_become_internal_replies(private_dir, monkeypatch, connect):
    with trio.fail_after(5):
        async with serving(private_dir) as (server, path, keeper):
            def broken(*args, **kwargs):
                raise RuntimeError("boom")
            monkeypatch.setattr(keeper, "list", broken)
            stream = await connect(path)
            reply = await ask(stream, {"v": 1, "op": "list"})
            assert reply["error"]["code"] == "internal"
            assert (await ask(stream, {"v": 1, "op": "hello"}))["ok"]


async def test_a_burst_beyond_the_limit_waits_and_is_served(private_dir, connect):
    with trio.fail_after(10):
        async with serving(private_dir, max_connections=2) as (server, path, keeper):
            replies = []

            async def client() -> None:
                stream = await connect(path)
                replies.append(await ask(stream, {"v": 1, "op": "get"}))
                await stream.aclose()

            async with trio.open_nursery() as clients:
                for _ in range(20):
                    clients.start_soon(client)
            assert len(replies) == 20 and all(r["ok"] for r in replies)


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
async def test_replies_repeat_little_of_what_the_client_sent(private_dir, connect, request_):
    with trio.fail_after(5):
        async with serving(private_dir) as (server, path, keeper):
            stream = await connect(path)
            reply = await ask(stream, request_)
            assert reply["ok"] is False
            assert reply["error"]["code"] in ("bad_request", "unknown_videomanager",
                                              "unknown_host")
            assert len(reply["error"]["message"]) < 600
            assert (await ask(stream, {"v": 1, "op": "get"}))["ok"]  # same connection


async def test_unencodable_replies_become_internal_and_the_connection_survives(
        private_dir, connect, caplog):
    async def handle(request):
        if request["op"] == "huge":
            return {"ok": True, "blob": "x" * (protocol.MAX_FRAME + 1)}
        if request["op"] == "odd":
            return {"ok": True, "value": object()}
        return {"ok": True}

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            bound = bind_unix_socket(private_dir / "vm-token" / "socket")
            server = Server(bound.listener(), handle, on_close=bound.remove)
            await nursery.start(server.serve)
            stream = await connect(private_dir / "vm-token" / "socket")
            for op in ("huge", "odd"):
                reply = await ask(stream, {"v": 1, "op": op})
                assert reply["error"]["code"] == "internal"
                assert (await ask(stream, {"v": 1, "op": "fine"})) == {"ok": True}
            server.stop()
    lines = [r for r in caplog.records if "internal error" in r.getMessage()]
    assert len(lines) == 2 and all(r.exc_info is None for r in lines)
    assert "xxxxxxxx" not in caplog.text


async def test_list_and_status_page_any_number_of_videomanagers(private_dir, connect):
    many = tuple(VideoManagerRef(str(1000 + i), f"VideoManager number {i} " + "é" * 150)
                 for i in range(2000))
    with trio.fail_after(10):
        async with serving(private_dir, FakeBackend(videomanagers=many)) as (_, path, keeper):
            stream = await connect(path)
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


async def test_invalidate_with_a_token_that_is_not_ascii_is_a_bad_request(private_dir, connect):
    with trio.fail_after(5):
        async with serving(private_dir) as (server, path, keeper):
            stream = await connect(path)
            await ask(stream, {"v": 1, "op": "get"})
            reply = await ask(stream, {"v": 1, "op": "invalidate", "token": "tökén"})
            assert reply["error"]["code"] == "bad_request"
            odd: list[object] = [1.5, [], {}, True, b"1"]
            for vm in odd:
                reply = await ask(stream, {"v": 1, "op": "invalidate", "token": "t", "vm": vm})
                assert reply["error"]["code"] == "bad_request"


async def test_the_fast_path_answers_exactly_what_the_full_one_would(private_dir, connect):
    backend = FakeBackend(lifetime=3)  # refreshed at 2 s: the test is done by then
    with trio.fail_after(5):
        async with serving(private_dir, backend) as (server, path, keeper):
            stream = await connect(path)
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
            # min_ttl beyond what the held token has left: fetched, not served from cache.
            held = await ask(stream, {"v": 1, "op": "get", "vm": "2"})
            wanting = {"v": 1, "op": "get", "vm": "2", "min_ttl": 2.5}
            assert (await ask(stream, wanting))["token"] == held["token"]  # 3 s left
            await trio.sleep(0.6)
            newer = await ask(stream, wanting)  # < 2.5 s left: a new one
            assert newer["token"] != held["token"]
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


@asynccontextmanager
async def waiting_server(private_dir, **options):
    """A server whose `wait` requests wait until `released` is set, and that counts the
    waits that ended early (cancelled) and those answered."""
    state: dict[str, Any] = {"released": trio.Event(), "cancelled": 0, "answered": 0,
                             "started": 0}

    async def handle(request):
        if request["op"] in ("wait", protocol.LOGIN_WAIT):
            state["started"] += 1
            try:
                await state["released"].wait()
            except trio.Cancelled:
                state["cancelled"] += 1
                raise
            state["answered"] += 1
            return {"ok": True, "waited": True}
        if request["op"] == "big":
            return {"ok": True, "blob": "x" * 60_000}
        return {"ok": True}

    async with trio.open_nursery() as nursery:
        bound = bind_unix_socket(private_dir / "vm-token" / "socket")
        server = Server(bound.listener(), handle, on_close=bound.remove, **options)
        await nursery.start(server.serve)
        yield server, private_dir / "vm-token" / "socket", state
        server.stop()


async def until(predicate) -> None:
    while not predicate():  # noqa: ASYNC110 - polling the server's state, in a test
        await trio.sleep(0.01)


async def test_a_client_that_hangs_up_ends_its_request_and_frees_its_slot(private_dir,
                                                                           connect):
    with trio.fail_after(5):
        async with waiting_server(private_dir, max_connections=2) as (server, path, state):
            first = await connect(path)
            await first.send_all(protocol.encode_frame({"v": 1, "op": "wait"}))
            await until(lambda: state["started"] == 1)
            await first.aclose()
            await until(lambda: server.open_connections == 0)
            assert state == {**state, "cancelled": 1, "answered": 0}
            # Both slots free: two clients are served without waiting for an eviction.
            second, third = await connect(path), await connect(path)
            assert (await ask(second, {"v": 1, "op": "hello"}))["ok"]
            assert (await ask(third, {"v": 1, "op": "hello"}))["ok"]


async def test_a_client_done_sending_still_gets_the_reply_it_waits_for(private_dir, connect):
    """shutdown(SHUT_WR) after the request is not hanging up (`socat`, `nc -N` do it)."""
    with trio.fail_after(5):
        async with waiting_server(private_dir) as (server, path, state):
            stream = await connect(path)
            await stream.send_all(protocol.encode_frame({"v": 1, "op": "wait"}))
            await stream.send_eof()
            await until(lambda: state["started"] == 1)
            await trio.sleep(0.05)  # the daemon has seen the end of the input
            state["released"].set()
            assert await receive(stream, 1) == [{"ok": True, "waited": True}]
            assert await closed(stream)


async def test_requests_sent_while_one_waits_are_kept_and_answered_in_order(private_dir,
                                                                            connect):
    with trio.fail_after(5):
        async with waiting_server(private_dir) as (server, path, state):
            stream = await connect(path)
            await stream.send_all(protocol.encode_frame({"v": 1, "op": "wait"}))
            await until(lambda: state["started"] == 1)
            await stream.send_all(protocol.encode_frame({"v": 1, "op": "hello"})
                                  + protocol.encode_frame({"v": 1, "op": "big"}))
            await trio.sleep(0.05)  # read by the daemon meanwhile
            state["released"].set()
            waited, hello, big = await receive(stream, 3)
            assert waited["waited"] and hello == {"ok": True} and len(big["blob"]) == 60_000


async def test_long_waits_have_their_own_cap(private_dir, connect):
    with trio.fail_after(5):
        async with waiting_server(private_dir, max_long_waits=2) as (server, path, state):
            waiters = [await connect(path) for _ in range(3)]
            for waiter in waiters:
                await waiter.send_all(protocol.encode_frame({"v": 1, "op": "login_wait"}))
            refused = (await receive(waiters[2], 1))[0]
            assert refused["error"]["code"] == "login_failed"
            assert "at most 2" in refused["error"]["message"]
            assert state["started"] == 2
            await waiters[0].aclose()  # its place is free at once
            await until(lambda: server.open_connections == 2)
            await waiters[2].send_all(protocol.encode_frame({"v": 1, "op": "login_wait"}))
            await until(lambda: state["started"] == 3)
            state["released"].set()
            for waiter in waiters[1:]:
                assert await receive(waiter, 1) == [{"ok": True, "waited": True}]
            # Other requests never count against the cap.
            assert (await ask(waiters[1], {"v": 1, "op": "hello"}))["ok"]


async def test_a_client_that_does_not_read_its_replies_is_dropped(private_dir, connect):
    with trio.fail_after(5):
        async with waiting_server(private_dir, send_timeout=0.3) as (server, path, state):
            stream = await connect(path)
            # Replies of 60 KB each, never read: the socket's buffer fills up.
            requests = protocol.encode_frame({"v": 1, "op": "big"}) * 64
            with trio.move_on_after(1):
                await stream.send_all(requests)
            await until(lambda: server.open_connections == 0)


async def test_list_and_status_wait_for_the_login_in_flight(private_dir, connect):
    with trio.fail_after(5):
        async with serving(private_dir, FakeBackend(delay=0.3)) as (server, path, keeper):
            stream = await connect(path)
            bad = await ask(stream, {"v": 1, "op": "list", "wait": "yes"})
            assert bad["error"]["code"] == "bad_request" and "'wait'" in bad["error"]["message"]
            assert (await ask(stream, {"v": 1, "op": "list"}))["total"] == 0  # in flight
            assert (await ask(stream, {"v": 1, "op": "status", "wait": False}))["state"] \
                == "logging_in"
            status = await ask(stream, {"v": 1, "op": "status", "wait": True})
            assert status["state"] == "logged_in" and status["videomanagers_total"] == 4
            listing = await ask(stream, {"v": 1, "op": "list", "wait": True})
            assert listing["total"] == 4 and "failed" not in listing


async def test_list_waiting_names_the_profile_whose_login_failed(private_dir, connect):
    with trio.fail_after(5):
        async with serving(private_dir, FakeBackend(delay=0.3, password="other")) as (
                server, path, keeper):
            stream = await connect(path)
            refused = await ask(stream, {"v": 1, "op": "list", "wait": True})
            assert refused["error"]["code"] == "credentials_rejected"
            assert "rejected the credentials" in refused["error"]["message"]


def many_videomanagers(count: int, prefix: str = "") -> tuple[VideoManagerRef, ...]:
    return tuple(VideoManagerRef(f"{prefix}{1000 + i}", f"VideoManager {prefix}{i} "
                                 + "é" * 100) for i in range(count))


async def test_a_long_list_is_made_once_per_change_not_per_request(private_dir, connect,
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
        async with serving(private_dir, backend) as (server, path, keeper):
            stream = await connect(path)
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


async def test_list_pages_run_across_profiles(private_dir, connect):
    other = FakeBackend(videomanagers=many_videomanagers(700, "b"))
    async with running_keeper(FakeBackend(videomanagers=many_videomanagers(700, "a"))) as \
            keeper, trio.open_nursery() as nursery:
        account = Account(other)

        async def prepare() -> None:
            await account.start(credentials())

        await keeper.add("other", account, prepare)
        bound = bind_unix_socket(private_dir / "vm-token" / "socket")
        dispatcher = Dispatcher(keeper, version="test", login=no_login,
                                describe=lambda profile: {})
        server = Server(bound.listener(), dispatcher, fast=dispatcher.fast_reply,
                        on_close=bound.remove)
        await nursery.start(server.serve)
        with trio.fail_after(10):
            stream = await connect(bound.path)
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
        server.stop()
