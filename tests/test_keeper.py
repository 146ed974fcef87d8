"""The keeper's time and concurrency rules, on trio's MockClock with exact virtual times."""

from __future__ import annotations

import time

import pytest
import trio
import trio.testing

from vm_tokend import keeper as keeper_module
from vm_tokend import upstream
from vm_tokend.keeper import (
    BadRequest,
    CredentialsRejected,
    Forbidden,
    NotLoggedIn,
    UnknownVideoManager,
    UpstreamUnavailable,
)

from .fakes import FakeBackend, credentials, running_keeper


async def settle() -> None:
    await trio.testing.wait_all_tasks_blocked()


def outage(status: int = 503, retry_after: float | None = None):
    def fault(kind: str) -> None:
        raise upstream.TransientError(f"HTTP {status}: Service Unavailable", retry_after)
    return fault


async def test_login_token_serves_the_default_videomanager_without_a_refresh(autojump_clock):
    backend = FakeBackend()
    async with running_keeper(backend) as keeper:
        token = await keeper.get()
        assert token.videomanager.name == "Marketing"
        assert token.token == backend.access_tokens()[0]
        assert backend.calls == {"login": 1}


async def test_refresh_at_two_thirds_of_the_lifetime(autojump_clock):
    backend = FakeBackend(lifetime=300)
    async with running_keeper(backend, pick=0.5) as keeper:  # pick 0.5: zero jitter
        await keeper.get()
        await trio.sleep(1001)
        assert backend.times("refresh", "1") == pytest.approx([200, 400, 600, 800, 1000])
        assert backend.calls["login"] == 1


@pytest.mark.parametrize(("pick", "fraction"), [(0.0, 2 / 3 - 0.05), (1.0, 2 / 3 + 0.05)])
async def test_refresh_jitter_bounds(autojump_clock, pick, fraction):
    backend = FakeBackend(lifetime=300)
    async with running_keeper(backend, pick=pick) as keeper:
        await keeper.get()
        await trio.sleep(300)
        assert backend.times("refresh", "1")[0] == pytest.approx(300 * fraction)


async def test_real_jitter_stays_within_five_percent_of_the_lifetime(autojump_clock):
    backend = FakeBackend(lifetime=300)
    async with running_keeper(backend, pick=None) as keeper:
        await keeper.get()
        await trio.sleep(300 * 60)
        times = [0.0, *backend.times("refresh", "1")]
        intervals = [b - a for a, b in zip(times, times[1:], strict=False)]
        assert len(intervals) >= 80
        assert all(300 * (2 / 3 - 0.05) <= i <= 300 * (2 / 3 + 0.05) for i in intervals)
        assert max(intervals) - min(intervals) > 300 * 0.05  # it really varies


async def test_backoff_doubles_from_one_second_to_a_sixty_second_cap(autojump_clock):
    backend = FakeBackend(lifetime=300)
    async with running_keeper(backend, pick=1.0) as keeper:  # pick 1.0: the jitter's maximum
        await keeper.get()
        backend.fault = outage()
        await trio.sleep(600)
        attempts = backend.times("refresh", "1")
        first = 300 * (2 / 3 + 0.05)
        assert attempts[0] == pytest.approx(first)
        gaps = [b - a for a, b in zip(attempts, attempts[1:], strict=False)]
        assert gaps[:9] == pytest.approx([1, 2, 4, 8, 16, 32, 60, 60, 60])


async def test_full_jitter_can_retry_sooner(autojump_clock):
    backend = FakeBackend(lifetime=300)
    async with running_keeper(backend, pick=0.25) as keeper:
        await keeper.get()
        backend.fault = outage()
        await trio.sleep(400)
        attempts = backend.times("refresh", "1")
        gaps = [b - a for a, b in zip(attempts, attempts[1:], strict=False)]
        assert gaps[:7] == pytest.approx([0.25, 0.5, 1, 2, 4, 8, 15])


