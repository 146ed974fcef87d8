"""A simulated month on trio's MockClock (issue 19): tests/simulation.py.

SOAK_SEED replays a run (a failure prints its seed and the last events), SOAK_DAYS makes
it longer: `SOAK_SEED=7 SOAK_DAYS=90 .venv/bin/python -m pytest tests/test_month.py`.
The broken variants show the run can fail, each for its own reason: a soak that cannot
fail proves nothing.
"""

from __future__ import annotations

import math
import os

import pytest

from tests.simulation import DAY, HOUR, Violation, run_month
from vm_tokend.keeper import session as session_module
from vm_tokend.keeper.legacy_session import LegacySession
from vm_tokend.keeper.slot import Slot
from vm_tokend.upstream import base as upstream

SEED = int(os.environ.get("SOAK_SEED", "20261203"))
DAYS = float(os.environ.get("SOAK_DAYS", "30"))

pytestmark = pytest.mark.timeout(120)


def test_a_month_of_faults_breaks_no_invariant():
    stats = run_month(SEED, DAYS)
    print(f"seed {SEED}, {DAYS:g} days: {stats.requests} requests, {stats.served} served, "
          f"errors {dict(stats.errors)}, faults {dict(stats.faults)}, "
          f"{stats.reports} tokens reported, first/last day {stats.samples[0]} / "
          f"{stats.samples[-1]}")
    assert stats.served > 0.8 * stats.requests  # faults are the exception, not the rule
    assert sum(stats.faults.values()) >= 5 * DAYS  # and there were plenty of them
    assert len(stats.samples) >= int(DAYS) - 1


def broken(invariant: str, **options: object) -> None:
    with pytest.raises(Violation) as caught:
        run_month(SEED, options.pop("days", 1.0), **options)  # type: ignore[arg-type]
    assert caught.value.invariant == invariant, caught.value
    assert f"SOAK_SEED={SEED}" in str(caught.value)


def test_it_catches_a_refresh_token_reused_after_a_lost_answer(monkeypatch):
    # the daemon takes every failed refresh as not done: it sends the token again
    real = upstream.TransientError.__init__

    def never_done(self, message, retry_after=None, *, maybe_done=False):
        real(self, message, retry_after, maybe_done=False)

    monkeypatch.setattr(upstream.TransientError, "__init__", never_done)
    broken("refresh-token-reuse", fault_kinds=("lost",))


def test_it_catches_an_expired_token_served_during_an_outage(monkeypatch):
    real = Slot.valid_for

    def expired_is_valid(self, now):
        left = real(self, now)
        return math.inf if self.token is not None and left <= 0 else left

    monkeypatch.setattr(Slot, "valid_for", expired_is_valid)
    broken("never-a-dead-token", fault_kinds=("outage",), fault_gap=2 * HOUR)


def test_it_catches_a_login_retried_on_a_timer_after_a_rejection(monkeypatch):
    def not_blocked(self, refusal):
        self.refresh_token = None
        return refusal  # the session is not blocked: its slots try again, and again

    monkeypatch.setattr(session_module.Session, "_block", not_blocked)
    broken("no-timed-relogin", fault_kinds=("password",))


def test_it_catches_a_slot_never_let_go(monkeypatch):
    monkeypatch.setattr(LegacySession, "_idle_at", lambda self, slot, vm_id: math.inf)
    broken("slots-let-go", days=2.0, drift=(0.2 * DAY, 0.3 * DAY), fault_kinds=("5xx",))
