"""The judgements `make soak` makes from outside (bench/soak/ledger.py): a soak whose
judge excuses everything proves nothing, so each rule is shown to convict as well."""

from __future__ import annotations

import time

import pytest

from bench.soak.ledger import PROMPT, SLACK, Ledger


@pytest.fixture
def ledger() -> Ledger:
    return Ledger(max_backoff=10.0)


def judge(ledger: Ledger, *, exp_in: float, accepted: bool, min_ttl: float = 0,
          token: str = "t1", started: float | None = None, received_ago: float = 0,
          iat_ago: float = 10, expires_at: float | None = None) -> bool:
    """Judge a token whose `exp` is `exp_in` s from now, received `received_ago` s ago."""
    now, mono = time.time(), time.monotonic()
    return ledger.check_token("library", "default", "1001", min_ttl, token,
                              {"exp": now + exp_in, "iat": now - iat_ago}, accepted,
                              mono - received_ago if started is None else started,
                              mono - received_ago, expires_at)


def test_a_good_token_passes(ledger):
    assert judge(ledger, exp_in=50, accepted=True, min_ttl=15)
    assert not ledger.broken and ledger.tokens_checked == 1


def test_a_token_short_of_min_ttl_is_broken(ledger):
    judge(ledger, exp_in=5, accepted=True, min_ttl=15)
    assert ledger.broken == {"min-ttl": 1}


def test_min_ttl_counts_from_the_hand_out_not_from_the_question(ledger):
    """A daemon that makes a client wait 14 s and then hands it a token with 3 s left
    did not give it the 15 s it asked for, though the token had 17 s when it asked."""
    judge(ledger, exp_in=3, accepted=True, min_ttl=15, started=time.monotonic() - 14)
    assert ledger.broken == {"min-ttl": 1}


def test_an_expires_at_off_the_apis_exp_is_broken(ledger):
    judge(ledger, exp_in=50, accepted=True, expires_at=time.time() + 60)
    assert ledger.broken == {"expires-at": 1}


def test_a_refused_token_with_no_revocation_is_broken(ledger):
    assert not judge(ledger, exp_in=50, accepted=False)
    assert ledger.broken == {"never-a-dead-token": 1}


def test_a_token_revoked_after_it_was_issued_and_unreported_is_excused(ledger):
    ledger.event("default", "revoke", kills=True)
    assert not judge(ledger, exp_in=50, accepted=False)
    assert not ledger.broken and ledger.revoked_unreported == 1


def test_an_event_that_kills_no_access_token_excuses_nothing(ledger):
    ledger.event("default", "expire", kills=False)  # refresh tokens only
    judge(ledger, exp_in=50, accepted=False)
    assert ledger.broken == {"never-a-dead-token": 1}


def test_a_revocation_of_another_profile_excuses_nothing(ledger):
    ledger.event("oidc", "revoke", kills=True)
    judge(ledger, exp_in=50, accepted=False)
    assert ledger.broken == {"never-a-dead-token": 1}


def test_a_token_issued_after_the_revocation_is_not_excused(ledger):
    ledger.event("default", "revoke", kills=True)
    judge(ledger, exp_in=50, accepted=False, iat_ago=-5)  # issued 5 s after it
    assert ledger.broken == {"never-a-dead-token": 1}


def test_a_token_handed_out_again_after_it_was_reported_is_broken(ledger):
    ledger.event("default", "revoke", kills=True)
    ledger.report("t1")
    time.sleep(0.01)
    judge(ledger, exp_in=50, accepted=False, token="t1")
    assert ledger.broken == {"never-a-dead-token": 1}


def test_an_expired_token_is_broken_whatever_happened(ledger):
    ledger.event("default", "revoke", kills=True)
    judge(ledger, exp_in=-2, accepted=False)
    assert set(ledger.broken) == {"never-a-dead-token", "min-ttl"}


def test_a_token_that_expired_between_hand_out_and_check_is_excused(ledger):
    judge(ledger, exp_in=-0.2, accepted=False, received_ago=0.5)  # 0.3 s left when handed
    assert not ledger.broken and ledger.expired_in_transit == 1


def test_an_error_is_a_true_one_only_while_the_api_fails_and_just_after(ledger):
    window = ledger.fault_on("default", "outage")
    ledger.judge_error("curl", "default", "upstream_unavailable", time.monotonic())
    assert ledger.broken == {"served-once-healthy": 1}  # it never answered: no excuse
    ledger.answered(window)
    ledger.judge_error("curl", "default", "upstream_unavailable", time.monotonic())
    ledger.fault_off(window, after=5)  # a Retry-After of 5 s
    ledger.judge_error("curl", "default", "upstream_unavailable", time.monotonic())
    assert ledger.broken == {"served-once-healthy": 1}
    # no fault explains some codes
    ledger.judge_error("library", "default", "bad_request", time.monotonic())
    assert ledger.broken == {"served-once-healthy": 2}
    # the other profile's clients must not notice
    ledger.judge_error("curl", "oidc", "upstream_unavailable", time.monotonic())
    assert ledger.broken == {"served-once-healthy": 3}
    # and this profile's once max_backoff, the hold and the slack have passed
    late = window.healthy_from(ledger.max_backoff)
    assert late == pytest.approx(window.end + 5 + 10 + SLACK)
    assert ledger.must_serve("default", late + 0.1, late + 0.2)
    assert not ledger.must_serve("default", late - 0.1, late + 0.2)


def test_a_slow_answer_on_a_healthy_api_is_broken(ledger):
    now = time.monotonic()
    ledger.judge_served("git", "oidc", now - PROMPT + 0.5, now)
    assert not ledger.broken
    ledger.judge_served("git", "oidc", now - PROMPT - 1, now)
    assert ledger.broken == {"no-delay-when-healthy": 1}
    window = ledger.fault_on("oidc", "slow")
    ledger.answered(window)
    ledger.judge_served("git", "oidc", now - PROMPT - 1, time.monotonic())
    assert ledger.broken == {"no-delay-when-healthy": 1}  # its own API was slow: excused
