"""One access token's state machine: refresh ahead of time, single flight, backoff, idle.

A Slot holds one token and runs one task that alone fetches it: at REFRESH_AT of its
lifetime, at once when it is missing or a client needs a fresher one, and after a failure
when its backoff has passed. Clients never fetch: they wake the task and wait for the
attempt it makes, so any number of them cause one upstream request. What fetching means —
a refresh, a login, for which VideoManager — is the session's business (`fetch`).
"""

from __future__ import annotations

import hmac
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

import trio

from vm_token.errors import BadRequest, Forbidden, UpstreamUnavailable
from vm_token.errors import DaemonError as Refused

from .. import upstream
from ..upstream.base import Grant, VideoManagerRef
from .timing import Timing, seconds

__all__ = ["Paused", "Slot", "Superseded", "TokenInfo"]

log = logging.getLogger("vm_tokend.keeper")

# After a 403 we tell clients "forbidden" without asking the API again for this long: rights
# change rarely, and a script in a loop must not turn into a request storm. A guess.
FORBIDDEN_RECHECK: Final = 60.0
# A token reported as rejected this soon after we got it suggests the API rejects what we
# fetch; from the second such token in a row, replacements back off like failures.
QUICK_INVALIDATION: Final = 10.0
# A client asking for a token we do not have waits for an attempt due this soon rather
# than hearing "next attempt in 1 s"; below every client's default timeout (5 s). A guess.
RETRY_WAIT: Final = 3.0


@dataclass(frozen=True, slots=True, weakref_slot=True)  # the server caches replies by it
class TokenInfo:
    token: str
    videomanager: VideoManagerRef
    expires_at: float  # Unix seconds

    def __repr__(self) -> str:
        return f"TokenInfo(videomanager={self.videomanager!r}, expires_at={self.expires_at})"


class Paused(Exception):
    """The session waits (a Retry-After, a failed re-login): no upstream call until then."""

    def __init__(self, until: float, reason: str) -> None:
        super().__init__(reason)
        self.until = until
        self.reason = reason


# A change of the wall clock against the boot clock by more than this is a step (NTP, a
# person), after which the `expires_at` clients get (wall clock) moves with it; less is
# drift, and harmless. The boot clock, not trio's: trio's stops while the machine sleeps,
# the wall clock and the token's life go on.
WALL_STEP: Final = 1.0


def boot_clock() -> float:
    """Seconds since boot, suspends included (Linux); elsewhere the monotonic clock."""
    try:
        return time.clock_gettime(time.CLOCK_BOOTTIME)
    except (AttributeError, OSError):
        return time.monotonic()


class Superseded(Exception):  # noqa: N818 - not an error: a fetch that is not needed now
    """While the fetch waited for the session, the slot was given a token (a login's)."""


