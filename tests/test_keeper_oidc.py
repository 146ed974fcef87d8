"""The OpenID Connect session's rules on trio's MockClock: one token for every
VideoManager, refresh-token rotation never reused, one re-login, the list from the API."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from tests.fakes import VMS, FakeOidc, credentials, running_keeper
from vm_tokend.keeper import CredentialsRejected, UnknownVideoManager
from vm_tokend.upstream import base as upstream
from vm_tokend.upstream.base import Grant, VideoManagerRef
from vm_tokend.upstream.oidc import TokenRejected


async def settle() -> None:
    await trio.testing.wait_all_tasks_blocked()


async def test_one_token_serves_every_videomanager(autojump_clock):
    backend = FakeOidc()
    async with running_keeper(backend) as keeper:
        tokens = [await keeper.get(ref) for ref in (None, "Sales", "3", "support")]
        assert {t.token for t in tokens} == {backend.access_tokens()[0]}
        assert [t.videomanager.id for t in tokens] == ["1", "2", "3", "3"]
        assert backend.calls == {"login": 1, "videomanagers": 1}
        state = keeper.state()
        assert (state["state"], state["auth"], state["issuer"], state["client_id"]) == (
            "logged_in", "oidc", backend.issuer, "anonymous")
        listed = keeper.list()
        assert [vm["default"] for vm in listed] == [True, False, False]
        assert len({vm["expires_at"] for vm in listed}) == 1  # the same token for all


async def test_one_refresh_per_period_however_many_videomanagers(autojump_clock):
    backend = FakeOidc(lifetime=300)
    async with running_keeper(backend, pick=0.5) as keeper:
        for _ in range(100):
            for ref in ("Marketing", "Sales", "Support"):
                await keeper.get(ref)
            await trio.sleep(10)
        assert backend.times("refresh") == pytest.approx([200, 400, 600, 800])
        assert backend.calls["login"] == 1


async def test_sixty_clients_three_videomanagers_one_refresh_no_reuse(autojump_clock):
    backend = FakeOidc(lifetime=300, delay=2.0)
    async with running_keeper(backend, pick=0.5) as keeper:
        first = await keeper.get()
        for round_ in range(5):
            await trio.sleep(15)  # older than a "fresh" token: no backoff for rejections
            keeper.invalidate((await keeper.get()).token)
            results: list = []

            async def client(ref: str, results: list = results) -> None:
                results.append(await keeper.get(ref, min_ttl=10))

            async with trio.open_nursery() as clients:
                for i in range(60):
                    clients.start_soon(client, ("Marketing", "Sales", "Support")[i % 3])
            assert len({r.token for r in results}) == 1
            assert results[0].token != first.token
            assert backend.calls["refresh"] == round_ + 1
        assert backend.max_in_flight == 1
        assert backend.reused_refresh_tokens == 0


async def test_a_refused_refresh_token_leads_to_one_login(autojump_clock):
    backend = FakeOidc(lifetime=300)
    async with running_keeper(backend, pick=0.5) as keeper:
        await keeper.get()
        backend.end_session()  # the provider ended the session: invalid_grant from now on
        await trio.sleep(250)  # the refresh at 200 is refused; one login replaces it
        assert backend.times("refresh") == [200]
        assert backend.times("login") == [0, 200]
        token = await keeper.get("Sales")
        assert token.token == backend.access_tokens()[-1]
        assert backend.reused_refresh_tokens == 0


async def test_wrong_password_is_one_attempt_and_no_timer(autojump_clock):
    backend = FakeOidc()
    async with running_keeper(backend, password="wrong") as keeper:
        with pytest.raises(CredentialsRejected, match="invalid_grant"):
            await keeper.get()
        await trio.sleep(3600)
        assert backend.calls == {"login": 1}
        assert keeper.state()["state"] == "credentials_rejected"


async def test_the_refresh_token_s_end_brings_a_login_not_a_refused_refresh(autojump_clock):
    backend = FakeOidc(lifetime=300, refresh_lifetime=1000, rotate=False)
    async with running_keeper(backend, pick=0.5) as keeper:
        await keeper.get()
        await trio.sleep(1100)
        # Refreshes at 200, 400, 600, 800; at 1000 the refresh token (login + 1000, less
        # a 30 s margin) is too close to its end: a login instead.
        assert backend.times("refresh") == [200, 400, 600, 800]
        assert backend.times("login") == [0, 1000]


async def test_unknown_names_list_again_at_most_once_a_minute(autojump_clock):
    backend = FakeOidc()
    async with running_keeper(backend) as keeper:
        await keeper.get()
        backend.videomanagers_listed = (*VMS[:3], VideoManagerRef("9", "New"))
        for _ in range(10):  # right after login: the list is fresh, no new request
            with pytest.raises(UnknownVideoManager, match="'New'"):
                await keeper.get("New")
        assert backend.calls["videomanagers"] == 1
        await trio.sleep(60)
        assert (await keeper.get("New")).videomanager.id == "9"
        assert backend.calls["videomanagers"] == 2
        for _ in range(10):
            with pytest.raises(UnknownVideoManager):
                await keeper.get("Nope")
        assert backend.calls["videomanagers"] == 2


async def test_a_list_that_refuses_the_token_brings_a_new_one(autojump_clock):
    backend = FakeOidc()
    refusals = [1]

    def refuse_once(kind: str) -> None:
        if kind == "videomanagers" and refusals:
            refusals.pop()
            raise TokenRejected("the API rejected the access token when listing: HTTP 401")
    backend.fault = refuse_once
    async with running_keeper(backend, pick=0.0) as keeper:
        token = await keeper.get("Sales")
        assert token.token == backend.access_tokens()[-1]
        # The refused token is replaced (once) and the list asked again.
        assert backend.calls["login"] + backend.calls["refresh"] == 2
        assert backend.calls["videomanagers"] == 2


async def test_one_simulated_hour_at_most_nineteen_token_calls(autojump_clock):
    # The documented lifetimes: 5-minute access tokens, 1-hour refresh tokens; real jitter.
    backend = FakeOidc(lifetime=300 - upstream.CLOCK_SLACK, refresh_lifetime=3600, rotate=True)
    async with running_keeper(backend, pick=None) as keeper:
        for second in range(3600):
            await keeper.get(("Marketing", "Sales", "Support")[second % 3])
            await trio.sleep(1)
        assert backend.calls["login"] + backend.calls["refresh"] <= 19
        assert backend.calls["videomanagers"] == 1
        assert backend.reused_refresh_tokens == 0


async def test_one_videomanager_rejecting_fresh_tokens_does_not_stop_the_others(
        autojump_clock):
    backend = FakeOidc(lifetime=300)
    async with running_keeper(backend, pick=1.0) as keeper:
        await keeper.get()
        for _ in range(6):  # what an auth library does on 401s from a VideoManager
            keeper.invalidate((await keeper.get("Support")).token, "Support")
        started = trio.current_time()
        token = await keeper.get("Marketing")  # served at once, no backoff
        assert trio.current_time() == started
        assert backend.calls["refresh"] == 1  # the first report replaced it; later, not
        assert token.token == backend.access_tokens()[-1]


async def test_a_refresh_whose_outcome_is_unknown_is_not_sent_again(autojump_clock):
    # A timeout after sending: the provider may have rotated the refresh token already.
    backend = FakeOidc(lifetime=300)
    lost = [1]

    def lose_one_answer(kind: str) -> None:
        if kind == "refresh" and lost:
            lost.pop()
            raise upstream.TransientError("no answer within 15 s", maybe_done=True)
    backend.fault = lose_one_answer
    async with running_keeper(backend, pick=0.5) as keeper:
        await keeper.get()
        await trio.sleep(205)
        assert backend.times("refresh") == [200]  # lost
        assert backend.times("login") == [0, 200.5]  # then a login, not the same token
        assert backend.reused_refresh_tokens == 0
        assert (await keeper.get()).token == backend.access_tokens()[-1]


class AnswerInTransit(FakeOidc):
    """A provider whose refresh answers take `transit` s to arrive after it issued them:
    a session it ends meanwhile has already handed out the token on its way."""

    transit = 2.0

    async def refresh(self, refresh_token: str) -> Grant:
        grant = await super().refresh(refresh_token)
        await trio.sleep(self.transit)
        return grant


async def test_a_refresh_sent_before_a_rejection_report_does_not_answer_it(autojump_clock):
    # Refresh sent (and answered) at 200, on its way until 202; at 201 the provider ends
    # the session, killing both tokens, and a client reports the one it holds: it must
    # not be handed the one on its way, asked for before its report.
    backend = AnswerInTransit(lifetime=300)
    async with running_keeper(backend, pick=0.5) as keeper:
        first = await keeper.get()
        await trio.sleep(201)
        assert backend.times("refresh") == [200]
        backend.end_session()
        dead = set(backend.access_tokens())  # the first, and the one in transit
        assert keeper.invalidate(first.token, "Sales")
        token = await keeper.get("Sales")
        assert token.token not in dead
        assert backend.times("login") == [0, 202]  # the refresh token it brought is dead too
        assert backend.reused_refresh_tokens == 0


async def test_a_retry_after_on_the_first_list_holds_the_slots_refresh_too(autojump_clock):
    # Found by the simulated month: the login worked, the VideoManager list got a 429
    # with Retry-After 600; the slot the login filled refreshed at 200 all the same.
    backend = FakeOidc(lifetime=300)

    def fault(kind: str) -> None:
        if kind == "videomanagers" and trio.current_time() < 1:
            raise upstream.TransientError("HTTP 429", retry_after=600)

    backend.fault = fault
    async with running_keeper(backend, pick=0.5):
        await trio.sleep(700)
        assert backend.times("videomanagers") == [0, 600]
        assert all(t >= 600 for t in backend.times("refresh")), backend.times("refresh")


@pytest.mark.parametrize(("asked", "relogin"), [(False, 1100), (True, 201)],
                         ids=["a reload waits", "vm-token login is tried at once"])
async def test_a_retry_after_holds_for_the_next_session_unless_a_person_asks(
        autojump_clock, asked, relogin):
    # New credentials while the API asked us to wait: a reload's session waits too (the
    # API asked us, not a session); `vm-token login` is a person's decision to try now.
    backend = FakeOidc(lifetime=300)
    holding = True

    def fault(kind: str) -> None:
        if holding and kind == "refresh":
            raise upstream.TransientError("HTTP 429", retry_after=900)

    backend.fault = fault
    async with running_keeper(backend, pick=0.5) as keeper:
        await trio.sleep(201)  # the refresh at 200 was answered 429: held until 1100
        holding = False
        await keeper.account().start(credentials(), asked=asked)
        await trio.sleep(1000)
        assert backend.times("login") == [0, relogin]
