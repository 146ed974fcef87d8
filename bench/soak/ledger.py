"""What the soak saw, and the invariants it checks from outside, as a user would.

Every client writes here: what it asked for, what it got and when, and what the API said
of the token it got. The fault switch writes when a fault began to answer and when it
ended, and when a revocation killed tokens. Whether a failure was a true one is decided
from those times alone:

- a token is judged at the moment the client received it: it must be valid then for at
  least the `min_ttl` asked for, and its `expires_at` within `EXPIRY_SLACK` of the API's;
- a token the API then refuses is a broken promise unless it was killed by a revocation
  (an injected event that kills access tokens, after it was issued) that nobody had
  reported before it was asked for — the daemon cannot know before a client tells it —
  or it expired between its hand-out and the check (`expired_in_transit`);
- an error is a true one only if its code is one a fault explains, and only while the
  profile's API fails or until `max_backoff` + `SLACK` after it healed (a Retry-After or
  a slow answer still in flight adds its time); a request that had to be served must be
  served within `PROMPT`, so one profile's faults delay no other's clients.

All times are `time.monotonic()`, except a token's `iat`/`exp`, which are the wall clock's.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

__all__ = ["EXCUSABLE", "Ledger", "Window"]

# Between a heal and the moment every client must be served, on top of max_backoff: a
# client's own round trip and the scheduling of 30 clients and two servers on two cores.
# A guess, measured generous: the simulated month (no scheduling noise) uses 1 s.
SLACK = 3.0
# How far a token's `expires_at` (the daemon's) may be from the API's `exp`: `exp` is in
# whole seconds, and the daemon dates a token by when the answer came.
EXPIRY_SLACK = 5.0
# The API's `exp` is a whole second, rounded down when the token was issued.
TTL_SLACK = 1.0
# How long a request that had to be served may take, process start-up (`vm-token`, git,
# curl) included, on a busy machine; the daemon answers such a one in milliseconds.
PROMPT = 3.0
# A client process (`vm-token`, git) is timed when it has exited, some time after the
# daemon's answer: on a busy machine, up to about a second more.
EXIT_SLACK = 1.0
# The error codes a fault can explain (`vm-token` ends its message with the code); anything
# else (bad_request, unknown_videomanager, internal, a timeout, an exit without a code) is
# broken whenever it happens.
EXCUSABLE = frozenset({
    "upstream_unavailable", "credentials_rejected", "not_logged_in", "login_required",
    "upstream_timeout",
})
# How many examples of each broken invariant the report shows.
EXAMPLES = 3


@dataclass
class Window:
    """A fault on one profile's API, from `start` to `end` (None: still on)."""

    profile: str
    kind: str
    start: float
    end: float | None = None
    # After `end`, how long the API is still not healthy: answers slower than the timeout
    # still arrive, a Retry-After still holds.
    after: float = 0.0
    # When the fault first answered a request (None: it never did, so it excuses nothing);
    # a password change takes effect at once.
    first: float | None = None

    def healthy_from(self, max_backoff: float) -> float:
        end = self.end if self.end is not None else float("inf")
        return end + self.after + max_backoff + SLACK


