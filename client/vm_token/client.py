"""The blocking client: one connection to vm-tokend, reused, safe to share between threads."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from os import PathLike
from types import TracebackType
from typing import Any

import msgpack

from . import _wire, protocol
from ._wire import DEFAULT_TIMEOUT
from .token import Token

__all__ = ["Client", "VideoManager", "get_token"]

# The most common request of all, `get` for the default VideoManager, encoded once (per
# profile: see Client.__init__).
_GET_DEFAULT_FRAME = protocol.encode_frame({"v": protocol.PROTOCOL_VERSION, "op": protocol.GET})
# The shell's profile, for Client, AsyncClient, get_token and `vm-token`.
PROFILE_VARIABLE = "VM_TOKEN_PROFILE"


def resolve_profile(profile: str | None) -> str | None:
    """The profile a client asks for: `profile`, else `$VM_TOKEN_PROFILE` (if set and not
    empty), else None — the daemon's default profile. `""` means the daemon's default
    whatever the environment says."""
    if profile is None:
        profile = os.environ.get(PROFILE_VARIABLE)
    return profile or None


@dataclass(frozen=True, slots=True)
class VideoManager:
    """One VideoManager the logged-in user can use, as `list_videomanagers()` reports it."""

    id: str
    name: str
    is_default: bool
    expires_at: datetime | None  # of the token the daemon holds for it, if any
    refreshed_at: datetime | None
    last_error: str | None
    profile: str | None = None  # the daemon's profile it belongs to (None: daemon too old)


def _when(value: object) -> datetime | None:
    return datetime.fromtimestamp(value, UTC) if isinstance(value, int | float) else None


def get_fields(videomanager: str | int | None, min_ttl: float) -> dict[str, Any]:
    """The fields of a `get` request."""
    fields: dict[str, Any] = {}
    if videomanager is not None:
        fields["vm"] = str(videomanager)
    if min_ttl:
        fields["min_ttl"] = min_ttl
    return fields


def invalidate_fields(token: str | Token, videomanager: str | int | None) -> dict[str, Any]:
    """The fields of an `invalidate` request."""
    fields: dict[str, Any] = {"token": token.access_token if isinstance(token, Token) else token}
    if videomanager is not None:
        fields["vm"] = str(videomanager)
    return fields


def videomanagers_from_reply(reply: dict[str, Any]) -> list[VideoManager]:
    """The VideoManagers of a `list` reply."""
    return [
        VideoManager(
            id=str(item["id"]),
            name=str(item["name"]),
            is_default=bool(item.get("default")),
            expires_at=_when(item.get("expires_at")),
            refreshed_at=_when(item.get("refreshed_at")),
            last_error=item.get("last_error"),
            profile=item.get("profile") if isinstance(item.get("profile"), str) else None,
        )
        for item in reply["videomanagers"]
    ]


def next_page(reply: dict[str, Any], offset: int) -> int | None:
    """The offset of the `list` page after the one `reply` is, None after the last."""
    following = reply.get("next")
    # A daemon that does not page, or names no later page, has said everything.
    return following if isinstance(following, int) and following > offset else None


class Client:
    """A connection to vm-tokend.

    The connection is opened on first use and reused; a connection the daemon closed while
    idle is reopened once, transparently. Every call takes at most `timeout` seconds.

        with vm_token.Client() as vt:
            token = vt.get_token("Marketing", min_ttl=60)

    `profile` names the daemon's profile (account) every request is for; without it,
    `$VM_TOKEN_PROFILE` (read here, once) if set, else the daemon's default profile.
    A profile the daemon does not have is `UnknownProfile`.

    The daemon must run as this user or as root, or as `daemon_uid` (default
    `$VM_TOKEN_DAEMON_UID`): a daemon of another user or container whose token socket
    this user may use. Any other is `UntrustedDaemon`, before anything is sent.
    """

    def __init__(
        self,
        socket: str | PathLike[str] | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        profile: str | None = None,
        daemon_uid: int | None = None,
    ) -> None:
        self.socket_path = str(socket) if socket is not None else protocol.default_socket_path()
        self.timeout = timeout
        self.profile = resolve_profile(profile)
        self.daemon_uid = _wire.resolve_daemon_uid(daemon_uid)
        # get_token()'s request, encoded once: the profile's, or the plain one (which the
        # daemon answers from its own cache).
        self._get_default_frame = _GET_DEFAULT_FRAME if self.profile is None else (
            protocol.encode_frame({"v": protocol.PROTOCOL_VERSION, "op": protocol.GET,
                                   "profile": self.profile}))
        self._connection: _wire.Connection | None = None
        self._lock = threading.Lock()

    # -- public API ---------------------------------------------------------------------

    def hello(self) -> dict[str, Any]:
        """The daemon's protocol and daemon versions."""
        return self.request(protocol.HELLO)

    def get_token(self, videomanager: str | int | None = None, *, min_ttl: float = 0) -> Token:
        """A token for `videomanager` (id or name; None for the default) valid ≥ min_ttl s."""
        if videomanager is None and not min_ttl:
            return Token.from_reply(self._send(self._get_default_frame))
        return Token.from_reply(self.request(protocol.GET, **get_fields(videomanager, min_ttl)))

    def list_videomanagers(self) -> list[VideoManager]:
        """Every VideoManager of the user (the daemon sends them a page at a time)."""
        result: list[VideoManager] = []
        offset: int | None = 0
        while offset is not None:
            reply = self.request(protocol.LIST, **({"offset": offset} if offset else {}))
            result += videomanagers_from_reply(reply)
            offset = next_page(reply, offset)
        return result

    def status(self) -> dict[str, Any]:
        """The daemon's state: user, VideoManagers, counters. Never contains a secret."""
        return self.request(protocol.STATUS)

    def invalidate(self, token: str | Token, videomanager: str | int | None = None) -> bool:
        """Report a token the API rejected; True if it was current and is being replaced."""
        fields = invalidate_fields(token, videomanager)
        return bool(self.request(protocol.INVALIDATE, **fields).get("invalidated"))

    def login(self, username: str, password: str) -> dict[str, Any]:
        """Give the daemon credentials; it logs in and keeps them in memory only."""
        return self.request(protocol.LOGIN, username=username, password=password)

    def logout(self) -> None:
        """Make the daemon forget the credentials and every token."""
        self.request(protocol.LOGOUT)

    def close(self) -> None:
        with self._lock:
            self._drop()

    def __del__(self) -> None:
        # A Client that was never closed (`vm_token.Client().get_token()`) closes its
        # socket when collected instead of leaving it to a ResourceWarning.
        connection = getattr(self, "_connection", None)
        if connection is not None:
            connection.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- the wire -----------------------------------------------------------------------

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send one request and return the reply's fields; raises DaemonError subclasses.

        The request is for the client's profile unless `fields` name one."""
        if self.profile is not None:
            fields.setdefault("profile", self.profile)
        return self._send(protocol.encode_frame({"v": protocol.PROTOCOL_VERSION, "op": op,
                                                 **fields}))

    def _send(self, frame: bytes) -> dict[str, Any]:
        deadline = time.monotonic() + self.timeout
        with self._lock:
            reply = self._exchange(frame, deadline)
        return _wire.check(reply)

    def _exchange(self, frame: bytes, deadline: float) -> dict[str, Any]:
        try:
            if self._connection is not None:
                try:
                    return self._connection.exchange(frame, deadline)
                except _wire.DISCONNECTED:
                    # The daemon closes connections that sat idle for long, and a restarted
                    # daemon has none of the old ones: reconnect once. Every request is safe
                    # to repeat (a stale `invalidate` changes nothing).
                    self._drop()
            # Checks the daemon's uid (and /tmp directory) before anything is sent.
            # msgpack's defaults are the protocol's (str keys and values, no bin as str).
            self._connection = _wire.Connection(self.socket_path, deadline, msgpack.unpackb,
                                                self.daemon_uid)
            return self._connection.exchange(frame, deadline)
        except _wire.FAILURES as exc:
            self._drop()
            raise _wire.translate(exc, self.timeout) from exc
        except BaseException:
            # Interrupted between sending the request and reading all of its reply (Ctrl-C,
            # a signal handler that raises, a timeout wrapper): the reply may still arrive,
            # and the protocol has no request ids, so the next request on this connection
            # would be answered with it — another VideoManager's token. Only a new
            # connection is safe.
            self._drop()
            raise

    def _drop(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


def get_token(
    videomanager: str | int | None = None,
    *,
    min_ttl: float = 0,
    socket: str | PathLike[str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    profile: str | None = None,
    daemon_uid: int | None = None,
) -> Token:
    """One token from the daemon: for `videomanager` (id or name; None for the default) of
    `profile` (None: `$VM_TOKEN_PROFILE`, else the daemon's default profile)."""
    with Client(socket, timeout=timeout, profile=profile, daemon_uid=daemon_uid) as client:
        return client.get_token(videomanager, min_ttl=min_ttl)
