"""httpx and requests auth, and AsyncClient, against the stand-in over real HTTP."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter

import httpx
import pytest
import requests
import trio

import vm_token

pytestmark = pytest.mark.timeout(90)

REQUESTS = 200
SPACING = 0.05  # 200 requests over 10 s


def sync_flow(standin, socket, path: str, statuses: list[int], seen: Counter,
              on_request=None) -> None:
    def hook(response: httpx.Response) -> None:
        seen[response.status_code] += 1

    hooks = {"response": [hook], "request": [on_request] if on_request else []}
    auth = vm_token.VideoManagerAuth(socket=socket)
    with httpx.Client(auth=auth, event_hooks=hooks) as client:
        for _ in range(REQUESTS):
            statuses.append(client.get(f"{standin.url}{path}").status_code)
            time.sleep(SPACING)


async def async_flow(standin, socket, path: str, statuses: list[int], seen: Counter,
                     sleep, revoke_after: int | None = None, on_request=None) -> None:
    async def hook(response: httpx.Response) -> None:
        seen[response.status_code] += 1

    hooks = {"response": [hook], "request": [on_request] if on_request else []}
    auth = vm_token.VideoManagerAuth(socket=socket)
    async with httpx.AsyncClient(auth=auth, event_hooks=hooks) as client:
        for i in range(REQUESTS):
            if i == revoke_after:
                standin.revoke_access_tokens()
            statuses.append((await client.get(f"{standin.url}{path}")).status_code)
            await sleep(SPACING)


async def run_three_flows(standin, socket, paths):
    """The sync flow in a thread, asyncio in another, trio here; all at once."""
    statuses: dict[str, list[int]] = {"sync": [], "asyncio": [], "trio": []}
    seen: dict[str, Counter] = {"sync": Counter(), "asyncio": Counter(), "trio": Counter()}
    threads = [
        threading.Thread(target=sync_flow, args=(standin, socket, paths[0], statuses["sync"],
                                                 seen["sync"])),
        threading.Thread(target=lambda: asyncio.run(async_flow(
            standin, socket, paths[1], statuses["asyncio"], seen["asyncio"], asyncio.sleep))),
    ]
    for thread in threads:
        thread.start()
    try:
        await async_flow(standin, socket, paths[2], statuses["trio"], seen["trio"], trio.sleep)
    finally:
        for thread in threads:
            await trio.to_thread.run_sync(thread.join)
    return statuses, seen


async def test_sync_trio_and_asyncio_see_only_200s_with_3_second_tokens(make_standin,
                                                                          start_daemon):
    standin = make_standin(access_lifetime=3)
    daemon = start_daemon(standin)
    with trio.fail_after(60):
        statuses, _ = await run_three_flows(
            standin, daemon.socket, ["/1001/videos", "/1002/videos", ""])
    for flow, codes in statuses.items():
        assert codes == [200] * REQUESTS, (flow, Counter(codes))
    # The tokens really expired and were replaced along the way.
    assert standin.counts["refresh"] >= 5


async def test_revoked_tokens_one_retry_per_flow_one_refresh(make_standin, start_daemon):
    """Both flows hold the same token when it is revoked: one 401 each, one refresh."""
    standin = make_standin()
    daemon = start_daemon(standin)
    refreshes = standin.counts["refresh"]
    # httpx runs request hooks after the auth flow has set the header. On its 100th request
    # each flow waits here, token in hand and not yet sent, and the last to arrive revokes
    # every access token. Without this meeting the flow that comes second could ask the
    # daemon after the first one's report and never see the revoked token at all.
    meeting = threading.Barrier(2, action=standin.revoke_access_tokens, timeout=20)
    sent: Counter[str] = Counter()

    def sync_meet(request: httpx.Request) -> None:
        sent["sync"] += 1
        if sent["sync"] == REQUESTS // 2:
            meeting.wait()

    async def trio_meet(request: httpx.Request) -> None:
        sent["trio"] += 1
        if sent["trio"] == REQUESTS // 2:
            await trio.to_thread.run_sync(meeting.wait)

    with trio.fail_after(60):
        statuses: dict[str, list[int]] = {"sync": [], "trio": []}
        seen: dict[str, Counter] = {"sync": Counter(), "trio": Counter()}
        thread = threading.Thread(target=sync_flow, args=(
            standin, daemon.socket, "/1001/videos", statuses["sync"], seen["sync"], sync_meet))
        thread.start()
        try:
            await async_flow(standin, daemon.socket, "/1001/videos", statuses["trio"],
                             seen["trio"], trio.sleep, on_request=trio_meet)
        finally:
            await trio.to_thread.run_sync(thread.join)
    for flow in statuses:
        assert statuses[flow] == [200] * REQUESTS
        assert seen[flow][401] == 1  # retried exactly once
    assert standin.counts["refresh"] - refreshes == 1  # both reports, one refresh
    assert daemon.log().count("reported as rejected") == 1


async def test_asyncio_flow_with_revocation(make_standin, start_daemon):
    standin = make_standin()
    daemon = start_daemon(standin)
    statuses: list[int] = []
    seen: Counter = Counter()

    def run() -> None:
        asyncio.run(async_flow(standin, daemon.socket, "", statuses, seen, asyncio.sleep,
                               revoke_after=50))

    with trio.fail_after(60):
        await trio.to_thread.run_sync(run)
    assert statuses == [200] * REQUESTS and seen[401] == 1


def test_requests_auth(standin, start_daemon):
    daemon = start_daemon(standin)
    auth = vm_token.RequestsAuth(socket=daemon.socket)
    with requests.Session() as session:
        session.auth = auth
        assert session.get(f"{standin.url}/1002/videos", timeout=10).status_code == 200
        standin.revoke_access_tokens()
        response = session.get(f"{standin.url}/1002/videos", timeout=10)
        assert response.status_code == 200
        assert [r.status_code for r in response.history] == [401]
    assert standin.counts["api_rejected"] == 1


def test_a_streamed_upload_is_not_replayed(standin, start_daemon):
    daemon = start_daemon(standin)
    with httpx.Client(auth=vm_token.VideoManagerAuth(socket=daemon.socket)) as client:
        assert client.post(f"{standin.url}/1001/videos", content=b"{}").status_code == 201
        standin.revoke_access_tokens()

        def body():
            yield b"{}"

        response = client.post(f"{standin.url}/1001/videos", content=body())
        assert response.status_code == 401  # a consumed stream cannot be sent again
        assert standin.counts["api_rejected"] == 1
        # A body in memory is sent again with a new token.
        assert client.post(f"{standin.url}/1001/videos", content=b"{}").status_code == 201


def test_min_ttl_beyond_the_token_lifetime_falls_back_to_the_freshest(make_standin,
                                                                      start_daemon):
    standin = make_standin(access_lifetime=5)
    daemon = start_daemon(standin)
    with httpx.Client(auth=vm_token.VideoManagerAuth(socket=daemon.socket)) as client:
        assert client.get(f"{standin.url}/1001/videos").status_code == 200  # min_ttl=30


@pytest.mark.parametrize("library", ["trio", "asyncio"])
async def test_hundred_tasks_share_one_async_client(standin, start_daemon, library):
    daemon = start_daemon(standin)
    with vm_token.Client(daemon.socket) as probe:
        before = probe.status()["connections_accepted"]

    async def hundred(sleep) -> list[vm_token.Token]:
        tokens: list[vm_token.Token] = []
        async with vm_token.AsyncClient(daemon.socket, max_connections=4) as client:
            async def one(i: int) -> None:
                await sleep(0)
                tokens.append(await client.get_token(["Marketing", "1002", "support"][i % 3]))

            if library == "trio":
                async with trio.open_nursery() as nursery:
                    for i in range(100):
                        nursery.start_soon(one, i)
            else:
                await asyncio.gather(*(one(i) for i in range(100)))
            assert len(await client.list_videomanagers()) == 3
            assert (await client.status())["state"] == "logged_in"
        return tokens

    with trio.fail_after(30):
        if library == "trio":
            tokens = await hundred(trio.sleep)
        else:
            tokens = await trio.to_thread.run_sync(lambda: asyncio.run(hundred(asyncio.sleep)))
    assert len(tokens) == 100
    assert all(standin.token_valid(t.access_token, t.videomanager_id) for t in tokens)
    with vm_token.Client(daemon.socket) as probe:
        after = probe.status()["connections_accepted"]
    assert after - before - 1 <= 4  # the pool's, plus this status query's own


async def test_async_client_errors(standin, start_daemon, private_dir):
    async with vm_token.AsyncClient(private_dir / "nothing") as client:
        with pytest.raises(vm_token.DaemonNotRunning):
            await client.get_token()
    daemon = start_daemon(standin, password="")
    async with vm_token.AsyncClient(daemon.socket) as client:
        with pytest.raises(vm_token.NotLoggedIn):
            await client.get_token()
        await client.login(standin.username, standin.password)
        token = await client.get_token("Sales")
        assert await client.invalidate(token) is True
        assert (await client.get_token("Sales")).access_token != token.access_token
        daemon.stop()
        with pytest.raises(vm_token.DaemonNotRunning):
            await client.get_token()  # the idle connection broke; reconnecting failed


def test_importing_vm_token_does_not_import_httpx():
    import subprocess
    import sys

    code = ("import sys, vm_token; vm_token.Client; vm_token.AsyncClient; "
            "print('httpx' in sys.modules, 'trio' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == ["False", "False"]
