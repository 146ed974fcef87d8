"""What the soak saw, and the invariants it checks from outside, as a user would.

Every client writes here: what it asked for, what it got, and what the API said of the
token it got. The fault switch writes when a fault began and ended. Whether a failure was
a true one is decided from those times alone:

- a token the API refuses is a broken promise unless it was revoked (by an injected
  event, after it was issued) and nobody had reported it yet — the daemon cannot know of a
  revocation before a client tells it;
- a token with less than the `min_ttl` asked for, or whose `expires_at` is off by more than
  `EXPIRY_SLACK`, is a broken promise;
- an error is a true one only while the profile's API fails, or until `max_backoff` +
  `SLACK` after it healed (a Retry-After or a slow answer still in flight adds its time).

All times are `time.monotonic()`, except a token's `exp`, which is the wall clock's.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

__all__ = ["Ledger", "Window"]

# Between a heal and the moment every client must be served, on top of max_backoff: a
# client's own round trip and the scheduling of 30 clients and two servers on two cores.
# A guess, measured generous: the simulated month (no scheduling noise) uses 1 s.
SLACK = 3.0
# How far a token's `expires_at` (the daemon's) may be from the API's `exp`: `exp` is in
# whole seconds, and the daemon dates a token by when the answer came.
EXPIRY_SLACK = 5.0
# The API's `exp` is a whole second, rounded down when the token was issued.
TTL_SLACK = 1.0
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

    def healthy_from(self, max_backoff: float) -> float:
        end = self.end if self.end is not None else float("inf")
        return end + self.after + max_backoff + SLACK


@dataclass
class Ledger:
    max_backoff: float
    lock: threading.Lock = field(default_factory=threading.Lock)
    windows: list[Window] = field(default_factory=list)
    # (time, profile, kind): revocations and ended sessions, which make issued tokens die
    events: list[tuple[float, str, str]] = field(default_factory=list)
    reported: dict[str, float] = field(default_factory=dict)  # token -> when reported
    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)  # (client, code)
    broken: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    tokens_checked: int = 0
    revoked_unreported: int = 0  # refused by the API, excused: revoked, not yet reported
    calm_checked: int = 0  # calm stretches whose upstream calls were counted

    # -- what happened --------------------------------------------------------------------

    def fault_on(self, profile: str, kind: str) -> Window:
        window = Window(profile, kind, time.monotonic())
        with self.lock:
            self.windows.append(window)
        return window

    def fault_off(self, window: Window, after: float = 0.0) -> None:
        with self.lock:
            window.end, window.after = time.monotonic(), after

    def event(self, profile: str, kind: str) -> None:
        with self.lock:
            self.events.append((time.monotonic(), profile, kind))

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
        its API overlapped it or ended less than max_backoff (+ its own time) before."""
        with self.lock:
            return not any(
                w.profile == profile and w.start <= ended
                and started < w.healthy_from(self.max_backoff)
                for w in self.windows)

    def refused_is_excused(self, profile: str, token: str, issued_at: float,
                           started: float) -> bool:
        """A token the API refused: excused only if it was revoked after it was issued
        (`issued_at`, wall clock) and nobody had reported it before the request began."""
        with self.lock:
            reported = self.reported.get(token)
            if reported is not None and reported < started:
                return False
            wall_offset = time.time() - time.monotonic()
            return any(p == profile and t + wall_offset >= issued_at - TTL_SLACK
                       for t, p, _ in self.events)

    def check_token(self, client: str, profile: str, vm: str, min_ttl: float, token: str,
                    claims: dict[str, float], accepted: bool, started: float,
                    expires_at: float | None = None) -> bool:
        """Judge one token handed out (`claims` the API's own `exp`/`iat` of it); True if
        the client may use it, False if the API refused it (the client reports it)."""
        now_wall = time.time()
        with self.lock:
            self.tokens_checked += 1
        exp = claims.get("exp", 0.0)
        asked = now_wall - (time.monotonic() - started)  # when the client asked, wall
        if exp - asked < min_ttl - TTL_SLACK:
            self.violate("min-ttl", f"{client} {profile}/{vm}: asked for {min_ttl:g} s, got "
                         f"a token valid {exp - asked:.1f} s more")
        if expires_at is not None and abs(expires_at - exp) > EXPIRY_SLACK:
            self.violate("expires-at", f"{client} {profile}/{vm}: expires_at "
                         f"{expires_at - exp:+.1f} s off the API's")
        if accepted:
            return True
        if exp <= asked:
            self.violate("never-a-dead-token", f"{client} {profile}/{vm}: expired "
                         f"{asked - exp:.1f} s before it was handed out")
        elif self.refused_is_excused(profile, token, claims.get("iat", 0.0), started):
            with self.lock:
                self.revoked_unreported += 1
        else:
            self.violate("never-a-dead-token", self._why_refused(
                client, profile, vm, token, claims, started, now_wall))
        return False

    def _why_refused(self, client: str, profile: str, vm: str, token: str,
                     claims: dict[str, float], started: float, now_wall: float) -> str:
        """The times that matter for a refused token, relative to when it was asked for."""
        asked = now_wall - (time.monotonic() - started)
        with self.lock:
            reported = self.reported.get(token)
            events = [f"{kind} at {t - started:+.2f} s" for t, p, kind in self.events
                      if p == profile and abs(t - started) < 120]
        return (f"{client} {profile}/{vm}: refused by the API; issued at "
                f"{claims.get('iat', 0) - asked:+.0f} s, expires at "
                f"{claims.get('exp', 0) - asked:+.1f} s, checked at {now_wall - asked:+.2f} s"
                + (f", reported at {reported - started:+.2f} s" if reported else
                   ", never reported")
                + f"; {', '.join(events) or 'no revocation'} (times from when it was asked)")

    def judge_error(self, client: str, profile: str, code: str, started: float) -> None:
        """A request that failed: counted, and broken if the API was healthy enough."""
        self.outcome(client, code)
        ended = time.monotonic()
        if self.must_serve(profile, started, ended):
            self.violate("served-once-healthy",
                         f"{client} {profile}: {code} after {ended - started:.1f} s, "
                         f"the API healthy for long enough")