async def test_retry_after_lengthens_the_backoff(autojump_clock):
    backend = FakeBackend(lifetime=300)
    async with running_keeper(backend, pick=1.0) as keeper:
        await keeper.get()
        backend.fault = outage(429, retry_after=30)
        await trio.sleep(400)
        attempts = backend.times("refresh", "1")
        gaps = [b - a for a, b in zip(attempts, attempts[1:], strict=False)]
        assert gaps[:3] == pytest.approx([30, 30, 30])


async def test_valid_token_served_during_outage_and_expired_one_refused(autojump_clock):
    backend = FakeBackend(lifetime=300)
    async with running_keeper(backend, pick=0.5) as keeper:
        first = await keeper.get()
        backend.fault = outage()
        await trio.sleep(299 - trio.current_time())
        assert (await keeper.get()).token == first.token  # still valid at t=299
        calls = backend.calls["refresh"]
        await trio.sleep(2)  # t=301: expired
        with pytest.raises(UpstreamUnavailable) as info:
            await keeper.get()
        assert "has expired" in info.value.message
        assert "HTTP 503: Service Unavailable" in info.value.message
        # Asking does not add attempts outside the schedule.
        for _ in range(20):
            with pytest.raises(UpstreamUnavailable):
                await keeper.get()
        assert backend.calls["refresh"] == calls


async def test_service_resumes_within_sixty_seconds_of_recovery(autojump_clock):
    backend = FakeBackend(lifetime=300)
    async with running_keeper(backend, pick=1.0) as keeper:
        await keeper.get()
        backend.fault = outage()
        await trio.sleep(1000)  # a long outage: the backoff is at its cap
        backend.fault = None
        recovered_at = trio.current_time()
        await trio.sleep(60)
        token = await keeper.get()
        assert token.token == backend.access_tokens()[-1]
        assert backend.log[-1].at - recovered_at <= 60


async def test_min_ttl_refreshes_first(autojump_clock):
    backend = FakeBackend(lifetime=300)
    async with running_keeper(backend, pick=0.5) as keeper:
        first = await keeper.get()
        await trio.sleep(100)
        assert (await keeper.get(min_ttl=150)).token == first.token  # 200 s left
        assert backend.calls["refresh"] == 0
        second = await keeper.get(min_ttl=250)  # 200 s left: not enough
        assert second.token != first.token
        assert backend.times("refresh") == [100]
        # A whole new lifetime (the wall clock stands still under the MockClock).
        assert second.expires_at - time.time() == pytest.approx(300, abs=1)


async def test_min_ttl_beyond_the_lifetime_is_a_bad_request(autojump_clock):
    backend = FakeBackend(lifetime=300)
    async with running_keeper(backend) as keeper:
        await keeper.get()
        with pytest.raises(BadRequest, match="min_ttl 300"):
            await keeper.get(min_ttl=300)
        assert backend.calls["refresh"] == 0


async def test_idle_videomanager_dropped_after_idle_timeout(autojump_clock):
    backend = FakeBackend(lifetime=300)
    async with running_keeper(backend, pick=0.5, idle_timeout=1000) as keeper:
        await keeper.get("Sales")
        await trio.sleep(2000)
        # Refreshed while wanted, dropped at t=1000, never again.
        assert backend.times("refresh", "2") == pytest.approx([0, 200, 400, 600, 800])
        assert [vm["expires_at"] is None for vm in keeper.list()] == [False, True, True, True]
        # The default VideoManager is kept warm regardless.
        assert backend.times("refresh", "1")[-1] >= 1800


async def test_configured_videomanagers_are_kept_warm(autojump_clock):
    backend = FakeBackend(lifetime=300)
    async with running_keeper(backend, pick=0.5, idle_timeout=100,
                              default_videomanager="sales", videomanagers=["3"]) as keeper:
        await settle()
        assert (await keeper.get()).videomanager.name == "Sales"
        await trio.sleep(1001)
        assert backend.times("refresh", "2") == pytest.approx([0, 200, 400, 600, 800, 1000])
        assert backend.times("refresh", "3") == pytest.approx([0, 200, 400, 600, 800, 1000])
        assert backend.times("refresh", "4") == []