@dataclass
class Ledger:
    max_backoff: float
    lock: threading.Lock = field(default_factory=threading.Lock)
    windows: list[Window] = field(default_factory=list)
    # (time, profile): revocations that killed every access token issued before them
    kills: list[tuple[float, str]] = field(default_factory=list)
    # (time, profile, kind): every instant event, for the calm stretches and the report
    events: list[tuple[float, str, str]] = field(default_factory=list)
    reported: dict[str, float] = field(default_factory=dict)  # token -> when reported
    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)  # (client, code)
    broken: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    tokens_checked: int = 0
    revoked_unreported: int = 0  # refused by the API, excused: revoked, not yet reported
    expired_in_transit: int = 0  # valid when handed out, expired when tried
    calm_checked: Counter[str] = field(default_factory=Counter)  # per profile

    # -- what happened --------------------------------------------------------------------

    def fault_on(self, profile: str, kind: str) -> Window:
        window = Window(profile, kind, time.monotonic())
        if kind == "password":
            window.first = window.start
        with self.lock:
            self.windows.append(window)
        return window

    def answered(self, window: Window) -> None:
        """The fault answered a request (the first time counts)."""
        if window.first is None:
            window.first = time.monotonic()

    def fault_off(self, window: Window, after: float = 0.0) -> None:
        with self.lock:
            window.end, window.after = time.monotonic(), after

    def event(self, profile: str, kind: str, *, kills: bool) -> None:
        """An instant event; `kills`: every access token issued so far dies with it. Noted
        before it happens, so no client sees its effect before the ledger knows of it."""
        with self.lock:
            now = time.monotonic()
            self.events.append((now, profile, kind))
            if kills:
                self.kills.append((now, profile))

    def report(self, token: str) -> None:
        with self.lock:
            self.reported.setdefault(token, time.monotonic())

    def outcome(self, client: str, code: str) -> None:
        with self.lock:
            self.outcomes[client, code] += 1

    def violate(self, invariant: str, detail: str) -> None:
        with self.lock:
            self.broken[invariant] += 1
            shown = self.examples.setdefault(invariant, [])
            if len(shown) < EXAMPLES:
                shown.append(detail)
        if len(shown) == 1 and self.broken[invariant] == 1:  # the first: say it now
            print(f"soak: BROKEN {invariant}: {detail}", file=sys.stderr)

    # -- the judgements -------------------------------------------------------------------

    def must_serve(self, profile: str, started: float, ended: float) -> bool:
        """Whether a request for `profile` in [started, ended] had to succeed: no fault of
        its API answered during it or less than max_backoff (+ its own time) before."""
        with self.lock:
            return not any(
                w.profile == profile and w.first is not None and w.first <= ended
                and started < w.healthy_from(self.max_backoff)
                for w in self.windows)

    def killed_since(self, profile: str, since: float) -> bool:
        """Whether a revocation of `profile` came at or after `since` (monotonic)."""
        with self.lock:
            return any(p == profile and t >= since for t, p in self.kills)

    def refused_is_excused(self, profile: str, token: str, issued_at: float,
                           started: float) -> bool:
        """A token the API refused: excused only if a revocation came after it was issued
        (`issued_at`, wall clock) and nobody had reported it before the request began."""
        with self.lock:
            reported = self.reported.get(token)
        if reported is not None and reported < started:
            return False
        wall_offset = time.time() - time.monotonic()
        return self.killed_since(profile, issued_at - TTL_SLACK - wall_offset)

    def check_token(self, client: str, profile: str, vm: str, min_ttl: float, token: str,
                    claims: dict[str, float], accepted: bool, started: float,
                    received: float, expires_at: float | None = None, *,
                    exit_time: bool = False) -> bool:
        """Judge one token handed out at `received` (monotonic) to a request begun at
        `started`, `claims` the API's own `exp`/`iat` of it; True if the client may use it,
        False if the API refused it (the client reports it)."""
        now_mono, now_wall = time.monotonic(), time.time()
        with self.lock:
            self.tokens_checked += 1
        exp = claims.get("exp", 0.0)
        handed = now_wall - (now_mono - received)  # when the client got it, wall clock
        slack = TTL_SLACK + (EXIT_SLACK if exit_time else 0.0)
        if exp - handed < min_ttl - slack:
            self.violate("min-ttl", f"{client} {profile}/{vm}: asked for {min_ttl:g} s, got "
                         f"a token valid {exp - handed:.1f} s more")
        if expires_at is not None and abs(expires_at - exp) > EXPIRY_SLACK:
            self.violate("expires-at", f"{client} {profile}/{vm}: expires_at "
                         f"{expires_at - exp:+.1f} s off the API's")
        if accepted:
            return True
        if exp <= handed - slack:
            self.violate("never-a-dead-token", f"{client} {profile}/{vm}: expired "
                         f"{handed - exp:.1f} s before it was handed out")
        elif exp <= now_wall:
            with self.lock:
                self.expired_in_transit += 1
        elif self.refused_is_excused(profile, token, claims.get("iat", 0.0), started):
            with self.lock:
                self.revoked_unreported += 1
        else:
            self.violate("never-a-dead-token", self._why_refused(
                client, profile, vm, token, claims, handed, now_wall))
        return False

    def _why_refused(self, client: str, profile: str, vm: str, token: str,
                     claims: dict[str, float], handed: float, now_wall: float) -> str:
        """The times that matter for a refused token, from when it was handed out."""
        offset = time.time() - time.monotonic()
        with self.lock:
            reported = self.reported.get(token)
            events = [f"{kind} at {t + offset - handed:+.2f} s" for t, p, kind in self.events
                      if p == profile and abs(t + offset - handed) < 120]
        return (f"{client} {profile}/{vm}: refused by the API; issued at "
                f"{claims.get('iat', 0) - handed:+.0f} s, expires at "
                f"{claims.get('exp', 0) - handed:+.1f} s, checked at {now_wall - handed:+.2f} s"
                + (f", reported at {reported + offset - handed:+.2f} s" if reported else
                   ", never reported")
                + f"; {', '.join(events) or 'no event'} (times from its hand-out)")

    def judge_error(self, client: str, profile: str, code: str, started: float,
                    excusable: bool | None = None) -> None:
        """A request that failed: counted, and broken unless a fault explains it."""
        self.outcome(client, code)
        ended = time.monotonic()
        if excusable is None:
            excusable = code in EXCUSABLE
        if not excusable or self.must_serve(profile, started, ended):
            self.violate("served-once-healthy",
                         f"{client} {profile}: {code} after {ended - started:.1f} s"
                         + ("" if excusable else " (no fault explains that code)"))

    def judge_served(self, client: str, profile: str, started: float, ended: float) -> None:
        """A request that succeeded (in [started, ended]): counted, and broken if it had to
        be served at once and was not."""
        self.outcome(client, "ok")
        if ended - started > PROMPT and self.must_serve(profile, started, ended):
            self.violate("no-delay-when-healthy", f"{client} {profile}: served after "
                         f"{ended - started:.1f} s, its API healthy")
