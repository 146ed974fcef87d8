"""An account: one set of settings, its credentials, and the session they make.

Starting a session first finds out how the API wants to be logged in to (WebFinger, when
`auth = "auto"`): `connect` answers a backend, legacy or OpenID Connect, and the matching
session follows. Trouble finding out backs off and asks again; it never guesses.
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeAlias

import trio

from vm_token.errors import DaemonError as Refused
from vm_token.errors import LoginFailed, NotLoggedIn, UpstreamUnavailable

from .. import upstream
from ..config.settings import PasswordSource
from ..upstream.base import Grant
from ..upstream.oidc import OidcApi
from .interactive import InteractiveLogins
from .legacy_session import LegacySession
from .oidc_session import OidcBackend, OidcSession
from .password_reader import PasswordReader
from .session import AccountConfig, Session, SessionEnded, failure
from .slot import TokenInfo
from .timing import BACKOFF_CAP, Timing, seconds

__all__ = ["Account", "Backend", "Connect"]

log = logging.getLogger("vm_tokend.keeper")

Backend: TypeAlias = upstream.LegacyBackend | OidcBackend
# Finds out how to log in: a backend whose `kind` is "legacy" or "oidc".
Connect: TypeAlias = Callable[[], Awaitable[Backend]]


class _Connecting:
    """A session not made yet: finding out how to log in."""

    def __init__(self, source: PasswordReader, on_change: Callable[[], None]) -> None:
        self.source = source
        self.last_error: str | None = None
        self.retry_at: float | None = None
        self.blocked: Refused | None = None
        self.changed = trio.Event()
        self.on_change = on_change  # what status shows changed

    def notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()
        self.on_change()


class Account:
    """Holds one session at a time and answers for it."""

    def __init__(
        self,
        connect: Connect | Backend,
        *,
        default_videomanager: str | None = None,
        videomanagers: Sequence[str] = (),
        idle_timeout: float = 3600.0,
        max_backoff: float = BACKOFF_CAP,
        rng: random.Random | None = None,
        calls: Counter[str] | None = None,
    ) -> None:
        if not callable(connect):
            backend = connect

            async def fixed() -> Backend:
                return backend
            connect = fixed
        self._connect: Connect = connect
        self.config = AccountConfig(default_videomanager, tuple(videomanagers), idle_timeout,
                                    calls if calls is not None else Counter())
        self.timing = Timing(rng, max_backoff)
        self.session: Session | None = None
        self._connecting: _Connecting | None = None
        self._scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        self.interactive = InteractiveLogins(self.connect_oidc, self.start_interactive)
        self._run_scope: trio.CancelScope | None = None
        # A Retry-After an ended session got: the next one waits it out too (see start)
        self._held: tuple[float, str] = (-math.inf, "")

    def set_connect(self, connect: Connect) -> None:
        """How the next session finds its backend (a reload changed the HTTP client)."""
        self._connect = connect

    @property
    def calls(self) -> Counter[str]:
        return self.config.calls

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as self._run_scope:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()

    def stop(self) -> None:
        """End the session and the account's tasks (its profile was removed)."""
        self.interactive.cancel()
        self.end()
        if self._run_scope is not None:
            self._run_scope.cancel()

    # -- life cycle -----------------------------------------------------------------------

    async def start(self, source: PasswordSource | None, *, asked: bool = False) -> None:
        """Forget everything and, given credentials, log in with them in the background
        (an interactive login in progress ends too). `asked` (`vm-token login`, a reload to
        another API): at once, even under a Retry-After another reload waits out."""
        self.interactive.cancel()
        self.end(keep_hold=not asked)
        if source is None:
            return
        assert self._nursery is not None, "Account.run() is not running"
        connecting = self._connecting = _Connecting(PasswordReader(source),
                                                    self.config.changes.note)
        connecting.notify()  # logging in, now
        self._scope = trio.CancelScope()
        await self._nursery.start(self._connect_and_run, connecting, self._scope)

    async def start_interactive(self, grant: Grant, username: str, api: OidcApi,
                                how: str) -> None:
        """Replace the session with one an interactive login made (no password), and
        wait until it is ready to serve."""
        self.end(keep_hold=False)  # a person's login: tried now (see start)
        assert self._nursery is not None, "Account.run() is not running"
        session = OidcSession(None, api, config=self.config, timing=self.timing,
                              initial=(grant, username, how))
        session.pause(*self._held, told=True)  # the last one's Retry-After
        self.session = session
        self._scope = trio.CancelScope()
        await self._nursery.start(self._run, session, self._scope)
        await session.wait_logged_in()

    async def _run(self, session: Session, scope: trio.CancelScope, *,
                   task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            task_status.started()
            await session.run()

    async def connect_oidc(self) -> OidcApi:
        """The OpenID Connect backend for an interactive login; why not, if there is none."""
        try:
            backend = await self._connect()
        except upstream.ClientRejected as exc:
            raise LoginFailed(str(exc)) from None
        except upstream.UpstreamError as exc:
            raise UpstreamUnavailable(f"cannot find how to log in: {exc}") from None
        if not isinstance(backend, OidcApi):
            raise LoginFailed("the API logs in with its own endpoints (auth = legacy, or "
                              "WebFinger names no OpenID Connect issuer): browser and device "
                              "logins need OpenID Connect")
        return backend

    def end(self, *, keep_hold: bool = True) -> None:
        if not keep_hold:
            self._held = (-math.inf, "")
        elif self.session is not None and self.session.told_until > self._held[0]:
            self._held = (self.session.told_until, self.session.told_reason)
        if self._scope is not None:
            self._scope.cancel()
            self._scope = None
        if self._connecting is not None:
            self._connecting.notify()
            self._connecting = None
        if self.session is not None:
            self.session.end()
            self.session = None

    async def _connect_and_run(self, connecting: _Connecting, scope: trio.CancelScope, *,
                               task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                               ) -> None:
        with scope:
            task_status.started()
            backend = await self._find_backend(connecting)
            if backend is None:
                return
            kind = LegacySession if getattr(backend, "kind", "legacy") == "legacy" \
                else OidcSession
            session = kind(connecting.source, backend,  # type: ignore[arg-type]
                           config=self.config, timing=self.timing)
            session.pause(*self._held, told=True)  # the last one's Retry-After
            self.session, self._connecting = session, None
            connecting.notify()
            await session.run()

    async def _find_backend(self, connecting: _Connecting) -> Backend | None:
        failures = 0
        while True:
            try:
                return await self._connect()
            except upstream.ClientRejected as exc:
                connecting.blocked = NotLoggedIn(
                    f"{exc}; set auth or oidc_issuer if the API's answer is not to be "
                    "trusted, or fix the client settings, and reload")
                log.error("%s", connecting.blocked.message)
                connecting.notify()
                return None
            except Exception as exc:  # TransientError, or a bug met by odd input
                message, retry_after = failure(exc)
                delay = self.timing.backoff(failures, retry_after)
                failures += 1
                connecting.last_error = f"cannot find how to log in: {message}"
                connecting.retry_at = trio.current_time() + delay
                log.warning("%s; next attempt in %s", connecting.last_error, seconds(delay))
                connecting.notify()
                await trio.sleep_until(connecting.retry_at)

    def configure(self, *, default_videomanager: str | None, videomanagers: Sequence[str],
                  idle_timeout: float, max_backoff: float = BACKOFF_CAP) -> None:
        """Apply reloaded settings that do not need a new session."""
        self.config.default_videomanager = default_videomanager
        self.config.videomanagers = tuple(videomanagers)
        self.config.idle_timeout = idle_timeout
        self.timing.max_backoff = max_backoff
        if self.session is not None:
            self.session.configure()

    @property
    def password_source(self) -> PasswordSource | None:
        """The configured username and password source the session reads (None if a
        person logged in interactively, or nobody did)."""
        reader = self.session.source if self.session else (
            self._connecting.source if self._connecting else None)
        return reader.source if reader else None

    @property
    def logged_in_interactively(self) -> bool:
        """Whether the session came from a browser or device login (it has no password)."""
        return self.session is not None and self.session.source is None

    @property
    def username(self) -> str | None:
        """Who the session is (or will be) logged in as."""
        if self.session is not None:
            return self.session.username
        return self._connecting.source.username if self._connecting else None

    @property
    def rejected(self) -> bool:
        blocked = self.session.blocked if self.session else (
            self._connecting.blocked if self._connecting else None)
        return blocked is not None

    def logged_in_with(self, password: str) -> bool:
        """Whether the current session last logged in with this password."""
        return self.session is not None and self.session.source is not None \
            and self.session.source.last_read(password)

    # -- requests -------------------------------------------------------------------------

    async def _current(self) -> Session:
        """The session, once there is one; raises why there is none."""
        while True:
            if self.session is not None:
                return self.session
            connecting = self._connecting
            if connecting is None:
                raise NotLoggedIn("vm-tokend has no credentials: run `vm-token login`, or "
                                  "configure a username and password")
            if connecting.blocked is not None:
                raise connecting.blocked
            now = trio.current_time()
            if connecting.retry_at is not None and connecting.retry_at > now:
                raise UpstreamUnavailable(f"{connecting.last_error}; next attempt in "
                                          f"{seconds(connecting.retry_at - now)}")
            await connecting.changed.wait()

    async def wait_logged_in(self) -> None:
        while True:
            try:
                await (await self._current()).wait_logged_in()
                return
            except SessionEnded:
                continue

    async def get(self, ref: str | None = None, min_ttl: float = 0.0) -> TokenInfo:
        while True:
            try:
                return await (await self._current()).get(ref, min_ttl)
            except SessionEnded:
                continue  # replaced while we waited: ask the new one

    def held(self, ref: str | None, min_ttl: float) -> TokenInfo | None:
        return self.session.held(ref, min_ttl) if self.session is not None else None

    def invalidate(self, token: str, ref: str | None = None) -> bool:
        return self.session.invalidate(token, ref) if self.session is not None else False

    def list(self) -> list[dict[str, Any]]:
        return self.session.list() if self.session is not None else []

    def state(self) -> dict[str, Any]:
        if self.session is not None:
            return self.session.state()
        connecting = self._connecting
        if connecting is None:
            return {"state": "logged_out", "username": None, "logged_in_at": None,
                    "last_error": None, "notices": [], "auth": None}
        error: str | None
        if connecting.blocked is not None:
            state, error = "not_logged_in", connecting.blocked.message
        else:
            state = "logging_in" if connecting.retry_at is None else "upstream_unavailable"
            error = connecting.last_error
        return {"state": state, "username": connecting.source.username, "logged_in_at": None,
                "last_error": error, "notices": [], "auth": None}