async def test_rejected_credentials_are_never_retried_on_a_timer(autojump_clock):
    backend = FakeBackend()
    async with running_keeper(backend, password="wrong") as keeper:
        for _ in range(3):
            with pytest.raises(CredentialsRejected, match="rejected the credentials"):
                await keeper.get()
        await trio.sleep(24 * 3600)
        with pytest.raises(CredentialsRejected):
            await keeper.get("Sales")
        assert backend.calls == {"login": 1}
        # New credentials: one more attempt, which works.
        await keeper.start_session(credentials("right"))
        assert (await keeper.get()).videomanager.id == "1"
        assert backend.calls == {"login": 2}


async def test_without_credentials_clients_are_told_to_log_in(autojump_clock):
    async with running_keeper(FakeBackend(), password=None) as keeper:
        with pytest.raises(NotLoggedIn, match="vm-token login"):
            await keeper.get()


async def test_unknown_videomanager(autojump_clock):
    async with running_keeper(FakeBackend()) as keeper:
        with pytest.raises(UnknownVideoManager, match="Marketing \\(1\\)"):
            await keeper.get("Finance")
        assert (await keeper.get("SUPPORT")).videomanager.id == "3"  # names: any case


async def test_sixty_clients_one_refresh(autojump_clock):
    backend = FakeBackend(delay=0.7)
    async with running_keeper(backend) as keeper:
        await keeper.get()
        results = []

        async def client() -> None:
            results.append(await keeper.get("Sales"))

        async with trio.open_nursery() as nursery:
            for _ in range(60):
                nursery.start_soon(client)
        assert len({r.token for r in results}) == 1 and len(results) == 60
        assert backend.calls == {"login": 1, "refresh": 1}


async def test_three_videomanagers_at_once_serialize_rotating_refreshes(autojump_clock):
    backend = FakeBackend(delay=0.7, rotate=True)
    async with running_keeper(backend) as keeper:
        await keeper.get()
        results = []

        async def client(name: str) -> None:
            results.append(await keeper.get(name))

        async with trio.open_nursery() as nursery:
            for i in range(60):
                nursery.start_soon(client, ["Sales", "Support", "Legal"][i % 3])
        assert len({r.token for r in results}) == 3
        assert backend.calls["refresh"] == 3
        assert backend.max_in_flight == 1
        assert backend.reused_refresh_tokens == 0


async def test_rejected_refresh_token_means_one_login_again(autojump_clock):
    backend = FakeBackend(delay=0.5)
    async with running_keeper(backend) as keeper:
        await keeper.get()
        backend.expire_refresh_token()
        async with trio.open_nursery() as nursery:
            for i in range(30):
                nursery.start_soon(keeper.get, ["Sales", "Support", "Legal"][i % 3])
        assert backend.calls["login"] == 2
        assert backend.calls["refresh"] == 1 + 3  # one refused, then one per VideoManager


async def test_refresh_token_close_to_expiry_means_login_instead(autojump_clock):
    backend = FakeBackend(lifetime=300, refresh_lifetime=3600, rotate=False)
    async with running_keeper(backend, pick=0.5) as keeper:
        await keeper.get()
        await trio.sleep(3700)
        # Refreshes every 200 s. The refresh token (an hour) would expire before the
        # refresh due at 3600, so the one due at 3400 is a login instead: it brings the
        # token for this VideoManager too, so renewing costs no extra call.
        assert backend.times("login") == [0, 3400]
        assert backend.times("refresh") == pytest.approx([200 * i for i in range(1, 17)]
                                                          + [3600])
        assert len(backend.log) == 1 + 16 + 1 + 1