class Slot:
    """One token and the task that keeps it fresh."""

    def __init__(
        self,
        label: str,
        *,
        fetch: Callable[[Slot], Awaitable[Grant]],
        timing: Timing,
        idle_at: Callable[[Slot], float],
    ) -> None:
        self.label = label  # "Marketing", or what one token covers: for messages
        self._fetch = fetch  # raises TransientError, Forbidden, Paused, Refused
        self._timing = timing
        self._idle_at = idle_at  # when the session lets an unused token go (inf: never)
        self.token: str | None = None
        self.lifetime: float | None = None
        self.obtained_at = -math.inf
        self.expires_at = -math.inf  # trio clock
        self.expires_at_wall: float | None = None
        self._wall_offset = 0.0  # time.time() - boot_clock(), when expires_at_wall was told
        self.refresh_at = math.inf
        self.refreshed_at_wall: float | None = None
        self.last_error: str | None = None
        self.failures = 0
        self.retry_at: float | None = None  # set while backing off
        self.blocked: Refused | None = None  # a 403: answered without asking until...
        self.blocked_until = -math.inf
        self.quick_invalidations = 0
        # When a client last reported our token rejected: a grant asked for before then
        # is not taken (see take).
        self.reported_at = -math.inf
        self.want_ttl: float | None = None  # set by a client waiting for a fresher token
        self.last_used = trio.current_time()
        self.dropped = False
        self._infos: dict[str, TokenInfo] = {}  # per VideoManager, made once per token
        self.wake = trio.Event()
        self.changed = trio.Event()
        self.on_change: Callable[[], None] | None = None  # what status shows changed

    # -- what clients see -------------------------------------------------------------

    def valid_for(self, now: float) -> float:
        return self.expires_at - now if self.token is not None else -math.inf

    def info(self, vm: VideoManagerRef) -> TokenInfo:
        """The current token as `get` answers it for `vm` (one object per token and vm)."""
        assert self.token is not None and self.expires_at_wall is not None
        offset = time.time() - boot_clock()
        if abs(offset - self._wall_offset) > WALL_STEP:
            # The wall clock stepped: clients count expires_at on theirs.
            self.expires_at_wall += offset - self._wall_offset
            self._wall_offset, self._infos = offset, {}
        info = self._infos.get(vm.id)
        if info is None:
            info = self._infos[vm.id] = TokenInfo(self.token, vm, self.expires_at_wall)
        return info

    def ready(self, min_ttl: float, waited: bool) -> bool:
        """True if the token is valid more than min_ttl s; False if the client should wait
        for the next attempt; raises what to tell it otherwise. `waited`: it just did."""
        now = trio.current_time()
        self.last_used = now
        if self.valid_for(now) > min_ttl:
            return True
        if self.blocked is not None:
            if now < self.blocked_until:
                raise self.blocked
            self.blocked = None
        if self.lifetime is not None and min_ttl >= self.lifetime:
            raise BadRequest(
                f"min_ttl {min_ttl:g} s is not less than the lifetime the API gives "
                f"tokens for {self.label} ({self.lifetime:.0f} s)"
            )
        if self.retry_at is not None and self.retry_at > now and (
                waited or self.retry_at - now > RETRY_WAIT):
            # Backing off, and not about to try again (or we saw the try fail).
            raise UpstreamUnavailable(self._unavailable(now, min_ttl))
        if waited and self.token is not None:
            # The attempt we waited for succeeded, yet the token is not enough.
            raise UpstreamUnavailable(
                f"the new token for {self.label} is valid for only "
                f"{self.valid_for(now):.1f} s, not more than min_ttl {min_ttl:g} s"
            )
        return False

    async def wait_attempt(self, min_ttl: float) -> None:
        """Ask the task for a token valid more than min_ttl s; wait for its next attempt."""
        self.want_ttl = max(self.want_ttl or 0.0, min_ttl)
        changed = self.changed
        self.wake.set()
        await changed.wait()

    def invalidate(self, token: str) -> bool:
        """Drop `token` if it is the current one; the task fetches a new one."""
        if self.token is None or not hmac.compare_digest(self.token, token):
            return False
        now = trio.current_time()
        if now - self.obtained_at < QUICK_INVALIDATION:
            self.quick_invalidations += 1
        else:
            self.quick_invalidations = 0
        log.info("token for %s reported as rejected; fetching a new one", self.label)
        self._forget()
        self.reported_at = now
        self.last_used = now
        if self.quick_invalidations >= 2:
            delay = self._timing.backoff(self.quick_invalidations - 2, None)
            self.retry_at = max(self.retry_at or -math.inf, now + delay)
            self.last_error = f"the API rejected {self.quick_invalidations} fresh tokens in a row"
        self.wake.set()
        return True

    def take(self, grant: Grant) -> bool:
        """Hold the token of `grant` from now on: not if the slot was let go, nor if it
        was asked for before a client reported our token rejected — what killed that one
        (its session's end) may have killed this one on its way; the task asks again."""
        if self.dropped or grant.requested_at < self.reported_at:
            return False
        if self.token is not None:
            # The token it replaces was not reported as rejected: the run of quickly
            # rejected tokens, if any, is broken.
            self.quick_invalidations = 0
        self._infos = {}
        self.token = grant.access_token
        self.lifetime = grant.lifetime
        self.obtained_at = grant.requested_at
        self.expires_at = grant.requested_at + grant.lifetime
        self._wall_offset = time.time() - boot_clock()
        self.expires_at_wall = time.time() + (self.expires_at - trio.current_time())
        self.refresh_at = self._timing.refresh_at(grant)
        self.refreshed_at_wall = time.time()
        self.last_error = None
        self.failures = 0
        self.retry_at = None
        self.blocked = None
        self.want_ttl = None
        self.wake.set()
        self.notify()
        return True

    def drop(self) -> None:
        """Forget the token for good (the session ended); wake whoever waits."""
        self.dropped = True
        self._forget()
        self.notify()

    def notify(self) -> None:
        """Wake every client waiting on this slot (a fresh Event for the next round)."""
        self.changed.set()
        self.changed = trio.Event()
        if self.on_change is not None:
            self.on_change()

    @property
    def in_good_standing(self) -> bool:
        """Not backing off, not forbidden: a token handed over may be taken."""
        return self.retry_at is None and self.blocked is None

    def _forget(self) -> None:
        self.token = None
        self._infos = {}

    def _unavailable(self, now: float, min_ttl: float) -> str:
        what = "has expired" if self.valid_for(now) <= 0 else (
            f"is valid for only {self.valid_for(now):.0f} s (min_ttl {min_ttl:g} s)"
        )
        if self.token is None and self.lifetime is None:
            what = "could not be fetched"
        retry_at = self.retry_at if self.retry_at is not None else now
        return (f"the token for {self.label} {what}: {self.last_error}; "
                f"next attempt in {seconds(retry_at - now)}")

    # -- the task -----------------------------------------------------------------------

    def wanted(self, now: float) -> bool:
        """Whether a fetch is still wanted (the session asks before it calls upstream)."""
        return (self.token is None or now >= self.refresh_at
                or (self.want_ttl is not None and self.valid_for(now) <= self.want_ttl))

    def _next_due(self, now: float, suspended: bool) -> float:
        if suspended or self.blocked is not None:
            return math.inf  # only new credentials or a client's recheck revive it
        idle = self._idle_at(self)
        if self.retry_at is not None:
            return min(self.retry_at, idle)
        if self.token is None:
            return now
        if self.want_ttl is not None and self.valid_for(now) <= self.want_ttl:
            return now
        return min(self.refresh_at, idle)

    async def run(self, suspended: Callable[[], bool]) -> None:
        """Keep the token fresh until the slot is idle past its session's limit.
        `suspended()`: the session cannot fetch now (its credentials were refused)."""
        while not self.dropped:
            now = trio.current_time()
            due = self._next_due(now, suspended())
            if due > now:
                with trio.move_on_at(due):
                    await self.wake.wait()
                self.wake = trio.Event()
                continue
            if now >= self._idle_at(self):
                log.debug("dropping the idle token for %s", self.label)
                self.drop()
                return
            await self._attempt()

    async def _attempt(self) -> None:
        self.retry_at = None
        try:
            grant = await self._fetch(self)
        except Superseded:
            pass  # the token came another way (a login brought it): nothing to do
        except Paused as paused:
            # Not a failure of this token's: it waits with the session, adding no backoff.
            self.retry_at = paused.until
            self.last_error = paused.reason
        except upstream.TransientError as exc:
            delay = self._back_off(str(exc), exc.retry_after)
            log.warning("cannot refresh the token for %s: %s; next attempt in %s",
                        self.label, exc, seconds(delay))
        except upstream.Forbidden as exc:
            self._forget()
            self.blocked = Forbidden(str(exc))
            self.blocked_until = trio.current_time() + FORBIDDEN_RECHECK
            self.last_error = str(exc)
            log.warning("%s", exc)
        except Refused as exc:
            self.last_error = exc.message  # the session is blocked; clients hear why
        except Exception as exc:  # a bug of ours met by odd input: never the end of the daemon
            delay = self._back_off(f"internal error ({type(exc).__name__})", None)
            log.error("internal error (%s) refreshing the token for %s; next attempt in %s",
                      type(exc).__name__, self.label, seconds(delay))
        else:
            if self.take(grant):
                log.debug("new token for %s, valid %.0f s", self.label, grant.lifetime)
        finally:
            self.notify()

    def _back_off(self, error: str, retry_after: float | None) -> float:
        delay = self._timing.backoff(self.failures, retry_after)
        self.failures += 1
        self.retry_at = trio.current_time() + delay
        self.last_error = error
        return delay

    def describe(self, now: float) -> dict[str, object]:
        """What `list` says of this token. No secret."""
        held = self.valid_for(now) > 0
        return {
            "expires_at": self.expires_at_wall if held else None,
            "refreshed_at": self.refreshed_at_wall,
            "last_error": self.last_error,
        }
