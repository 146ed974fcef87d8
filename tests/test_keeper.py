"""The keeper's time and concurrency rules, on trio's MockClock with exact virtual times."""

from __future__ import annotations

import time

import pytest
import trio
import trio.testing

from tests.fakes import FakeBackend, credentials, running_keeper
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


async def test_repeatedly_rejected_fresh_tokens_back_off_and_clients_wait(autojump_clock):
    backend = FakeBackend()
    async with running_keeper(backend, pick=1.0) as keeper:
        for _ in range(2):
            keeper.invalidate((await keeper.get()).token)
        # The second fresh token in a row reported at once: the next fetch waits 1 s (the
        # jitter's maximum), and a client asking meanwhile waits for it instead of failing.
        reported_at = trio.current_time()
        third = await keeper.get()
        assert trio.current_time() - reported_at == pytest.approx(1)
        assert backend.calls["refresh"] == 2
        assert third.token == backend.access_tokens()[-1]
        # Third and fourth in a row: 2 s (still waited for), then 4 s: longer than a client
        # waits, so it hears why, with "next attempt in" said once.
        keeper.invalidate(third.token)
        await keeper.get()
        keeper.invalidate((await keeper.get()).token)
        with pytest.raises(UpstreamUnavailable) as info:
            await keeper.get()
        assert "rejected 4 fresh tokens in a row" in info.value.message
        assert info.value.message.count("next attempt in") == 1
        assert info.value.message.endswith("next attempt in 4 s")


async def test_quick_invalidations_count_only_consecutive_tokens(autojump_clock):
    # 9-second tokens are refreshed every 6 s: every token is "fresh" (< 10 s old) when a
    # revocation reports it. Revocations a minute apart are unrelated: none may back off.
    backend = FakeBackend(lifetime=9)
    async with running_keeper(backend, pick=0.5) as keeper:
        for _ in range(5):
            token = await keeper.get()
            assert keeper.invalidate(token.token)
            asked_at = trio.current_time()
            replacement = await keeper.get()
            assert trio.current_time() == asked_at  # no backoff: fetched at once
            assert replacement.token != token.token
            await trio.sleep(60)
        assert all(vm["last_error"] is None for vm in keeper.list())


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


async def test_retry_after_on_one_videomanager_pauses_the_whole_session(autojump_clock):
    backend = FakeBackend(lifetime=300)
    async with running_keeper(backend, pick=0.5, videomanagers=["2"]) as keeper:
        sales = await keeper.get("Sales")  # fetched at t=0: due again at 200
        await trio.sleep(10)
        keeper.invalidate((await keeper.get()).token)
        marketing = await keeper.get()  # fetched at t=10: due again at 210
        assert backend.times("refresh") == [0, 10]

        def busy(kind: str, vm: str | None) -> None:
            if kind == "refresh" and vm == "2":
                raise upstream.TransientError("HTTP 429: Too Many Requests", retry_after=120)
        backend.fault_for = busy
        # Sales' refresh at 200 is answered 429 with Retry-After 120: Marketing, due at
        # 210, waits with it until 320 instead of asking.
        await trio.sleep(290 - trio.current_time())
        assert backend.times("refresh") == [0, 10, 200]
        assert (await keeper.get()).token == marketing.token  # still valid: served
        assert (await keeper.get("Sales")).token == sales.token
        errors = {vm["name"]: vm["last_error"] for vm in keeper.list()}
        assert errors["Marketing"] == errors["Sales"] == "HTTP 429: Too Many Requests"
        backend.fault_for = None
        await trio.sleep(330 - trio.current_time())
        assert backend.times("refresh")[3:] == [320, 320]