async def test_a_login_for_another_videomanager_refreshes_the_logins_own(autojump_clock):
    backend = FakeBackend(lifetime=300)
    async with running_keeper(backend, pick=0.5, default_videomanager="Sales") as keeper:
        old_marketing = (await keeper.get("Marketing")).token  # the login's VideoManager
        sales = (await keeper.get("Sales")).token
        assert backend.times("refresh", "1") == [0]
        await trio.sleep(10)
        backend.expire_refresh_token()
        keeper.invalidate(sales)  # Sales needs a token: refused refresh, login, refresh
        await keeper.get("Sales")
        assert backend.times("login") == [0, 10]
        # The login's token went to Marketing, which needed no refresh of its own.
        marketing = (await keeper.get("Marketing")).token
        assert marketing != old_marketing
        assert marketing == backend.access_tokens()[-2]  # the login's, before Sales' own
        assert backend.times("refresh", "1") == [0]


async def test_invalidate_current_token_refreshes_once(autojump_clock):
    backend = FakeBackend()
    async with running_keeper(backend) as keeper:
        first = await keeper.get()
        await trio.sleep(50)
        results = [keeper.invalidate(first.token) for _ in range(100)]
        assert results.count(True) == 1
        second = await keeper.get()
        assert second.token != first.token
        assert keeper.invalidate(first.token, "Marketing") is False  # stale: nothing
        assert keeper.invalidate("not-a-token") is False
        await settle()
        assert backend.calls["refresh"] == 1


async def test_repeatedly_rejected_fresh_tokens_back_off(autojump_clock):
    backend = FakeBackend()
    async with running_keeper(backend, pick=1.0) as keeper:
        for _ in range(2):
            keeper.invalidate((await keeper.get()).token)
        # The second fresh token reported at once: the next fetch waits.
        with pytest.raises(UpstreamUnavailable, match="rejected 2 fresh tokens"):
            await keeper.get()
        assert backend.calls["refresh"] == 1
        await trio.sleep(1)
        await keeper.get()
        assert backend.calls["refresh"] == 2


async def test_forbidden_videomanager_not_asked_again_for_a_minute(autojump_clock):
    backend = FakeBackend(forbidden={"4"})
    async with running_keeper(backend) as keeper:
        await keeper.get()
        for _ in range(10):
            with pytest.raises(Forbidden, match="no rights"):
                await keeper.get("Legal")
        assert backend.calls["refresh"] == 1
        await trio.sleep(keeper_module.FORBIDDEN_RECHECK)
        with pytest.raises(Forbidden):
            await keeper.get("Legal")
        assert backend.calls["refresh"] == 2


async def test_login_outage_at_start_then_recovery(autojump_clock):
    backend = FakeBackend()
    backend.fault = outage(502)
    async with running_keeper(backend, pick=1.0) as keeper:
        with pytest.raises(UpstreamUnavailable, match="cannot log in: HTTP 502"):
            await keeper.get()
        assert keeper.state()["state"] == "upstream_unavailable"
        backend.fault = None
        await trio.sleep(1)
        assert (await keeper.get()).videomanager.id == "1"
        assert backend.times("login") == [0, 1]
        assert keeper.state()["state"] == "logged_in"


async def test_logout_forgets_everything(autojump_clock):
    backend = FakeBackend()
    async with running_keeper(backend) as keeper:
        await keeper.get()
        await keeper.start_session(None)
        with pytest.raises(NotLoggedIn):
            await keeper.get()
        assert keeper.list() == []
        assert keeper.state()["state"] == "logged_out"


async def test_reconfiguring_moves_the_default_and_the_warm_set(autojump_clock):
    backend = FakeBackend(lifetime=300)
    async with running_keeper(backend, pick=0.5, idle_timeout=500,
                              videomanagers=["Support"]) as keeper:
        assert (await keeper.get()).videomanager.name == "Marketing"
        await settle()
        keeper.configure(default_videomanager="Legal", videomanagers=[], idle_timeout=500)
        assert (await keeper.get()).videomanager.name == "Legal"
        await trio.sleep(2000)
        # Support is no longer kept warm: refreshed until idle for 500 s, then dropped.
        assert backend.times("refresh", "3") == pytest.approx([0, 200, 400])
        assert backend.times("refresh", "4")[-1] >= 1800  # the new default stays warm
        keeper.configure(default_videomanager=None, videomanagers=[], idle_timeout=500)
        assert (await keeper.get()).videomanager.name == "Marketing"  # the login's again
