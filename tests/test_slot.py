"""One token's state machine alone, driven by a scripted fetch on trio's MockClock: exact
refresh times, backoff, single flight, min_ttl, invalidation, idleness, and what the fetch
may raise."""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from tests.fakes import PinnedRandom
from vm_token.errors import BadRequest, CredentialsRejected, Forbidden, UpstreamUnavailable
from vm_tokend import upstream
from vm_tokend.keeper.slot import Paused, Slot, Superseded
from vm_tokend.keeper.timing import Timing
from vm_tokend.upstream.base import Grant, VideoManagerRef

VM = VideoManagerRef("1001", "Marketing")


def outage(retry_after: float | None = None) -> upstream.TransientError:
    return upstream.TransientError("HTTP 503: Service Unavailable", retry_after)


class Script:
    """The fetch: answers with the next scripted outcome (an exception to raise, or a
    function of the slot), then with fresh tokens; records the virtual time of each call."""

    def __init__(self, lifetime: float = 300.0, delay: float = 0.0) -> None:
        self.lifetime = lifetime
        self.delay = delay
        self.outcomes: list[BaseException | Callable[[Slot], Any]] = []
        self.always: BaseException | None = None
        self.times: list[float] = []
        self.serial = 0

    def grant(self, requested_at: float) -> Grant:
        self.serial += 1
        return Grant(access_token=f"access-{self.serial}", refresh_token=None,
                     videomanagers=(), valid_for=None, lifetime=self.lifetime,
                     refresh_lifetime=None, requested_at=requested_at)

    async def __call__(self, slot: Slot) -> Grant:
        start = trio.current_time()
        self.times.append(start)
        if self.delay:
            await trio.sleep(self.delay)
        if self.outcomes:
            outcome = self.outcomes.pop(0)
            if isinstance(outcome, BaseException):
                raise outcome
            outcome(slot)
        if self.always is not None:
            raise self.always
        return self.grant(start)


def make_slot(script: Script, *, pick: float = 0.5, max_backoff: float = 60.0,
              idle_at: Callable[[Slot], float] = lambda slot: math.inf) -> Slot:
    return Slot("Marketing", fetch=script, timing=Timing(PinnedRandom(pick), max_backoff),
                idle_at=idle_at)


@asynccontextmanager
async def running(slot: Slot, suspended: Callable[[], bool] = lambda: False
                  ) -> AsyncIterator[trio.Nursery]:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(slot.run, suspended)
        yield nursery
        nursery.cancel_scope.cancel()


async def get(slot: Slot, min_ttl: float = 0.0) -> str:
    """What a client does (the session's get, for one slot)."""
    waited = False
    while True:
        if slot.ready(min_ttl, waited):
            return slot.info(VM).token
        await slot.wait_attempt(min_ttl)
        waited = True


async def settle() -> None:
    await trio.testing.wait_all_tasks_blocked()


async def sleep_until(when: float) -> None:
    await trio.sleep_until(when)
    await settle()


# -- refresh times ----------------------------------------------------------------------------

async def test_first_fetch_at_once_then_at_two_thirds_of_the_lifetime(autojump_clock):
    script = Script(lifetime=300)
    slot = make_slot(script, pick=0.5)  # 0.5: no jitter
    async with running(slot):
        assert await get(slot) == "access-1"
        assert slot.expires_at == 300 and slot.refresh_at == 200
        await sleep_until(850)
        assert script.times == [0, 200, 400, 600, 800]
        assert await get(slot) == "access-5"
        assert slot.expires_at == 1100 and slot.lifetime == 300
        # taken at 800 (virtual) for 300 s; the wall clock stood still meanwhile, and so
        # did the boot clock: no step
        assert slot.expires_at_wall == pytest.approx(time.time() + 300, abs=1)


@pytest.mark.parametrize(("pick", "at"), [(0.0, 300 * (2 / 3 - 0.05)),
                                          (1.0, 300 * (2 / 3 + 0.05)),
                                          (0.25, 300 * (2 / 3 - 0.025))])
async def test_refresh_jitter_is_five_percent_of_the_lifetime_either_way(autojump_clock,
                                                                         pick, at):
    script = Script(lifetime=300)
    slot = make_slot(script, pick=pick)
    async with running(slot):
        await sleep_until(2.5 * at)
        assert script.times == pytest.approx([0, at, 2 * at])


