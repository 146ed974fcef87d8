"""A login session: one set of credentials, one way of logging in, every token they bring.

Concurrency rules:

* Every upstream call of a session happens under its lock, so a refresh token — which the
  API may rotate on every use — is never sent twice at once, and a re-login after a
  rejected refresh token happens once.
* A Retry-After, and a failed re-login, pause every upstream call of the session until
  then; tokens that are still valid are served meanwhile.
* Rejected credentials are never retried on a timer: only new credentials (`login`) or a
  reload (SIGHUP) start a new session.

What a token covers is the subclass's business: LegacySession holds one per VideoManager,
OidcSession one for all. Ending a session (login, logout, reload) cancels its tasks and
forgets its tokens at once.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Awaitable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio

from vm_token.errors import CredentialsRejected, NotLoggedIn
from vm_token.errors import DaemonError as Refused

from .. import upstream
from ..config.settings import PasswordUnavailable
from ..text import quote
from ..upstream.base import Grant
from .answers import Answers, Changes, LoginRequired, SessionEnded
from .password_reader import PasswordReader
from .slot import RETRY_WAIT, Paused, Slot, Superseded
from .timing import Timing, seconds
from .videomanagers import VideoManagers

__all__ = ["AccountConfig", "Session", "SessionEnded"]

log = logging.getLogger("vm_tokend.keeper")

T = TypeVar("T")

# Log in afresh rather than refresh with a refresh token this close to its expiry (when
# the token says when that is): one request instead of a refused one and a login.
REFRESH_TOKEN_MARGIN = 30.0


@dataclass
class AccountConfig:
    """The settings a session reads as it goes (a reload changes them in place)."""

    default_videomanager: str | None = None
    videomanagers: Sequence[str] = ()
    idle_timeout: float = 3600.0
    calls: Counter[str] = field(default_factory=Counter)  # upstream calls, for status
    changes: Changes = field(default_factory=Changes)  # the keeper's, once it has the account


async def contained(call: Awaitable[T]) -> T:
    """Await a backend call; whatever it raises that is not an UpstreamError becomes a
    TransientError that names only the exception's type (its text might hold a secret)."""
    try:
        return await call
    except upstream.UpstreamError:
        raise
    except Exception as exc:
        raise upstream.TransientError(
            f"unexpected failure talking to the API ({type(exc).__name__})") from None


def failure(exc: Exception) -> tuple[str, float | None]:
    """What to say of a failed attempt, and the API's Retry-After if it sent one. Only a
    TransientError's text is ours to repeat; of anything else, only its type."""
    if isinstance(exc, upstream.TransientError):
        return str(exc), exc.retry_after
    return f"internal error ({type(exc).__name__})", None


