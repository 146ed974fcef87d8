"""`vm-tokend proxy`: serve HTTP/1.1 on a Unix socket and forward to the profiles' APIs.

Each connection is one task: its gate checks the peer (ours or root's, as the daemon's
socket, plus allow_uids/allow_gids), then requests are read with h11 in a keep-alive
loop; the Host header names the profile (`localhost`: the default one). A request the
proxy will not forward is answered by the proxy itself (see http11.Conversation.answer);
a client that breaks the protocol or stalls is dropped. One debug line per request:
method, path without its query, status, bytes each way, milliseconds, the peer's uid and
pid — never a header value or a query string. Refused peers are logged at most once a
minute (refusals.RefusalLog).

Stopping (stop(), on SIGTERM): no new connections; a connection waiting between requests
(a client's keep-alive pool) is closed at once, having nothing in flight; a request in
flight gets up to drain_timeout to finish.
"""

from __future__ import annotations

import json
import logging
import os
import time
import traceback
from pathlib import Path
from typing import Final

import h11
import trio

import vm_token

from ..refusals import RefusalLog
from ..tasks import count_tasks
from ..text import quote
from .forward import Forwarder, ask_daemon
from .gates import Gate
from .http11 import ClientGone, Conversation
from .routes import Refusal

__all__ = ["ProxyServer"]

log = logging.getLogger(__name__)

IDLE_TIMEOUT: Final = 60.0  # a client between requests
READ_TIMEOUT: Final = 300.0  # the API's silence, and a client's within a request
CONNECT_TIMEOUT: Final = 10.0
MIN_TTL: Final = 30.0
DRAIN_TIMEOUT: Final = 10.0
# Answered here, never forwarded: whether the daemon answers, and the profile's state.
HEALTH_PATH: Final = b"/_vm-token/health"
Listening = tuple[trio.abc.Listener[trio.abc.Stream], Gate]