async def test_refresh_counts_from_when_the_fetch_was_sent(autojump_clock):
    script = Script(lifetime=300, delay=5)
    slot = make_slot(script)
    async with running(slot):
        assert await get(slot) == "access-1"
        assert trio.current_time() == 5 and slot.expires_at == 300
        await sleep_until(450)
        assert script.times == [0, 200, 400]  # not 205, 410


async def test_a_tiny_lifetime_is_not_refreshed_more_than_once_a_second(autojump_clock):
    script = Script(lifetime=0.3)
    slot = make_slot(script)
    async with running(slot):
        await sleep_until(4.5)
        assert script.times == [0, 1, 2, 3, 4]


# -- backoff ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("pick", "max_backoff", "times"), [
    (1.0, 60.0, [0, 1, 3, 7, 15, 31, 63, 123, 183, 243]),  # 1, 2, 4, ... capped at 60
    (0.5, 60.0, [0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5, 61.5, 91.5, 121.5]),  # full jitter
    (1.0, 10.0, [0, 1, 3, 7, 15, 25, 35, 45, 55, 65]),  # max_backoff
])
async def test_backoff_doubles_with_full_jitter_up_to_the_cap(autojump_clock, pick,
                                                              max_backoff, times):
    script = Script()
    script.always = outage()
    slot = make_slot(script, pick=pick, max_backoff=max_backoff)
    async with running(slot):
        await sleep_until(times[-1] + 0.1)
        assert script.times == pytest.approx(times)
        assert slot.failures == len(times)
        assert slot.last_error == "HTTP 503: Service Unavailable"


async def test_retry_after_is_the_least_delay(autojump_clock):
    script = Script()
    script.always = outage(retry_after=30)
    slot = make_slot(script, pick=1.0)
    async with running(slot):
        await sleep_until(65)
        assert script.times == [0, 30, 60]  # max(1, 30), max(2, 30)
        script.always = outage(retry_after=None)
        await sleep_until(200)
        # the attempt at 90 was due already; then 2^3 = 8 s (the fourth failure)
        assert script.times[:6] == [0, 30, 60, 90, 98, 114]


async def test_success_resets_the_backoff(autojump_clock):
    script = Script(lifetime=300)
    script.outcomes = [outage(), outage()]
    slot = make_slot(script, pick=1.0)
    async with running(slot):
        await sleep_until(3)
        assert script.times == [0, 1, 3]
        assert await get(slot) == "access-1"
        assert slot.failures == 0 and slot.last_error is None
        refresh_at = slot.refresh_at
        assert refresh_at == 3 + 300 * (2 / 3 + 0.05)
        script.outcomes = [outage()]
        await sleep_until(refresh_at + 1.5)
        assert script.times == [0, 1, 3, refresh_at, refresh_at + 1]  # 1 s again, not 8


async def test_a_failing_refresh_keeps_serving_the_valid_token(autojump_clock):
    script = Script(lifetime=300)
    slot = make_slot(script, pick=1.0)
    async with running(slot):
        assert await get(slot) == "access-1"
        script.always = outage()
        await sleep_until(250)
        assert len(script.times) > 3
        assert await get(slot) == "access-1"  # still valid 50 s
        assert await get(slot, min_ttl=40) == "access-1"
        with pytest.raises(UpstreamUnavailable) as info:
            await get(slot, min_ttl=60)
        assert str(info.value).startswith("the token for Marketing is valid for only 50 s "
                                          "(min_ttl 60 s): HTTP 503: Service Unavailable; "
                                          "next attempt in ")
        await sleep_until(301)
        with pytest.raises(UpstreamUnavailable, match="the token for Marketing has expired: "
                                                      "HTTP 503"):
            await get(slot)
        assert slot.describe(trio.current_time())["expires_at"] is None
        assert slot.describe(trio.current_time())["last_error"] == "HTTP 503: Service Unavailable"


# -- single flight ----------------------------------------------------------------------------

