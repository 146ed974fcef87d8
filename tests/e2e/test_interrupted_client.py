"""A call interrupted between sending its request and reading the whole reply leaves no
reply behind for the next call (issue 15, finding 3).

The protocol has no request ids: an unread reply on a reused connection would be taken as
the answer to the next request. The daemon is made to wait, deterministically, while it
fetches Sales' first token from the stand-in (the stand-in's fault picker holds that
request until the test lets it go); the caller is interrupted right then.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Iterator

import pytest
import trio

import vm_token

pytestmark = pytest.mark.timeout(60)

# How long the stand-in holds the refresh at most: far beyond what a test needs.
HOLD_LIMIT = 20.0


class Interrupted(BaseException):
    """What a signal handler, KeyboardInterrupt or a timeout wrapper raises: not an
    Exception, so nothing on the way swallows it."""


class HeldRefresh:
    """The stand-in holds the next token refresh until `release()`; `waiting` is set
    once it holds it (the daemon is then mid-request, waiting on the API)."""

    def __init__(self, standin, on_hold=None) -> None:
        self.waiting = threading.Event()
        self._go = threading.Event()
        self._on_hold = on_hold
        self._standin = standin
        standin.faults = self._pick

    def _pick(self, endpoint: str):
        if endpoint == "refresh" and not self.waiting.is_set():
            self.waiting.set()
            if self._on_hold is not None:
                self._on_hold()
            self._go.wait(HOLD_LIMIT)
        return None  # then answer as usual

    def release(self) -> None:
        self._standin.faults = None
        self._go.set()


@pytest.fixture
def interrupting_signal() -> Iterator[int]:
    """SIGUSR1 raises Interrupted in the main thread (pytest-timeout owns SIGALRM)."""
    def handler(signum, frame):
        raise Interrupted

    previous = signal.signal(signal.SIGUSR1, handler)
    try:
        yield signal.SIGUSR1
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_blocking_client_after_a_signal_handler_raised(standin, start_daemon,
                                                       interrupting_signal):
    daemon = start_daemon(standin)
    main = threading.get_ident()
    with daemon.client(timeout=HOLD_LIMIT) as client:
        assert client.get_token().videomanager_name == "Marketing"  # the connection is up
        # Sales has no token yet: the daemon asks the stand-in, which holds the request and
        # interrupts us while we wait for the reply.
        held = HeldRefresh(standin, lambda: signal.pthread_kill(main, interrupting_signal))
        with pytest.raises(Interrupted):
            client.get_token("Sales")
        assert held.waiting.is_set()
        held.release()  # the daemon now sends Sales' reply (on the old connection, if any)
        token = client.get_token("Marketing")
        assert token.videomanager_name == "Marketing"
        assert standin.token_valid(token.access_token, "1001")
        assert client.get_token("Sales").videomanager_name == "Sales"


async def test_async_client_cancelled_mid_request_under_trio(standin, start_daemon):
    daemon = start_daemon(standin)
    async with vm_token.AsyncClient(daemon.socket, max_connections=1,
                                    timeout=HOLD_LIMIT) as client:
        assert (await client.get_token()).videomanager_name == "Marketing"
        held = HeldRefresh(standin)

        async def cancel_once_held(scope: trio.CancelScope) -> None:
            await trio.to_thread.run_sync(held.waiting.wait, HOLD_LIMIT)
            scope.cancel()

        with trio.fail_after(HOLD_LIMIT):
            async with trio.open_nursery() as nursery:
                with trio.CancelScope() as scope:
                    nursery.start_soon(cancel_once_held, scope)
                    await client.get_token("Sales")
            assert scope.cancelled_caught
            held.release()
            token = await client.get_token("Marketing")
        assert token.videomanager_name == "Marketing"
        assert standin.token_valid(token.access_token, "1001")


async def test_async_client_cancelled_mid_request_under_asyncio(standin, start_daemon):
    daemon = start_daemon(standin)

    async def run() -> vm_token.Token:
        async with vm_token.AsyncClient(daemon.socket, max_connections=1,
                                        timeout=HOLD_LIMIT) as client:
            await client.get_token()
            held = HeldRefresh(standin)
            task = asyncio.ensure_future(client.get_token("Sales"))
            assert await asyncio.to_thread(held.waiting.wait, HOLD_LIMIT)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            held.release()
            return await client.get_token("Marketing")

    with trio.fail_after(HOLD_LIMIT * 2):
        token = await trio.to_thread.run_sync(lambda: asyncio.run(run()))
    assert token.videomanager_name == "Marketing"