async def test_failed_relogin_pauses_every_videomanager(autojump_clock):
    backend = FakeBackend(lifetime=300)
    async with running_keeper(backend, pick=1.0, videomanagers=["2", "3"]) as keeper:
        await keeper.get()
        await trio.sleep(1)
        backend.expire_refresh_token()

        def login_outage(kind: str) -> None:
            if kind == "login":
                raise upstream.TransientError("HTTP 502: Bad Gateway")
        backend.fault = login_outage
        for name in ("Marketing", "Sales", "Support"):
            keeper.invalidate((await keeper.get(name)).token)
        await trio.sleep(60)
        logins = backend.times("login")[1:]
        # One chain of logins for the session, backing off 1, 2, 4, 8, 16 s (pick=1.0),
        # not one per VideoManager.
        gaps = [b - a for a, b in zip(logins, logins[1:], strict=False)]
        assert gaps[:4] == pytest.approx([1, 2, 4, 8])
        assert len(logins) <= 6
        backend.fault = None
        await trio.sleep(60)
        for name in ("Marketing", "Sales", "Support"):
            assert (await keeper.get(name)).token in backend.access_tokens()


async def test_refresh_answer_without_a_refresh_token_keeps_ours(autojump_clock):
    backend = FakeBackend(lifetime=300, rotate=False, send_refresh_token=False)
    async with running_keeper(backend, pick=0.5) as keeper:
        await keeper.get()
        await trio.sleep(1001)
        assert backend.times("refresh") == pytest.approx([200, 400, 600, 800, 1000])
        assert backend.calls["login"] == 1
        assert (await keeper.get()).token == backend.access_tokens()[-1]


async def test_lifetime_counts_from_when_the_request_was_sent(autojump_clock):
    backend = FakeBackend(lifetime=300, delay=10)
    async with running_keeper(backend, pick=0.5) as keeper:
        token = await keeper.get()  # asked at 0, answered at 10
        assert trio.current_time() == 10
        assert token.expires_at - time.time() == pytest.approx(290, abs=1)
        await trio.sleep(200)
        assert backend.times("refresh") == [200]  # 2/3 of 300 after 0, not after 10


async def test_tokens_claiming_tiny_lifetimes_are_not_fetched_in_a_loop(autojump_clock):
    backend = FakeBackend(lifetime=0.01)
    async with running_keeper(backend, pick=0.5) as keeper:
        await keeper.get()
        await trio.sleep(10.5)
        assert len(backend.times("refresh")) == 10  # one a second


async def test_default_not_in_the_list_falls_back_to_the_first_listed(autojump_clock):
    backend = FakeBackend(login_vm="99")
    async with running_keeper(backend) as keeper:
        token = await keeper.get()
        assert token.videomanager.name == "Marketing"
        state = keeper.state()
        assert state["state"] == "logged_in"
        assert any("'99'" in notice and "first listed" in notice
                   for notice in state["notices"])
        assert [vm["default"] for vm in keeper.list()] == [True, False, False, False]


async def test_unexpected_backend_exceptions_are_transient(autojump_clock, caplog):
    backend = FakeBackend(lifetime=300)
    async with running_keeper(backend, pick=1.0) as keeper:
        first = await keeper.get()

        def broken(kind: str) -> None:
            raise KeyError("secret-looking-detail")
        backend.fault = broken
        await trio.sleep(220)  # the refresh was due at 215 (pick=1.0: +5 % jitter)
        assert (await keeper.get()).token == first.token  # still served
        errors = [vm["last_error"] for vm in keeper.list() if vm["last_error"]]
        assert errors == ["unexpected failure talking to the API (KeyError)"]
        backend.fault = None
        await trio.sleep(60)
        assert (await keeper.get()).token == backend.access_tokens()[-1]
    assert "secret-looking-detail" not in caplog.text


async def test_unexpected_exception_at_first_login_is_retried(autojump_clock):
    backend = FakeBackend()

    def broken(kind: str) -> None:
        raise RecursionError("deep")
    backend.fault = broken
    async with running_keeper(backend, pick=1.0) as keeper:
        with pytest.raises(UpstreamUnavailable, match="RecursionError"):
            await keeper.get()
        backend.fault = None
        await trio.sleep(2)
        assert (await keeper.get()).videomanager.name == "Marketing"


async def test_unknown_videomanager_message_is_bounded(autojump_clock):
    backend = FakeBackend()
    async with running_keeper(backend) as keeper:
        await keeper.get()
        with pytest.raises(UnknownVideoManager) as info:
            await keeper.get("\x01" * 16384)
        assert len(info.value.message) < 250
        assert "'\\x01\\x01" in info.value.message and "…" in info.value.message