async def test_many_waiters_one_fetch(autojump_clock):
    script = Script(lifetime=300, delay=5)
    slot = make_slot(script)
    got: list[tuple[float, str]] = []

    async def client() -> None:
        token = await get(slot)
        got.append((trio.current_time(), token))

    async with running(slot), trio.open_nursery() as clients:
        for _ in range(50):
            clients.start_soon(client)
    assert script.times == [0]
    assert got == [(5, "access-1")] * 50


async def test_clients_during_a_refresh_get_the_held_token_at_once(autojump_clock):
    script = Script(lifetime=300, delay=5)
    slot = make_slot(script)
    async with running(slot):
        await get(slot)
        await trio.sleep_until(202)  # the refresh sent at 200 answers at 205
        assert script.times == [0, 200]
        assert await get(slot) == "access-1" and trio.current_time() == 202
        await sleep_until(206)
        assert await get(slot) == "access-2"


async def test_many_waiters_share_one_failure(autojump_clock):
    script = Script(delay=5)
    script.always = outage()
    slot = make_slot(script, pick=1.0)
    errors: list[tuple[float, str]] = []

    async def client() -> None:
        with pytest.raises(UpstreamUnavailable) as info:
            await get(slot)
        errors.append((trio.current_time(), str(info.value)))

    async with running(slot), trio.open_nursery() as clients:
        for _ in range(30):
            clients.start_soon(client)
    assert script.times == [0]
    assert errors == [(5, "the token for Marketing could not be fetched: HTTP 503: Service "
                          "Unavailable; next attempt in 1 s")] * 30


async def test_a_client_waits_for_an_attempt_due_soon(autojump_clock):
    script = Script()
    script.outcomes = [outage()]
    slot = make_slot(script, pick=1.0)
    async with running(slot):
        await settle()
        assert script.times == [0] and slot.retry_at == 1
        assert await get(slot) == "access-1"  # waited for the attempt at 1 s
        assert trio.current_time() == 1


# -- min_ttl ----------------------------------------------------------------------------------

async def test_min_ttl_fetches_a_fresher_token_now(autojump_clock):
    script = Script(lifetime=300)
    slot = make_slot(script)
    async with running(slot):
        await get(slot)
        await sleep_until(100)
        assert await get(slot, min_ttl=199) == "access-1"  # valid 200 > 199
        assert await get(slot, min_ttl=250) == "access-2"
        assert script.times == [0, 100] and trio.current_time() == 100
        await sleep_until(350)
        assert script.times == [0, 100, 300]  # the schedule follows the new token


async def test_min_ttl_not_below_the_lifetime_is_a_bad_request(autojump_clock):
    script = Script(lifetime=300)
    slot = make_slot(script)
    async with running(slot):
        await get(slot)
        for min_ttl in (300, 1000):
            with pytest.raises(BadRequest) as info:
                await get(slot, min_ttl=min_ttl)
            assert str(info.value) == (f"min_ttl {min_ttl} s is not less than the lifetime "
                                       "the API gives tokens for Marketing (300 s)")
        await settle()
        assert script.times == [0]


async def test_min_ttl_the_new_token_cannot_meet(autojump_clock):
    script = Script(lifetime=300, delay=10)
    slot = make_slot(script)
    async with running(slot):
        with pytest.raises(UpstreamUnavailable) as info:
            await get(slot, min_ttl=295)
        assert str(info.value) == ("the new token for Marketing is valid for only 290.0 s, "
                                   "not more than min_ttl 295 s")
        await sleep_until(100)
        assert script.times == [0]  # no fetch loop chasing it
        assert await get(slot, min_ttl=100) == "access-1"


# -- invalidate -------------------------------------------------------------------------------

async def test_invalidate_fetches_a_new_token_and_counts_quick_ones(autojump_clock):
    script = Script(lifetime=300)
    slot = make_slot(script, pick=1.0)
    async with running(slot):
        assert await get(slot) == "access-1"
        await sleep_until(5)
        assert slot.invalidate("not-the-token") is False
        await settle()
        assert script.times == [0]
        assert slot.invalidate("access-1") is True
        assert slot.token is None
        assert await get(slot) == "access-2" and trio.current_time() == 5
        assert slot.quick_invalidations == 1
        await sleep_until(6)
        assert slot.invalidate("access-2") is True  # a second fresh one rejected: back off
        assert slot.quick_invalidations == 2
        assert slot.retry_at == 7
        assert slot.last_error == "the API rejected 2 fresh tokens in a row"
        assert await get(slot) == "access-3" and trio.current_time() == 7
        await sleep_until(8)
        slot.invalidate("access-3")
        assert slot.retry_at == 10  # backoff(1): 2 s
        await sleep_until(30)
        assert script.times == [0, 5, 7, 10]
        assert slot.invalidate("access-4") is True  # 20 s old: not quick, the run is over
        assert slot.quick_invalidations == 0 and slot.retry_at is None
        await settle()
        assert script.times == [0, 5, 7, 10, 30]