class ProxyServer:
    """Serves its listeners until stop(), each behind its gate (who, and which profile)."""

    def __init__(self, listeners: list[Listening], daemon: vm_token.AsyncClient, *,
                 idle_timeout: float = IDLE_TIMEOUT, read_timeout: float = READ_TIMEOUT,
                 connect_timeout: float = CONNECT_TIMEOUT, min_ttl: float = MIN_TTL,
                 drain_timeout: float = DRAIN_TIMEOUT) -> None:
        self.listeners = listeners
        self.daemon = daemon
        self.forwarder = Forwarder(daemon, connect_timeout=connect_timeout,
                                   read_timeout=read_timeout, min_ttl=min_ttl)
        self._idle_timeout = idle_timeout
        self._read_timeout = read_timeout
        self._drain_timeout = drain_timeout
        self._stop = trio.Event()
        # The connections waiting for their client's next request, each with the scope
        # that stop() cancels: they have nothing in flight, and a client's keep-alive
        # pool must not hold the drain for its whole time.
        self._idle: dict[trio.CancelScope, Conversation] = {}
        self.refused_peers = 0
        self._refusals = RefusalLog()

    def stop(self) -> None:
        self._stop.set()
        for scope, conversation in self._idle.items():
            if not conversation.conn.trailing_data[0]:  # not a request's head begun
                scope.cancel()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        try:
            async with trio.open_nursery() as handlers:
                async with trio.open_nursery() as acceptor:
                    for listener, gate in self.listeners:
                        acceptor.start_soon(self._accept_loop, listener, gate, handlers)
                    task_status.started()
                    await self._stop.wait()
                    acceptor.cancel_scope.cancel()
                with trio.CancelScope(shield=True):
                    for listener, _ in self.listeners:
                        await listener.aclose()
                handlers.cancel_scope.deadline = trio.current_time() + self._drain_timeout
        finally:
            with trio.CancelScope(shield=True):
                await self.forwarder.aclose()

    async def _accept_loop(self, listener: trio.abc.Listener[trio.abc.Stream], gate: Gate,
                           handlers: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                log.warning("cannot accept a connection: %s; pausing",
                            exc.strerror or type(exc).__name__)
                await trio.sleep(0.1)
                continue
            handlers.start_soon(self._serve_connection, stream, gate)

    async def _serve_connection(self, stream: trio.abc.Stream, gate: Gate) -> None:
        async with stream:
            peer = await gate.admits(stream)
            if not peer.admitted:
                self.refused_peers += 1
                counting = self._refusals.refused(peer.uid)  # logged before it is closed
                await stream.aclose()
                if counting:  # this task stays to write the minute's count
                    await self._refusals.write_count(self._stop)
                return
            conversation = Conversation(stream, idle_timeout=self._idle_timeout,
                                        read_timeout=self._read_timeout)
            try:
                while not self._stop.is_set():
                    with trio.CancelScope() as idle:
                        self._idle[idle] = conversation
                        try:
                            event = await conversation.next_event(between_requests=True)
                        finally:
                            del self._idle[idle]
                    if idle.cancelled_caught:
                        return  # stopping, and nothing in flight here
                    if not isinstance(event, h11.Request):
                        return  # ConnectionClosed: the client is done
                    await self._exchange(conversation, event, gate, peer.uid, peer.pid)
                    if not conversation.ready_for_next():
                        return
            except ClientGone as exc:
                log.debug("dropped a client: %s", exc)
            except Exception as exc:
                # A bug of ours: this connection ends, every other goes on. The type and
                # place only: the text may repeat what the client sent.
                where = traceback.extract_tb(exc.__traceback__)[-1:]
                log.error("internal error (%s at %s) serving a client; connection dropped",
                          type(exc).__name__,
                          f"{Path(where[0].filename).name}:{where[0].lineno}" if where else "?")

    async def _exchange(self, conversation: Conversation, request: h11.Request, gate: Gate,
                        uid: int | None, pid: int | None) -> None:
        started = time.monotonic()
        status, received, sent = 0, 0, 0
        try:
            profile = await gate.profile(request)
            if request.target.split(b"?", 1)[0] == HEALTH_PATH:
                # the daemon's state is its user's, as on the token socket
                mine = uid == os.getuid() or uid == 0 and gate.rule.root
                status = await self._health(conversation, request, profile, mine)
            else:
                status, received, sent = await self.forwarder.forward(conversation, request,
                                                                      profile)
        except Refusal as refusal:
            status = refusal.status
            # a body the client may still be sending is not read: then close after the
            # answer; a request read whole leaves the connection open for the next one
            await conversation.answer(refusal.status, refusal.code, refusal.message,
                                      headers=[] if conversation.request_read()
                                      else [(b"connection", b"close")])
        finally:
            # the path only: a query may hold a token, an absolute-form target a password
            path = request.target.split(b"?", 1)[0].split(b"#", 1)[0].decode(
                "ascii", "replace") if request.target.startswith(b"/") else "(not a path)"
            log.debug("%s %s -> %s, %d bytes in, %d out, %.0f ms, uid %s, pid %s",
                      request.method.decode("ascii", "replace"), quote(path, 200), status,
                      received, sent, (time.monotonic() - started) * 1000, uid,
                      "-" if pid is None else pid)

    async def _health(self, conversation: Conversation, request: h11.Request,
                      profile: str | None, mine: bool) -> int:
        if request.method not in (b"GET", b"HEAD") or \
                not isinstance(await conversation.next_event(), h11.EndOfMessage):
            raise Refusal(405, "bad_request", f"{HEALTH_PATH.decode()} takes a GET only")
        fields = {"profile": profile} if profile is not None else {}
        try:
            status = await ask_daemon(self.daemon.request("status", **fields))
        except Refusal as refusal:
            if refusal.code != "forbidden_op":
                raise
            # the daemon's token socket (a proxy run by another user or in a container)
            # serves no status: reachable is all it can say
            hello = await ask_daemon(self.daemon.request("hello", **fields))
            status = {"state": None, "profile": profile or hello.get("default_profile")}
        # the profile the daemon answered for: with none named, the client's choice
        # ($VM_TOKEN_PROFILE) or the daemon's default_profile, which the proxy cannot know
        named = status.get("profile")
        answer = {"daemon": "reachable",
                  "profile": named if isinstance(named, str) else profile or "default",
                  "state": status.get("state") if mine else None}
        if mine:
            answer["tasks"] = count_tasks()  # the proxy's own: a leak shows from outside
        body = json.dumps(answer).encode() + b"\n"
        await conversation.send(h11.Response(status_code=200, headers=[
            (b"content-type", b"application/json"), (b"cache-control", b"no-store"),
            (b"content-length", str(len(body)).encode())]))
        if request.method != b"HEAD":
            await conversation.send(h11.Data(data=body))
        await conversation.send(h11.EndOfMessage())
        return 200
