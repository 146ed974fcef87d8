"""The keeper: one fresh access token per VideoManager, in memory, for every client.

Time rules (all on trio's clock, so tests run them on a MockClock):

* A token's lifetime is what its JWT says (see upstream.token_lifetime), counted from when
  the request for it was sent. It is refreshed in the background once two thirds of that
  lifetime have passed, ± 5 % of the lifetime at random so several daemons do not march in
  step — but never sooner than MIN_REFRESH_INTERVAL after the last time.
* Transient failures back off exponentially with full jitter — a random delay between 0 and
  1 s, 2 s, 4 s, … capped at `max_backoff` (60 s) — or longer when the API sent
  Retry-After. Requests never shorten a backoff; a token that is still valid is served
  meanwhile. A Retry-After, and a failed re-login, pause every upstream call of the login
  session, not only the token that met them.
* Anything else that goes wrong talking to the API counts as a transient failure: no answer
  of the API can end the daemon.
* Rejected credentials are never retried on a timer: only new credentials (`login`) or a
  reload (SIGHUP) start a new session.

Concurrency rules:

* Every VideoManager we hold has one entry and one maintainer task, which alone fetches its
  tokens; clients that need a fresher token wake it and wait for the attempt it makes, so
  any number of them cause one upstream request (single flight).
* Every upstream call of a login session happens under the session's lock, so a refresh
  token — which the API may rotate on every use — is never sent twice at once, and a
  re-login after a rejected refresh token happens once.

A `Session` is everything that follows one set of credentials; replacing it (login, logout,
reload) cancels its tasks and forgets its tokens at once.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import random
import secrets
import time
from collections.abc import Awaitable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import trio

# A refusal is the very exception the client will raise: one class per wire error code.
from vm_token.errors import (
    BadRequest,
    CredentialsRejected,
    Forbidden,
    NotLoggedIn,
    UnknownVideoManager,
    UpstreamUnavailable,
)
from vm_token.errors import DaemonError as Refused

from . import upstream
from .settings import Credentials, PasswordUnavailable
from .text import quote
from .upstream import AuthBackend, Grant, VideoManagerRef

__all__ = [
    "BadRequest",
    "CredentialsRejected",
    "Forbidden",
    "Keeper",
    "NotLoggedIn",
    "Refused",
    "TokenInfo",
    "UnknownVideoManager",
    "UpstreamUnavailable",
]

log = logging.getLogger(__name__)

REFRESH_AT: Final = 2 / 3
REFRESH_JITTER: Final = 0.05  # of the lifetime, either way
BACKOFF_INITIAL: Final = 1.0
BACKOFF_CAP: Final = 60.0
# Log in afresh rather than refresh with a refresh token this close to its expiry (when
# the token says when that is): one request instead of a refused one and a login.
REFRESH_TOKEN_MARGIN: Final = 30.0
# After a 403 we tell clients "forbidden" without asking the API again for this long: rights
# change rarely, and a script in a loop must not turn into a request storm. A guess.
FORBIDDEN_RECHECK: Final = 60.0
# A token reported as rejected this soon after we got it suggests the API rejects what we
# fetch; from the second such token in a row, replacements back off like failures.
QUICK_INVALIDATION: Final = 10.0
# A client asking for a token we do not have waits for an attempt due this soon rather
# than hearing "next attempt in 1 s"; below every client's default timeout (5 s). A guess.
RETRY_WAIT: Final = 3.0
# However short-lived the API says its tokens are, we do not ask for a new one more often
# than this: a broken or hostile answer cannot turn us into a request storm.
MIN_REFRESH_INTERVAL: Final = 1.0
# How many VideoManagers an "unknown VideoManager" message names.
NAMES_SHOWN: Final = 10


@dataclass(frozen=True, slots=True, weakref_slot=True)  # the server caches replies by it
class TokenInfo:
    token: str
    videomanager: VideoManagerRef
    expires_at: float  # Unix seconds

    def __repr__(self) -> str:
        return f"TokenInfo(videomanager={self.videomanager!r}, expires_at={self.expires_at})"


def _in(seconds: float) -> str:
    return f"{max(0.0, seconds):.0f} s"


class Entry:
    """What we hold for one VideoManager."""

    def __init__(self, vm: VideoManagerRef, now: float) -> None:
        self.vm = vm
        self.token: str | None = None
        self.lifetime: float | None = None
        self.obtained_at = -math.inf
        self.expires_at = -math.inf  # trio clock
        self.expires_at_wall: float | None = None
        self._info: TokenInfo | None = None  # what get() answers, made once per token
        self.refresh_at = math.inf
        self.refreshed_at_wall: float | None = None
        self.last_error: str | None = None
        self.failures = 0
        self.retry_at: float | None = None  # set while backing off
        self.blocked: Refused | None = None  # a 403: answered without asking until...
        self.blocked_until = -math.inf
        self.quick_invalidations = 0
        self.want_ttl: float | None = None  # set by a client waiting for a fresher token
        self.last_used = now
        self.wake = trio.Event()
        self.changed = trio.Event()

    def notify(self) -> None:
        """Wake every client waiting on this entry (a fresh Event for the next round)."""
        self.changed.set()
        self.changed = trio.Event()

    def valid_for(self, now: float) -> float:
        return self.expires_at - now if self.token is not None else -math.inf

    def info(self) -> TokenInfo:
        assert self._info is not None and self._info.token == self.token
        return self._info

    def take(self, grant: Grant, refresh_at: float) -> None:
        if self.token is not None:
            # The token it replaces was not reported as rejected: the run of quickly
            # rejected tokens, if any, is broken.
            self.quick_invalidations = 0
        self.token = grant.access_token
        self.lifetime = grant.lifetime
        self.obtained_at = grant.requested_at
        self.expires_at = grant.requested_at + grant.lifetime
        self.expires_at_wall = time.time() + (self.expires_at - trio.current_time())
        self._info = TokenInfo(grant.access_token, self.vm, self.expires_at_wall)
        self.refresh_at = refresh_at
        self.refreshed_at_wall = time.time()
        self.last_error = None
        self.failures = 0
        self.retry_at = None
        self.blocked = None
        self.want_ttl = None


class Session:
    """One set of credentials and everything obtained with them."""

    def __init__(self, credentials: Credentials) -> None:
        self.credentials = credentials
        self.lock = trio.Lock()
        self.refresh_token: str | None = None
        self.refresh_expires_at = math.inf
        self.videomanagers: tuple[VideoManagerRef, ...] | None = None
        self._by_key: dict[str, VideoManagerRef] = {}
        self.login_videomanager: str | None = None  # whose token a login brings
        self.default_id: str | None = None
        self.notices: list[str] = []  # how the configuration did not fit the user's list
        # Every upstream call of the session waits until then (a Retry-After, a failed
        # re-login); `pause_reason` says why.
        self.paused_until = -math.inf
        self.pause_reason: str | None = None
        self.login_failures = 0
        self.pinned: set[str] = set()
        self.entries: dict[str, Entry] = {}
        self.blocked: Refused | None = None  # credentials rejected / password unreadable
        self.last_error: str | None = None
        self.login_retry_at: float | None = None
        self.logged_in_at_wall: float | None = None
        # A keyed digest of the password last used, so a reload can tell whether a password
        # file changed without keeping a second copy of the password around.
        self.password_digest: bytes | None = None
        self.changed = trio.Event()
        self.cancel_scope = trio.CancelScope()
        self.nursery: trio.Nursery | None = None

    def notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def set_videomanagers(self, videomanagers: tuple[VideoManagerRef, ...]) -> None:
        self.videomanagers = videomanagers
        # Ids first: an id wins over a VideoManager whose name looks like an id.
        self._by_key = {vm.name.casefold(): vm for vm in reversed(videomanagers)}
        self._by_key.update((vm.id, vm) for vm in videomanagers)
        self._by_id = {vm.id: vm for vm in videomanagers}

    def find(self, ref: str) -> VideoManagerRef | None:
        """A VideoManager by id, or by name case-insensitively."""
        return self._by_key.get(ref) or self._by_key.get(ref.casefold())

    def by_id(self, vm_id: str | None) -> VideoManagerRef | None:
        return self._by_id.get(vm_id) if vm_id is not None else None

    def resolve(self, ref: str | None) -> VideoManagerRef:
        videomanagers = self.videomanagers or ()
        if ref is None:
            ref = self.default_id
            if ref is None:
                raise UnknownVideoManager("no default VideoManager: name one")
        vm = self.find(ref)
        if vm is None:
            names = ", ".join(f"{v.name} ({v.id})" for v in videomanagers[:NAMES_SHOWN])
            if len(videomanagers) > NAMES_SHOWN:
                names += f" and {len(videomanagers) - NAMES_SHOWN} more (`vm-token list`)"
            raise UnknownVideoManager(
                f"no VideoManager {quote(ref)} for this user; known: {names or 'none'}"
            )
        return vm

    def pause(self, until: float, reason: str) -> None:
        if until > self.paused_until:
            self.paused_until = until
            self.pause_reason = reason


class _Paused(Exception):
    """The session waits (a Retry-After, a failed re-login): no upstream call until then."""

    def __init__(self, until: float, reason: str) -> None:
        super().__init__(reason)
        self.until = until
        self.reason = reason


class Keeper:
    """Holds the tokens; `server` asks it, it alone asks `upstream`."""

    def __init__(
        self,
        backend: AuthBackend,
        *,
        default_videomanager: str | None = None,
        videomanagers: Sequence[str] = (),
        idle_timeout: float = 3600.0,
        max_backoff: float = BACKOFF_CAP,
        rng: random.Random | None = None,
    ) -> None:
        self.backend = backend
        self.default_videomanager = default_videomanager
        self.videomanagers = tuple(videomanagers)
        self.idle_timeout = idle_timeout
        self.max_backoff = max_backoff
        self._rng = rng if rng is not None else random.Random()  # noqa: S311 - jitter, not crypto
        self._session: Session | None = None
        self._nursery: trio.Nursery | None = None
        self._digest_key = secrets.token_bytes(32)

    # -- life cycle ---------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the keeper's tasks until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    async def start_session(self, credentials: Credentials | None) -> None:
        """Forget everything and, given credentials, log in with them in the background."""
        self._end_session()
        if credentials is None:
            return
        assert self._nursery is not None, "Keeper.run() is not running"
        session = Session(credentials)
        self._session = session
        await self._nursery.start(self._run_session, session)

    def _end_session(self) -> None:
        session, self._session = self._session, None
        if session is None:
            return
        session.cancel_scope.cancel()
        session.refresh_token = None
        for entry in session.entries.values():
            entry.token = None
            entry.notify()
        session.entries.clear()
        session.notify()

    def configure(
        self,
        *,
        default_videomanager: str | None,
        videomanagers: Sequence[str],
        idle_timeout: float,
        max_backoff: float = BACKOFF_CAP,
    ) -> None:
        """Apply reloaded settings that do not need a new session."""
        self.default_videomanager = default_videomanager
        self.videomanagers = tuple(videomanagers)
        self.idle_timeout = idle_timeout
        self.max_backoff = max_backoff
        session = self._session
        if session is not None and session.videomanagers is not None:
            self._pin(session)
            for entry in session.entries.values():
                entry.wake.set()  # recompute idle deadlines

    @property
    def credentials(self) -> Credentials | None:
        return self._session.credentials if self._session else None

    @property
    def rejected(self) -> bool:
        return self._session is not None and self._session.blocked is not None

    def _digest(self, password: str) -> bytes:
        return hmac.new(self._digest_key, password.encode(), hashlib.sha256).digest()

    def logged_in_with(self, password: str) -> bool:
        """Whether the current session last logged in with this password."""
        session = self._session
        return (session is not None and session.password_digest is not None
                and hmac.compare_digest(session.password_digest, self._digest(password)))

    # -- requests -------------------------------------------------------------------------

    async def wait_logged_in(self) -> None:
        """Wait for the current session's first login attempt; raise if it failed."""
        while True:
            session = self._require_session()
            if session.videomanagers is not None:
                return
            if session.login_retry_at is not None and session.login_retry_at > trio.current_time():
                raise UpstreamUnavailable(
                    f"cannot log in: {session.last_error}; next attempt in "
                    + _in(session.login_retry_at - trio.current_time())
                )
            await session.changed.wait()

    async def get(self, ref: str | None = None, min_ttl: float = 0.0) -> TokenInfo:
        """A token for VideoManager `ref` (id or name; None: default) valid > min_ttl s."""
        waited_on: Entry | None = None
        while True:
            session = self._require_session()
            if session.videomanagers is None:
                await self.wait_logged_in()
                continue
            vm = session.resolve(ref)
            now = trio.current_time()
            entry = session.entries.get(vm.id) or self._add_entry(session, vm)
            entry.last_used = now
            if entry.valid_for(now) > min_ttl:
                return entry.info()
            if entry.blocked is not None:
                if now < entry.blocked_until:
                    raise entry.blocked
                entry.blocked = None
            if entry.lifetime is not None and min_ttl >= entry.lifetime:
                raise BadRequest(
                    f"min_ttl {min_ttl:g} s is not less than the lifetime the API gives "
                    f"tokens for {vm.name} ({entry.lifetime:.0f} s)"
                )
            if entry.retry_at is not None and entry.retry_at > now and (
                    waited_on is entry or entry.retry_at - now > RETRY_WAIT):
                # Backing off, and not about to try again (or we saw the try fail).
                raise UpstreamUnavailable(self._unavailable(entry, now, min_ttl))
            if waited_on is entry and entry.token is not None:
                # The attempt we waited for succeeded, yet the token is not enough.
                raise UpstreamUnavailable(
                    f"the new token for {vm.name} is valid for only "
                    f"{entry.valid_for(now):.1f} s, not more than min_ttl {min_ttl:g} s"
                )
            entry.want_ttl = max(entry.want_ttl or 0.0, min_ttl)
            changed = entry.changed
            entry.wake.set()
            await changed.wait()
            waited_on = entry

    def held(self, ref: str | None, min_ttl: float) -> TokenInfo | None:
        """What get(ref, min_ttl) would answer at once without waiting, or None if it would
        do more than hand out a token it holds (fetch, wait, refuse)."""
        session = self._session
        if session is None or session.blocked is not None or session.videomanagers is None:
            return None
        vm = session.find(ref) if ref is not None else session.by_id(session.default_id)
        entry = session.entries.get(vm.id) if vm is not None else None
        if entry is None:
            return None
        now = trio.current_time()
        if entry.valid_for(now) <= min_ttl:
            return None
        entry.last_used = now
        return entry.info()

    def invalidate(self, token: str, ref: str | None = None) -> bool:
        """Drop `token` if it is the current one (of `ref`, or of any VideoManager)."""
        session = self._session
        if session is None or session.videomanagers is None:
            return False
        if ref is not None:
            vm = session.resolve(ref)
            candidates: Iterable[Entry] = [e for e in [session.entries.get(vm.id)] if e]
        else:
            candidates = list(session.entries.values())
        for entry in candidates:
            if entry.token is not None and hmac.compare_digest(entry.token, token):
                now = trio.current_time()
                if now - entry.obtained_at < QUICK_INVALIDATION:
                    entry.quick_invalidations += 1
                else:
                    entry.quick_invalidations = 0
                log.info("token for %s reported as rejected; fetching a new one", entry.vm.name)
                entry.token = None
                entry.last_used = now
                if entry.quick_invalidations >= 2:
                    delay = self._backoff(entry.quick_invalidations - 2, None)
                    entry.retry_at = max(entry.retry_at or -math.inf, now + delay)
                    entry.last_error = (
                        f"the API rejected {entry.quick_invalidations} fresh tokens in a row"
                    )
                entry.wake.set()
                return True
        return False

    def list(self) -> list[dict[str, Any]]:
        """Every VideoManager of the user, with what we hold for it. No tokens."""
        session = self._session
        if session is None or session.videomanagers is None:
            return []
        now = trio.current_time()
        result = []
        for vm in session.videomanagers:
            entry = session.entries.get(vm.id)
            held = entry is not None and entry.valid_for(now) > 0
            item: dict[str, Any] = {
                "id": vm.id,
                "name": vm.name,
                "default": vm.id == session.default_id,
                "expires_at": entry.expires_at_wall if held and entry else None,
                "refreshed_at": entry.refreshed_at_wall if entry else None,
                "last_error": entry.last_error if entry else None,
            }
            result.append(item)
        return result

    def state(self) -> dict[str, Any]:
        """The session's state for `status`. No secrets."""
        session = self._session
        if session is None:
            return {"state": "logged_out", "username": None, "logged_in_at": None,
                    "last_error": None, "notices": []}
        if session.blocked is not None:
            state = "credentials_rejected" if isinstance(
                session.blocked, CredentialsRejected) else "not_logged_in"
        elif session.videomanagers is None:
            state = "logging_in" if session.login_retry_at is None else "upstream_unavailable"
        else:
            state = "logged_in"
        return {
            "state": state,
            "username": session.credentials.username,
            "logged_in_at": session.logged_in_at_wall,
            "last_error": session.blocked.message if session.blocked else session.last_error,
            "notices": list(session.notices),
        }

    # -- internals ------------------------------------------------------------------------

    def _require_session(self) -> Session:
        session = self._session
        if session is None:
            raise NotLoggedIn(
                "vm-tokend has no credentials: run `vm-token login`, or configure a "
                "username and password"
            )
        if session.blocked is not None:
            raise session.blocked
        return session

    def _unavailable(self, entry: Entry, now: float, min_ttl: float) -> str:
        what = "has expired" if entry.valid_for(now) <= 0 else (
            f"is valid for only {entry.valid_for(now):.0f} s (min_ttl {min_ttl:g} s)"
        )
        if entry.token is None and entry.lifetime is None:
            what = "could not be fetched"
        assert entry.retry_at is not None
        return (
            f"the token for {entry.vm.name} {what}: {entry.last_error}; "
            f"next attempt in {_in(entry.retry_at - now)}"
        )

    def _backoff(self, failures: int, retry_after: float | None) -> float:
        ceiling = min(self.max_backoff, BACKOFF_INITIAL * 2.0 ** min(failures, 32))
        delay = self._rng.uniform(0.0, ceiling)  # full jitter
        if retry_after is not None:
            delay = max(delay, retry_after)
        return delay

    def _refresh_at(self, grant: Grant) -> float:
        jitter = self._rng.uniform(-REFRESH_JITTER, REFRESH_JITTER)
        return grant.requested_at + max(MIN_REFRESH_INTERVAL,
                                        grant.lifetime * (REFRESH_AT + jitter))

    def _pin(self, session: Session) -> None:
        """Resolve the default and kept-warm VideoManagers for this session.

        The default is the configured one, else the one the login's token is for, else the
        first listed (the API's answer need not be consistent); `notices` say what did not
        fit, for `status`.
        """
        notices = []
        listed = session.videomanagers or ()
        default = None
        if self.default_videomanager:
            default = session.find(self.default_videomanager)
            if default is None:
                notices.append(f"default_videomanager {quote(self.default_videomanager)} is "
                               "not one of this user's VideoManagers")
        if default is None:
            default = session.by_id(session.login_videomanager)
        if default is None and listed:
            default = listed[0]
            if not self.default_videomanager:
                notices.append(
                    f"the API's login answer named VideoManager "
                    f"{quote(session.login_videomanager or '')}, which is not in the user's "
                    f"list; the default is the first listed, {default.name} ({default.id})")
        session.default_id = default.id if default else None
        session.pinned = {default.id} if default else set()
        for ref in self.videomanagers:
            vm = session.find(ref)
            if vm is None:
                notices.append(f"videomanagers: {quote(ref)} is not one of this user's "
                               "VideoManagers")
            else:
                session.pinned.add(vm.id)
        for notice in notices:
            if notice not in session.notices:
                log.warning("%s", notice)
        session.notices = notices
        for vm_id in session.pinned:
            found = session.by_id(vm_id)
            if vm_id not in session.entries and found is not None:
                self._add_entry(session, found)

    def _add_entry(self, session: Session, vm: VideoManagerRef,
                   grant: Grant | None = None) -> Entry:
        assert session.nursery is not None
        entry = Entry(vm, trio.current_time())
        if grant is not None:
            entry.take(grant, self._refresh_at(grant))
        session.entries[vm.id] = entry
        session.nursery.start_soon(self._maintain, session, entry)
        return entry

    async def _run_session(
        self, session: Session, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        with session.cancel_scope:
            async with trio.open_nursery() as nursery:
                session.nursery = nursery
                task_status.started()
                await self._first_login(session)
                await trio.sleep_forever()

    async def _first_login(self, session: Session) -> None:
        failures = 0
        while True:
            try:
                async with session.lock:
                    grant = await self._login(session)
            except Refused:
                session.notify()  # _login recorded why; wait for new credentials
                return
            except Exception as exc:  # TransientError, or a bug of ours met by odd input
                retry_after = exc.retry_after if isinstance(exc, upstream.TransientError) \
                    else None
                message = str(exc) if isinstance(exc, upstream.TransientError) \
                    else f"internal error ({type(exc).__name__})"
                delay = self._backoff(failures, retry_after)
                failures += 1
                session.last_error = message
                session.login_retry_at = trio.current_time() + delay
                log.warning("login failed: %s; next attempt in %s", message, _in(delay))
                session.notify()
                await trio.sleep_until(session.login_retry_at)
                continue
            break
        session.login_retry_at = None
        session.last_error = None
        self._pin(session)
        self._hand_over(session, grant)  # its VideoManager, if pinned, needs no refresh
        session.notify()

    async def _login(self, session: Session) -> Grant:
        """Log in (caller holds session.lock); records rejection on the session."""
        creds = session.credentials
        try:
            password = await creds.read_password()
        except PasswordUnavailable as exc:
            session.blocked = NotLoggedIn(f"cannot log in as {quote(creds.username)}: {exc}")
            log.error("%s", session.blocked.message)
            raise session.blocked from None
        session.password_digest = self._digest(password)
        try:
            grant = await _contained(self.backend.login(creds.username, password))
        except upstream.CredentialsRejected as exc:
            session.blocked = CredentialsRejected(
                f"{exc}; give new credentials with `vm-token login` or reload the daemon"
            )
            session.refresh_token = None
            log.error("%s", exc)
            raise session.blocked from None
        finally:
            del password
        if not grant.videomanagers:
            raise upstream.TransientError("the API listed no VideoManagers for this user")
        self._keep_refresh_token(session, grant)
        session.login_videomanager = grant.valid_for
        first = session.videomanagers is None
        session.set_videomanagers(grant.videomanagers)
        session.logged_in_at_wall = time.time()
        if first:
            log.info("logged in as %r; %d VideoManagers", creds.username,
                     len(grant.videomanagers))
        else:
            log.info("logged in again as %r", creds.username)
        return grant

    def _keep_refresh_token(self, session: Session, grant: Grant) -> None:
        if grant.refresh_token is None or grant.refresh_token == session.refresh_token:
            return  # none sent, or not rotated: ours still expires when it did
        session.refresh_token = grant.refresh_token
        session.refresh_expires_at = (
            grant.requested_at + grant.refresh_lifetime
            if grant.refresh_lifetime is not None else math.inf
        )

    async def _obtain(self, session: Session, vm_id: str) -> Grant:
        """A new access token for `vm_id`, logging in again when the refresh token is gone.

        _Paused while the session waits; a Retry-After pauses the whole session.
        """
        async with session.lock:
            if session.blocked is not None:
                raise session.blocked
            now = trio.current_time()
            if session.paused_until > now:
                raise _Paused(session.paused_until, session.pause_reason or "")
            try:
                return await self._obtain_now(session, vm_id)
            except upstream.TransientError as exc:
                if exc.retry_after is not None:
                    session.pause(trio.current_time() + exc.retry_after, str(exc))
                raise

    async def _obtain_now(self, session: Session, vm_id: str) -> Grant:
        if self._login_due(session, vm_id):
            grant = await self._login_again(session, vm_id)
            if grant is not None:
                return grant
        try:
            return await self._refresh(session, vm_id)
        except upstream.RefreshRejected as exc:
            log.info("%s; logging in again", exc)
            session.refresh_token = None
        grant = await self._login_again(session, vm_id)
        if grant is not None:
            return grant
        try:
            return await self._refresh(session, vm_id)
        except upstream.RefreshRejected as again:
            session.refresh_token = None
            raise upstream.TransientError(
                f"a fresh refresh token was rejected too: {again}") from None

    async def _login_again(self, session: Session, vm_id: str) -> Grant | None:
        """_login_for, with the session's backoff: a failed login pauses every
        VideoManager's attempts, so the next login waits instead of each trying its own."""
        try:
            grant = await self._login_for(session, vm_id)
        except upstream.TransientError as exc:
            delay = self._backoff(session.login_failures, exc.retry_after)
            session.login_failures += 1
            session.pause(trio.current_time() + delay, f"cannot log in again: {exc}")
            raise
        session.login_failures = 0
        return grant

    def _login_due(self, session: Session, vm_id: str) -> bool:
        """Whether to log in rather than refresh now.

        When there is no refresh token, or it expires within REFRESH_TOKEN_MARGIN. And one
        step earlier for the VideoManager a login gives a token for: if its refresh token
        would expire before that VideoManager's next refresh, a login now costs no more than
        the refresh would have — it brings this VideoManager's token too — while waiting
        would cost a login on top of another VideoManager's refresh.
        """
        if session.refresh_token is None:
            return True
        left = session.refresh_expires_at - trio.current_time()
        if left < REFRESH_TOKEN_MARGIN:
            return True
        entry = session.entries.get(vm_id)
        if vm_id != session.login_videomanager or entry is None or entry.lifetime is None:
            return False
        return left < entry.lifetime * (REFRESH_AT + REFRESH_JITTER) + REFRESH_TOKEN_MARGIN

    async def _login_for(self, session: Session, vm_id: str) -> Grant | None:
        """Log in; the grant if its token is for `vm_id`, else None (a refresh must follow).

        A login's access token is valid for one VideoManager; if we hold another's, it gets
        the fresh token rather than going to the API for one later.
        """
        grant = await self._login(session)
        if grant.valid_for == vm_id:
            return grant
        self._hand_over(session, grant)
        return None

    def _hand_over(self, session: Session, grant: Grant) -> None:
        """Give a login's token to the entry it is valid for, if we hold one in good
        standing (not backing off, not forbidden)."""
        entry = session.entries.get(grant.valid_for)
        if entry is not None and entry.retry_at is None and entry.blocked is None:
            entry.take(grant, self._refresh_at(grant))
            entry.wake.set()
            entry.notify()

    async def _refresh(self, session: Session, vm_id: str) -> Grant:
        if session.refresh_token is None:
            raise upstream.RefreshRejected("no refresh token")
        grant = await _contained(self.backend.refresh(session.refresh_token, vm_id))
        self._keep_refresh_token(session, grant)  # always the newest: it may rotate
        return grant

    def _idle_at(self, session: Session, entry: Entry) -> float:
        """When an unused entry is dropped: never for the default and kept-warm ones."""
        if entry.vm.id in session.pinned:
            return math.inf
        return entry.last_used + self.idle_timeout

    def _next_due(self, session: Session, entry: Entry, now: float) -> float:
        if session.blocked is not None or entry.blocked is not None:
            return math.inf  # only new credentials or a client's recheck revive it
        idle = self._idle_at(session, entry)
        if entry.retry_at is not None:
            return min(entry.retry_at, idle)
        if entry.token is None:
            return now
        if entry.want_ttl is not None and entry.valid_for(now) <= entry.want_ttl:
            return now
        return min(entry.refresh_at, idle)

    async def _maintain(self, session: Session, entry: Entry) -> None:
        """The one task that fetches tokens for `entry`, for as long as it is wanted."""
        while True:
            now = trio.current_time()
            due = self._next_due(session, entry, now)
            if due > now:
                with trio.move_on_at(due):
                    await entry.wake.wait()
                entry.wake = trio.Event()
                continue
            if now >= self._idle_at(session, entry):
                log.debug("dropping the idle token for %s", entry.vm.name)
                del session.entries[entry.vm.id]
                entry.token = None
                entry.notify()
                return
            await self._attempt(session, entry)

    async def _attempt(self, session: Session, entry: Entry) -> None:
        entry.retry_at = None
        try:
            grant = await self._obtain(session, entry.vm.id)
        except _Paused as paused:
            # Not a failure of this token's: it waits with the session, adding no backoff.
            entry.retry_at = paused.until
            entry.last_error = paused.reason
        except upstream.TransientError as exc:
            delay = self._backoff(entry.failures, exc.retry_after)
            entry.failures += 1
            entry.retry_at = trio.current_time() + delay
            entry.last_error = str(exc)
            log.warning("cannot refresh the token for %s: %s; next attempt in %s",
                        entry.vm.name, exc, _in(delay))
        except upstream.Forbidden as exc:
            entry.token = None
            entry.blocked = Forbidden(str(exc))
            entry.blocked_until = trio.current_time() + FORBIDDEN_RECHECK
            entry.last_error = str(exc)
            log.warning("%s", exc)
        except Refused as exc:
            entry.last_error = exc.message  # the session is blocked; clients hear why
        except Exception as exc:  # a bug of ours met by odd input: never the end of the daemon
            delay = self._backoff(entry.failures, None)
            entry.failures += 1
            entry.retry_at = trio.current_time() + delay
            entry.last_error = f"internal error ({type(exc).__name__})"
            log.error("internal error (%s) refreshing the token for %s; next attempt in %s",
                      type(exc).__name__, entry.vm.name, _in(delay))
        else:
            entry.take(grant, self._refresh_at(grant))
            log.debug("new token for %s, valid %.0f s", entry.vm.name, grant.lifetime)
        finally:
            entry.notify()


async def _contained(call: Awaitable[Grant]) -> Grant:
    """Await a backend call; whatever it raises that is not an UpstreamError becomes a
    TransientError that names only the exception's type (its text might hold a secret)."""
    try:
        return await call
    except upstream.UpstreamError:
        raise
    except Exception as exc:
        raise upstream.TransientError(
            f"unexpected failure talking to the API ({type(exc).__name__})") from None