async def test_a_regular_refresh_breaks_a_run_of_quick_invalidations(autojump_clock):
    script = Script(lifetime=300)
    slot = make_slot(script, pick=0.5)
    async with running(slot):
        await get(slot)
        await sleep_until(5)
        slot.invalidate("access-1")
        await sleep_until(6)
        assert slot.quick_invalidations == 1
        await sleep_until(206)  # refreshed at 205, replacing a token nobody rejected
        assert script.times == [0, 5, 205]
        assert slot.quick_invalidations == 0
        slot.invalidate("access-3")
        await settle()
        assert slot.quick_invalidations == 1 and slot.retry_at is None
        assert script.times == [0, 5, 205, 206]


# -- idleness ---------------------------------------------------------------------------------

async def test_an_unused_token_is_dropped_when_idle(autojump_clock):
    script = Script(lifetime=300)
    slot = make_slot(script, idle_at=lambda s: s.last_used + 100)
    ended: list[float] = []

    async def run() -> None:
        await slot.run(lambda: False)
        ended.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        await get(slot)
        await sleep_until(50)
        await get(slot)  # used at 50: idle at 150
    assert ended == [150]
    assert slot.dropped and slot.token is None
    assert script.times == [0]  # no refresh for a token nobody uses


async def test_idle_ends_a_backoff_too(autojump_clock):
    script = Script()
    script.always = outage()
    slot = make_slot(script, pick=1.0, idle_at=lambda s: s.last_used + 100)
    with trio.fail_after(1000):
        await slot.run(lambda: False)
    assert trio.current_time() == 100
    assert script.times == [0, 1, 3, 7, 15, 31, 63]


# -- what the fetch may raise -----------------------------------------------------------------

async def test_paused_waits_without_backoff(autojump_clock):
    script = Script(lifetime=300)
    script.outcomes = [Paused(30, "waiting for the API's Retry-After")]
    slot = make_slot(script, pick=1.0)
    async with running(slot):
        await sleep_until(1)
        assert slot.failures == 0 and slot.retry_at == 30
        with pytest.raises(UpstreamUnavailable) as info:
            await get(slot)
        assert str(info.value) == ("the token for Marketing could not be fetched: waiting for "
                                   "the API's Retry-After; next attempt in 29 s")
        await sleep_until(31)
        assert script.times == [0, 30]
        assert await get(slot) == "access-1"
        script.outcomes = [outage()]
        await sleep_until(30 + 215 + 1.5)
        assert script.times == [0, 30, 245, 246]  # backoff starts at 1 s: Paused added none


async def test_superseded_keeps_the_token_given_meanwhile(autojump_clock):
    script = Script(lifetime=300)

    def given(slot: Slot) -> None:
        slot.take(script.grant(trio.current_time()))  # a login brought it
        raise Superseded

    script.outcomes = [given]
    slot = make_slot(script)
    async with running(slot):
        assert await get(slot) == "access-1"
        assert slot.failures == 0 and slot.retry_at is None and slot.last_error is None
        await sleep_until(250)
        assert script.times == [0, 200]


async def test_an_unexpected_exception_is_contained(autojump_clock):
    script = Script(lifetime=300)
    script.outcomes = [RuntimeError("bug with refresh-token-xyz in it")]
    slot = make_slot(script, pick=1.0)
    async with running(slot):
        await settle()
        assert slot.last_error == "internal error (RuntimeError)"
        assert slot.retry_at == 1 and slot.failures == 1
        with pytest.raises(UpstreamUnavailable) as info:
            slot.ready(0, waited=True)
        assert "refresh-token-xyz" not in str(info.value)
        assert await get(slot) == "access-1" and trio.current_time() == 1


