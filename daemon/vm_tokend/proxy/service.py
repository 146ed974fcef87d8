"""`vm-tokend proxy`: serve HTTP/1.1 on a Unix socket and forward to the profiles' APIs.

Each connection is one task: the peer's uid is checked (ours or root's, as the daemon's
socket), then requests are read with h11 in a keep-alive loop; the Host header names the
profile (`localhost`: the default one). A request the proxy will not forward is answered
by the proxy itself (see http11.Conversation.answer); a client that breaks the protocol or
stalls is dropped. One debug line per request: method, path without its query, status,
bytes each way, milliseconds — never a header value or a query string.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Final

import h11
import trio

import vm_token

from ..server.listener import socket_peer_uid
from ..text import quote
from .forward import Forwarder, ask_daemon
from .http11 import ClientGone, Conversation
from .routes import Refusal

__all__ = ["ProxyServer"]

log = logging.getLogger(__name__)

IDLE_TIMEOUT: Final = 60.0  # a client between requests
READ_TIMEOUT: Final = 300.0  # the API's silence, and a client's within a request
CONNECT_TIMEOUT: Final = 10.0
MIN_TTL: Final = 30.0
DRAIN_TIMEOUT: Final = 10.0
DEFAULT_HOST: Final = "localhost"


class ProxyServer:
    """Serves one listener until stop(); profiles named by Host."""

    def __init__(self, listener: trio.abc.Listener[trio.abc.Stream],
                 daemon: vm_token.AsyncClient, *,
                 peer_uid: Callable[[trio.abc.Stream], int | None] = socket_peer_uid,
                 idle_timeout: float = IDLE_TIMEOUT, read_timeout: float = READ_TIMEOUT,
                 connect_timeout: float = CONNECT_TIMEOUT, min_ttl: float = MIN_TTL,
                 drain_timeout: float = DRAIN_TIMEOUT) -> None:
        self.listener = listener
        self.daemon = daemon
        self.forwarder = Forwarder(daemon, connect_timeout=connect_timeout,
                                   read_timeout=read_timeout, min_ttl=min_ttl)
        self._peer_uid = peer_uid
        self._idle_timeout = idle_timeout
        self._read_timeout = read_timeout
        self._drain_timeout = drain_timeout
        self._stop = trio.Event()
        self._profiles: frozenset[str] = frozenset()
        self.refused_peers = 0

    def stop(self) -> None:
        self._stop.set()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        try:
            async with trio.open_nursery() as handlers:
                async with trio.open_nursery() as acceptor:
                    acceptor.start_soon(self._accept_loop, handlers)
                    task_status.started()
                    await self._stop.wait()
                    acceptor.cancel_scope.cancel()
                with trio.CancelScope(shield=True):
                    await self.listener.aclose()
                handlers.cancel_scope.deadline = trio.current_time() + self._drain_timeout
        finally:
            with trio.CancelScope(shield=True):
                await self.forwarder.aclose()

    async def _accept_loop(self, handlers: trio.Nursery) -> None:
        while True:
            try:
                stream = await self.listener.accept()
            except OSError as exc:
                log.warning("cannot accept a connection: %s; pausing",
                            exc.strerror or type(exc).__name__)
                await trio.sleep(0.1)
                continue
            handlers.start_soon(self._serve_connection, stream)

    async def _serve_connection(self, stream: trio.abc.Stream) -> None:
        async with stream:
            uid = self._peer_uid(stream)
            if uid is None or uid not in (os.getuid(), 0):
                self.refused_peers += 1
                log.warning("refused a connection from uid %s", uid)
                return
            conversation = Conversation(stream, idle_timeout=self._idle_timeout,
                                        read_timeout=self._read_timeout)
            try:
                while not self._stop.is_set():
                    event = await conversation.next_event(between_requests=True)
                    if not isinstance(event, h11.Request):
                        return  # ConnectionClosed: the client is done
                    await self._exchange(conversation, event, uid)
                    if not conversation.ready_for_next():
                        return
            except ClientGone as exc:
                log.debug("dropped a client: %s", exc)

    async def _exchange(self, conversation: Conversation, request: h11.Request,
                        uid: int) -> None:
        started = time.monotonic()
        status, received, sent = 0, 0, 0
        try:
            profile = await self._profile(request)
            status, received, sent = await self.forwarder.forward(conversation, request,
                                                                  profile)
        except Refusal as refusal:
            status = refusal.status
            # the body the client may still be sending is not read: close after the answer
            await conversation.answer(refusal.status, refusal.code, refusal.message,
                                      headers=[(b"connection", b"close")])
        finally:
            path = request.target.split(b"?", 1)[0].decode("ascii", "replace")
            log.debug("%s %s -> %s, %d bytes in, %d out, %.0f ms, uid %s",
                      request.method.decode("ascii", "replace"), quote(path, 200), status,
                      received, sent, (time.monotonic() - started) * 1000, uid)

    async def _profile(self, request: h11.Request) -> str | None:
        """The profile the Host header names: `localhost` the default one, else a profile's
        name; 421 for anything else."""
        hosts = [value for name, value in request.headers if name == b"host"]
        host = hosts[0].decode("ascii", "replace").lower() if hosts else DEFAULT_HOST
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if name == DEFAULT_HOST:
            return None
        if name not in self._profiles:
            hello = await ask_daemon(self.daemon.hello())
            listed = hello.get("profiles")
            self._profiles = frozenset(p for p in listed if isinstance(p, str)) \
                if isinstance(listed, list) else frozenset()
        if name in self._profiles:
            return name
        raise Refusal(421, "unknown_profile",
                      f"the Host {quote(host, 100)} names no profile: use `localhost` for the "
                      f"default one, or one of {', '.join(sorted(self._profiles)) or 'none'}")