class Session(Answers):
    """One login and everything obtained with it."""

    kind = ""

    def __init__(self, source: PasswordReader | None, *, config: AccountConfig,
                 timing: Timing) -> None:
        self.source = source  # None: no password (the seam for interactive logins)
        self.config = config
        self.timing = timing
        self.lock = trio.Lock()
        self.refresh_token: str | None = None
        self.refresh_expires_at = math.inf
        self.vms: VideoManagers | None = None
        self.ready = False  # the first login succeeded: clients may be served
        self.blocked: Refused | None = None  # credentials rejected / password unreadable
        self.last_error: str | None = None
        self.login_retry_at: float | None = None
        self.logged_in_at_wall: float | None = None
        # Every upstream call of the session waits until then; `pause_reason` says why.
        self.paused_until = -math.inf
        self.told_until, self.told_reason = -math.inf, ""  # a Retry-After's, see pause
        self.pause_reason: str | None = None
        self.login_failures = 0
        self.ended = False
        self.identity: str | None = None  # who logged in, when there is no password
        self.relogin_hint = "browser"  # how to log in again without one
        self.changed = trio.Event()
        self.cancel_scope = trio.CancelScope()
        self.nursery: trio.Nursery | None = None

    def notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()
        self.config.changes.note()

    # -- life cycle -----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with self.cancel_scope:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                task_status.started()
                await self._first_login()
                await trio.sleep_forever()

    def end(self) -> None:
        self.ended = True
        self.cancel_scope.cancel()
        self.refresh_token = None
        for slot in list(self.slots()):
            slot.drop()
        self.notify()

    async def _first_login(self) -> None:
        failures = 0
        while True:
            try:
                async with self.lock:
                    paused_until = self.paused_until  # a Retry-After another call got
                    if paused_until <= trio.current_time():
                        await self._establish()
                if paused_until > trio.current_time():
                    if paused_until - trio.current_time() > RETRY_WAIT:
                        # said as a failed attempt is: a client waiting for this login
                        # hears when it will be, rather than wait that long
                        self.last_error = f"the API asked us to wait ({self.pause_reason})"
                        self.login_retry_at = paused_until
                        self.notify()
                    await trio.sleep_until(paused_until)
                    continue
            except Refused:
                self.notify()  # login() recorded why; wait for new credentials
                return
            except Exception as exc:  # TransientError, or a bug of ours met by odd input
                message, retry_after = failure(exc)
                delay = self.timing.backoff(failures, retry_after)
                failures += 1
                self.last_error = message
                self.login_retry_at = trio.current_time() + delay
                if retry_after is not None:
                    # the whole session waits: a slot the login already filled (its
                    # VideoManager list is what failed) must not refresh meanwhile
                    self.pause(trio.current_time() + retry_after, message, told=True)
                log.warning("login failed: %s; next attempt in %s", message, seconds(delay))
                self.notify()
                await trio.sleep_until(self.login_retry_at)
                continue
            break
        self.login_retry_at = None
        self.last_error = None
        self.ready = True
        self.notify()

    def start_slot(self, slot: Slot) -> Slot:
        """Run `slot`'s task in the session (it ends with the session, or when idle)."""
        assert self.nursery is not None, "the session is not running"
        slot.on_change = self.config.changes.note
        self.nursery.start_soon(self._run_slot, slot)
        return slot

    async def _run_slot(self, slot: Slot) -> None:
        await slot.run(lambda: self.blocked is not None)
        self.forget_slot(slot)

    def new_slot(self, label: str, idle_at: Any) -> Slot:
        return self.start_slot(Slot(label, fetch=self.obtain, timing=self.timing,
                                    idle_at=idle_at))

    # -- upstream calls ---------------------------------------------------------------

    async def login(self) -> Grant:
        """Log in with the password (the caller holds the lock); records a rejection.
        Without a password (an interactive login's session), a new interactive login is
        required: never retried on a timer."""
        if self.source is None:
            raise self._block(LoginRequired(
                "the login session has ended (its refresh token was refused or expired): "
                f"run `vm-token login --{self.relogin_hint}`"))
        try:
            password = await self.source.read()
        except PasswordUnavailable as exc:
            raise self._block(NotLoggedIn(
                f"cannot log in as {quote(self.source.username)}: {exc}")) from None
        try:
            self.config.calls["login"] += 1
            grant = await contained(self._password_grant(self.source.username, password))
        except upstream.CredentialsRejected as exc:
            raise self._block(CredentialsRejected(
                f"{exc}; give new credentials with `vm-token login` or reload the daemon"
            )) from None
        except upstream.ClientRejected as exc:
            raise self._block(NotLoggedIn(f"{exc}; fix the configuration and reload")) from None
        finally:
            del password
        self.keep_refresh_token(grant)
        first = self.logged_in_at_wall is None
        self.logged_in_at_wall = time.time()
        log.info("logged in %sas %s (%s)", "" if first else "again ",
                 quote(self.source.username), self.kind)
        return grant

    def _block(self, refusal: Refused) -> Refused:
        self.blocked = refusal
        self.refresh_token = None
        log.error("%s", refusal.message)
        return refusal

    async def login_again(self) -> Grant:
        """login(), with the session's backoff: a failed login pauses every token's
        attempts, so the next login waits instead of each trying its own."""
        try:
            grant = await self.login()
        except upstream.TransientError as exc:
            delay = self.timing.backoff(self.login_failures, exc.retry_after)
            self.login_failures += 1
            self.pause(trio.current_time() + delay, f"cannot log in again: {exc}")
            raise
        self.login_failures = 0
        return grant

    async def refresh(self, *args: str) -> Grant:
        """A refresh grant with the current refresh token (rotated ones are kept)."""
        if self.refresh_token is None:
            raise upstream.RefreshRejected("no refresh token")
        self.config.calls["refresh"] += 1
        try:
            grant = await contained(self._refresh_grant(self.refresh_token, *args))
        except upstream.TransientError as exc:
            if exc.maybe_done and self.source is not None:
                # The provider may have taken it and rotated it: sending it again could
                # look like reuse and end the session (Keycloak). With a password, the
                # next attempt logs in afresh instead.
                log.info("the refresh's outcome is unknown (%s): the next attempt logs in "
                         "afresh", exc)
                self.refresh_token = None
            raise
        self.keep_refresh_token(grant)
        return grant

    async def obtain(self, slot: Slot) -> Grant:
        """A new token for `slot`: Paused while the session waits; a Retry-After pauses
        the whole session."""
        async with self.lock:
            if self.blocked is not None:
                raise self.blocked
            if self.paused_until > trio.current_time():
                raise Paused(self.paused_until, self.pause_reason or "")
            if not slot.wanted(trio.current_time()):
                raise Superseded
            try:
                return await self._fetch(slot)
            except upstream.TransientError as exc:
                if exc.retry_after is not None:
                    self.pause(trio.current_time() + exc.retry_after, str(exc), told=True)
                raise

    def keep_refresh_token(self, grant: Grant) -> None:
        if grant.refresh_token is None or grant.refresh_token == self.refresh_token:
            return  # none sent, or not rotated: ours still expires when it did
        self.refresh_token = grant.refresh_token
        self.refresh_expires_at = (grant.requested_at + grant.refresh_lifetime
                                   if grant.refresh_lifetime is not None else math.inf)

    def refresh_token_left(self) -> float:
        """Seconds the refresh token has left (-inf without one, inf if unknown)."""
        if self.refresh_token is None:
            return -math.inf
        return self.refresh_expires_at - trio.current_time()

    def login_due(self) -> bool:
        """No refresh token, or one that expires within REFRESH_TOKEN_MARGIN."""
        return self.refresh_token_left() < REFRESH_TOKEN_MARGIN

    def pause(self, until: float, reason: str, *, told: bool = False) -> None:
        """No upstream call before `until`. `told`: the API asked for it (Retry-After),
        which the profile's next session honours too (Account)."""
        if told and until > self.told_until:
            self.told_until, self.told_reason = until, reason
        if until > self.paused_until:
            self.paused_until = until
            self.pause_reason = reason

    # -- what a way of logging in decides ------------------------------------------------

    def configure(self) -> None:
        """Apply reloaded settings (the default and kept-warm VideoManagers)."""

    async def _establish(self) -> None:
        """Log in for the first time and learn the VideoManagers (under the lock)."""
        raise NotImplementedError

    async def _password_grant(self, username: str, password: str) -> Grant:
        raise NotImplementedError

    async def _refresh_grant(self, refresh_token: str, *args: str) -> Grant:
        raise NotImplementedError

    async def _fetch(self, slot: Slot) -> Grant:
        """A new token for `slot` (under the lock)."""
        raise NotImplementedError

    def slots(self) -> Iterable[Slot]:
        raise NotImplementedError

    def forget_slot(self, slot: Slot) -> None:
        """`slot` went idle."""