async def test_forbidden_is_answered_without_asking_for_a_minute(autojump_clock):
    script = Script(lifetime=300)
    script.outcomes = [upstream.Forbidden("no rights for VideoManager 1001: HTTP 403")]
    slot = make_slot(script)
    async with running(slot):
        with pytest.raises(Forbidden, match="^no rights for VideoManager 1001: HTTP 403$"):
            await get(slot)
        await sleep_until(59)
        with pytest.raises(Forbidden):
            await get(slot)
        assert script.times == [0]
        await sleep_until(61)
        assert await get(slot) == "access-1"  # rights may have changed: asked again
        assert script.times == [0, 61]


async def test_refused_waits_for_the_session(autojump_clock):
    script = Script(lifetime=300)
    blocked = [False]

    def refuse(slot: Slot) -> None:
        blocked[0] = True  # what the session does when its credentials are refused
        raise CredentialsRejected("the API rejected the credentials for 'demo'")

    script.outcomes = [refuse]
    slot = make_slot(script)
    async with running(slot, suspended=lambda: blocked[0]):
        await sleep_until(1000)
        assert script.times == [0]
        assert slot.last_error == "the API rejected the credentials for 'demo'"
        assert slot.failures == 0
        blocked[0] = False
        slot.wake.set()
        assert await get(slot) == "access-1"
        assert script.times == [0, 1000]


async def test_drop_ends_the_task_and_wakes_waiters(autojump_clock):
    script = Script(lifetime=300)
    slot = make_slot(script)
    async with running(slot):
        await get(slot)
        changed = slot.changed
        slot.drop()
        assert changed.is_set()
        assert slot.dropped and slot.token is None
        await sleep_until(1000)
        assert script.times == [0]


async def test_info_is_one_object_per_token_and_videomanager(autojump_clock):
    script = Script(lifetime=300)
    slot = make_slot(script)
    async with running(slot):
        await get(slot)
        sales = VideoManagerRef("1002", "Sales")
        first = slot.info(VM)
        assert slot.info(VM) is first and slot.info(sales) is not first
        assert slot.info(sales).token == first.token == "access-1"
        assert "access-1" not in repr(first)
        await sleep_until(201)
        assert slot.info(VM) is not first and slot.info(VM).token == "access-2"


async def test_wanted_says_whether_a_fetch_is_still_needed(autojump_clock):
    # The session asks this after waiting for its lock: a fetch made meanwhile (a login's
    # token) means none is needed now.
    script = Script(lifetime=300)
    slot = make_slot(script, pick=0.5)
    assert slot.wanted(0) is True  # no token
    async with running(slot):
        await get(slot)
        assert slot.wanted(199) is False
        assert slot.wanted(200) is True  # refresh time
        slot.want_ttl = 250  # a client asked for a token valid more than 250 s
        assert slot.wanted(49) is False and slot.wanted(50) is True  # valid 251 s, 250 s
        slot.want_ttl = 100
        assert slot.wanted(199) is False and slot.wanted(200) is True
        slot.invalidate("access-1")
        assert slot.wanted(0) is True


@pytest.mark.parametrize(("wall_jump", "boot_jump", "moved"), [
    (3600.0, 0.0, 3600.0),  # the wall clock stepped (NTP): expires_at moves with it
    (3600.0, 3600.0, 0.0),  # the machine slept an hour: the token's end did not move
], ids=["a step", "a suspend"])
async def test_expires_at_follows_a_wall_clock_step_not_a_suspend(
        autojump_clock, monkeypatch, wall_jump, boot_jump, moved):
    from vm_tokend.keeper import slot as slot_module

    clocks = {"wall": 1.8e9, "boot": 1000.0}
    monkeypatch.setattr(time, "time", lambda: clocks["wall"])  # the module slot.py uses
    monkeypatch.setattr(slot_module, "boot_clock", lambda: clocks["boot"])
    script = Script(lifetime=300)
    slot = make_slot(script, pick=0.5)
    async with running(slot):
        assert await get(slot) == "access-1"
        vm = VideoManagerRef("1", "Marketing")
        before = slot.info(vm).expires_at
        assert before == 1.8e9 + 300
        clocks["wall"] += wall_jump
        clocks["boot"] += boot_jump
        assert slot.info(vm).expires_at == before + moved
