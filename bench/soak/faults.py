"""Faults switched on and off at random on each profile's stand-in, as the month has them.

The storm moves between the profiles every `STORM` seconds: while one profile's API is
hit, the other is calm (its clients must not notice, and its upstream calls are counted
against the refresh schedule). A fault lasts a second to `LONGEST`, and at least until it
has answered a request (within its storm); then the API is healthy for 5-25 s. The kinds:

    outage      503 on every auth request           5xx      502 with an HTML page
    429         429 with Retry-After: 2-30 s         429-bare 429 without Retry-After
    slow        answers after SLOW s, past the daemon's 15 s timeout, having taken effect
    lost        the request takes effect, its answer never comes (the connection closes)
    revoke      every access token issued so far is revoked (an instant event)
    expire      every refresh token issued so far is revoked (an instant event)
    end         every OpenID Connect session is ended (an instant event; Keycloak's sign-out)
    password    the password changes and the sessions end; the new one is written to the
                password file and the daemon reloaded 5-60 s later

Every answer a fault made is counted per kind (`answers`), and every Retry-After answered
is kept (`holds`) so the run can check that no call came while it held.
"""

from __future__ import annotations

import random
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TextIO

from bench.soak.ledger import Ledger, Window
from standin.server import LOST, Fault, StandIn

__all__ = ["FaultSwitch", "Mode", "run_faults"]

# Past the daemon's TOTAL_TIMEOUT (15 s): its request times out, the API's answer comes later.
SLOW = 16.0
LONGEST = 90.0
STORM = 150.0  # s one profile's API is hit before the other's is
# Nothing starts in the last seconds of a storm, and no fault outlasts it: a revocation's
# replacements, a Retry-After and max_backoff then end within the first minute of the
# profile's calm, and its calm stretch is long enough to count calls in (90 s).
QUIET_END = 30.0
AUTH_GRANTS = frozenset({"login", "refresh", "oidc_login", "oidc_refresh"})
# Instant events, and the profiles they make sense for.
EVENTS = ("revoke", "expire", "end", "password")
KINDS = ("outage", "5xx", "429", "429-bare", "slow", "lost", *EVENTS)
WEIGHTS = (3, 2, 3, 2, 1, 2, 2, 1, 2, 1)


@dataclass
class Mode:
    kind: str
    retry_after: int = 0


@dataclass
class FaultSwitch:
    """Installed as a stand-in's `faults` and `rewrite`: answers per the mode now on."""

    standin: StandIn
    ledger: Ledger
    mode: Mode | None = None
    window: Window | None = None  # the mode's, told when it first answers
    answers: Counter[str] = field(default_factory=Counter)
    holds: list[tuple[float, int]] = field(default_factory=list)  # (monotonic, Retry-After)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def install(self) -> FaultSwitch:
        self.standin.faults = self.pick
        self.standin.rewrite = self.rewrite
        return self

    def on(self, mode: Mode, window: Window) -> None:
        self.window, self.mode = window, mode

    def off(self) -> None:
        self.mode = None

    def _answering(self, mode: Mode) -> None:
        with self.lock:
            self.answers[mode.kind] += 1
        if self.window is not None:
            self.ledger.answered(self.window)

    def pick(self, endpoint: str) -> Fault | None:
        mode = self.mode
        if mode is None or mode.kind == "lost":
            return None
        self._answering(mode)
        if mode.kind == "outage":
            return Fault(503)
        if mode.kind == "5xx":
            return Fault(502, body="html")
        if mode.kind == "429-bare":
            return Fault(429)
        if mode.kind == "429" and endpoint in AUTH_GRANTS:  # the grants' hold is checked
            with self.lock:
                self.holds.append((time.monotonic(), mode.retry_after))
            return Fault(429, retry_after=str(mode.retry_after))
        if mode.kind == "slow":
            time.sleep(SLOW)  # then answered as usual: the request takes effect
        return None

    def rewrite(self, endpoint: str, answer: dict[str, Any]) -> Any:
        mode = self.mode
        if mode is not None and mode.kind == "lost" and endpoint in AUTH_GRANTS:
            self._answering(mode)
            return LOST
        return answer


@dataclass
class Api:
    """What the fault loop needs of one profile's API."""

    profile: str
    switch: FaultSwitch
    oidc: bool
    set_password: Callable[[str], None]  # writes the password file and reloads the daemon


def run_faults(apis: list[Api], ledger: Ledger, rng: random.Random, stop: threading.Event,
               injected: Counter[str], log: TextIO) -> None:
    """Until `stop`: a healthy pause, then one fault on the stormy profile's API, and
    again."""
    began = time.monotonic()
    while not stop.wait(rng.uniform(5, 25)):
        phase, into = divmod(time.monotonic() - began, STORM)
        if STORM - into < QUIET_END:
            continue  # what starts now would spill into the other's calm stretch
        api = apis[int(phase) % len(apis)]
        ends_by = time.monotonic() + STORM - into  # the storm moves on then
        kind = rng.choices(KINDS, WEIGHTS)[0]
        if kind == "end" and not api.oidc:
            kind = "expire"
        injected[kind] += 1
        print(f"{datetime.now().time()} {kind} on {api.profile}", file=log, flush=True)
        standin = api.switch.standin
        if kind in ("revoke", "expire", "end"):
            # noted first: no client may see a revoked token before the ledger knows
            ledger.event(api.profile, kind, kills=kind != "expire")
            {"revoke": standin.revoke_access_tokens, "expire": standin.expire_refresh_tokens,
             "end": standin.end_sessions}[kind]()
            continue
        # a long one now and then, most of them short
        duration = min(LONGEST, rng.expovariate(1 / 15) + 1, ends_by - time.monotonic())
        window = ledger.fault_on(api.profile, kind)
        if kind == "password":
            _change_password(api, standin, ledger, rng, stop, window, ends_by)
            continue
        mode = Mode(kind, rng.randint(2, 30) if kind == "429" else 0)
        api.switch.on(mode, window)
        stop.wait(duration)
        # a fault no request met tested nothing: it stays on until one does (the next
        # refresh is at most 40 s away), or LONGEST
        while window.first is None and time.monotonic() < min(window.start + LONGEST,
                                                               ends_by) \
                and not stop.wait(0.5):
            pass
        api.switch.off()
        ledger.fault_off(window, after=SLOW if kind == "slow" else mode.retry_after)
        print(f"{datetime.now().time()} {kind} ends", file=log, flush=True)


def _change_password(api: Api, standin: StandIn, ledger: Ledger, rng: random.Random,
                     stop: threading.Event, window: Window, ends_by: float) -> None:
    """The user changes the password: the provider ends the sessions (refresh tokens die),
    so the daemon's next login is refused; the new password reaches it with a reload."""
    # noted first; on OIDC the sessions end, and with them every access token
    ledger.event(api.profile, "password", kills=api.oidc)
    standin.password = secrets.token_urlsafe(12)
    standin.expire_refresh_tokens()
    if api.oidc:
        standin.end_sessions()
    stop.wait(max(1.0, min(rng.uniform(5, 60), ends_by - time.monotonic())))
    ledger.fault_off(window)  # before the reload: its login is the first good one
    api.set_password(standin.password)
