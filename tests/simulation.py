"""A month in the life of the daemon, on trio's MockClock (issue 19).

The real keeper — accounts, sessions, slots — and the real request dispatcher, against
in-memory APIs with the documented lifetimes, while faults are drawn at random and clients
ask at random. Invariants are checked as it runs; the first broken one ends the run with
the seed and the last minutes of history.

    Provider   one profile's API and identity provider: tokens with their true lifetimes,
               refresh tokens (rotated, reuse detected), sessions, and the faults now on
    Faults     what goes wrong when, drawn from the seed
    Month      the profiles, the clients, the invariants and the clock

The profiles: `legacy` (the API's own login, a password), `oidc` (OpenID Connect with a
password; Keycloak-like rotation, reuse ends the session, idle and max session
lifetimes), `person` (OpenID Connect after an interactive login: when its session ends,
somebody logs in again, some time later).
"""

from __future__ import annotations

import collections
import gc
import logging
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

import trio
import trio.testing
from pydantic import SecretStr

from vm_token import protocol
from vm_tokend.config.passwords import PasswordSource
from vm_tokend.keeper import Keeper, Refused
from vm_tokend.keeper.account import Account
from vm_tokend.server.dispatch import FAST_CACHE, Dispatcher
from vm_tokend.server.routing import Routes
from vm_tokend.tasks import count_tasks
from vm_tokend.upstream import base as upstream
from vm_tokend.upstream.base import Grant, VideoManagerRef

HOUR, DAY = 3600.0, 86400.0
ACCESS_LIFETIME = 300.0  # documented: access tokens live 5 minutes
LEGACY_REFRESH_LIFETIME = 3600.0  # and legacy refresh tokens an hour
SSO_IDLE, SSO_MAX = 1800.0, 10 * HOUR  # Keycloak's defaults
MAX_BACKOFF = 60.0
UPSTREAM_TIMEOUT = 30.0  # what an answer slower than the timeouts costs
VMS = tuple(VideoManagerRef(str(1000 + n), f"VM{n}") for n in range(1, 7))
# min_ttl a client may ask for: below what a token has left at its refresh (a third of
# five minutes, less the jitter), so that asking never forces refreshes of its own.
MIN_TTLS = (0.0, 0.0, 10.0, 30.0, 60.0)
PROFILES = ("legacy", "oidc", "person")
CLIENT_GAP = 450.0  # seconds between a client's requests, on average
# Upstream calls a token costs in a healthy hour: one every 200 s (at 2/3 of five
# minutes) is 18, and one for a login or a list that falls into the hour.
CALLS_PER_HOUR = 19
SETTLE = 10 * 60.0  # after a fault, time for the backlog of attempts to clear


class Violation(AssertionError):
    """An invariant broken; `.invariant` names it."""

    def __init__(self, invariant: str, detail: str) -> None:
        super().__init__(f"{invariant}: {detail}")
        self.invariant = invariant


@dataclass
class Token:
    expires_at: float
    vm: str | None  # None: every VideoManager (OIDC)
    session: int
    killed_at: float = math.inf  # ended out of band: its session, a revocation
    reported_at: float = math.inf  # first reported rejected by a client


@dataclass
class Refresh:
    session: int
    expires_at: float
    used: bool = False
    lost: bool = False  # used, but the answer never came: the client cannot know


@dataclass
class Fault:
    kind: str  # outage, 5xx, 429, 429-bare, slow, lost, revoke, end-session, password, step
    start: float
    end: float
    retry_after: float = 0.0


class Provider:
    """One profile's API and identity provider, as the keeper's backends see them."""

    client_id = "anonymous"

    def __init__(self, name: str, kind: str, password: str, rng: random.Random,
                 history: collections.deque[str]) -> None:
        self.name, self.kind = name, kind
        self.issuer = f"https://login.example/auth/realms/{name}"
        self.password = password
        self.rng = rng
        self.history = history
        self.tokens: dict[str, Token] = {}
        self.refreshes: dict[str, Refresh] = {}
        self.sessions: dict[int, tuple[float, float]] = {}  # id: (started, last use)
        self.ended: set[int] = set()
        self.latest: dict[int, str] = {}  # each session's newest refresh token
        self.serial = 0
        self.faults: list[Fault] = []  # those on now
        self.healthy_since = 0.0
        self.hold_until = -math.inf  # a Retry-After given
        self.calls: list[float] = []
        self.rejected_passwords: set[str] = set()  # refused since the credentials changed
        # what the provider saw go wrong; the month stops at once (a daemon that loops
        # without waiting would never let a checker run)
        self.violated: Callable[[Violation], None] = lambda violation: None

    # -- the truth the invariants check against -------------------------------------------

    def accepts(self, token: str, vm: str, now: float) -> bool:
        record = self.tokens.get(token)
        return (record is not None and now < record.expires_at and now < record.killed_at
                and (record.vm is None or record.vm == vm))

    def note(self, text: str) -> None:
        self.history.append(f"{trio.current_time():12.1f} {self.name}: {text}")

    def _new(self, prefix: str) -> str:
        self.serial += 1
        return f"{self.name}-{prefix}-{self.serial}"

    # -- faults on the way in and out -----------------------------------------------------

    def _on(self, kind: str) -> Fault | None:
        return next((f for f in self.faults if f.kind == kind), None)

    async def _enter(self, what: str) -> Fault | None:
        """Every call: counted, checked against a Retry-After, and failed as the faults
        on now say. Returns a fault that strikes after the work is done (a lost answer)."""
        now = trio.current_time()
        self.calls.append(now)
        if now < self.hold_until:
            self.violated(Violation(
                "retry-after", f"{self.name}: {what} at {now:.1f}, Retry-After held until "
                               f"{self.hold_until:.1f}"))
        if self._on("outage"):
            raise upstream.TransientError("cannot connect: connection refused")
        if self._on("5xx"):
            raise upstream.TransientError("HTTP 503 Service Unavailable")
        fault = self._on("429") or self._on("429-bare")
        if fault is not None:
            if fault.kind == "429":
                self.hold_until = now + fault.retry_after
                raise upstream.TransientError("HTTP 429", retry_after=fault.retry_after)
            raise upstream.TransientError("HTTP 429")
        if self._on("slow"):
            await trio.sleep(UPSTREAM_TIMEOUT)
            if self.rng.random() < 0.5:  # the timeout struck before the request was sent
                raise upstream.TransientError("timed out connecting")
            return Fault("lost", now, now)  # or after: it may have taken effect
        return self._on("lost")

    @staticmethod
    def _leave(fault: Fault | None) -> None:
        if fault is not None:
            raise upstream.TransientError("the connection was lost before the answer",
                                          maybe_done=True)

    # -- logins and refreshes ---------------------------------------------------------------

    def _issue(self, session: int, vm: str | None, requested: float,
               refresh_lifetime: float | None) -> Grant:
        now = trio.current_time()
        access = self._new("access")
        self.tokens[access] = Token(now + ACCESS_LIFETIME, vm, session)
        refresh = self._new("refresh")
        self.refreshes[refresh] = Refresh(session, now + (refresh_lifetime or math.inf))
        self.latest[session] = refresh
        return Grant(access_token=access, refresh_token=refresh,
                     videomanagers=VMS if self.kind == "legacy" else (),
                     valid_for=vm, lifetime=ACCESS_LIFETIME,
                     refresh_lifetime=refresh_lifetime, requested_at=requested)

    async def login(self, username: str, password: str) -> Grant:
        requested = trio.current_time()
        late = await self._enter("login")
        if password != self.password:
            if password in self.rejected_passwords:
                self.violated(Violation(
                    "no-timed-relogin", f"{self.name}: a rejected password tried again "
                                        f"at {requested:.1f} with no new credentials"))
            self.rejected_passwords.add(password)
            self.note("login rejected")
            raise upstream.CredentialsRejected("the API rejected the credentials: HTTP 401")
        self.serial += 1
        session = self.serial
        self.sessions[session] = (requested, requested)
        self.note(f"login, session {session}")
        grant = self._issue(session, VMS[0].id if self.kind == "legacy" else None, requested,
                            LEGACY_REFRESH_LIFETIME if self.kind == "legacy" else SSO_IDLE)
        self._leave(late)
        return grant

    async def refresh(self, refresh_token: str, videomanager_id: str | None = None) -> Grant:
        requested = trio.current_time()
        late = await self._enter("refresh")
        record = self.refreshes.get(refresh_token)
        if record is None:
            raise upstream.RefreshRejected("invalid_grant (unknown refresh token)")
        if record.used and self.kind != "legacy":
            if not (record.lost and self.name == "person"):
                self.violated(Violation(
                    "refresh-token-reuse", f"{self.name}: a refresh token sent twice at "
                                           f"{requested:.1f}"))
            # (a session without a password may try again a refresh whose answer was
            # lost: its only other way is to give up the session at once)
            self._end(record.session, "reuse")  # as Keycloak does
            raise upstream.RefreshRejected("invalid_grant (refresh token reuse)")
        if record.used:
            self.violated(Violation(
                "refresh-token-reuse", f"{self.name}: a rotated refresh token sent again at "
                                       f"{requested:.1f}"))
            raise upstream.RefreshRejected("the API rejected the refresh token: HTTP 401")
        started, _ = self.sessions.get(record.session, (requested, requested))
        if (record.session in self.ended or requested >= record.expires_at
                or self.kind != "legacy" and requested >= started + SSO_MAX):
            raise upstream.RefreshRejected("invalid_grant (session not active)")
        record.used = True
        record.lost = late is not None
        self.sessions[record.session] = (started, requested)
        lifetime = LEGACY_REFRESH_LIFETIME if self.kind == "legacy" \
            else min(SSO_IDLE, started + SSO_MAX - requested)  # as Keycloak tells it
        grant = self._issue(record.session, videomanager_id, requested, lifetime)
        self._leave(late)
        return grant

    async def videomanagers(self, access_token: str) -> tuple[VideoManagerRef, ...]:
        late = await self._enter("videomanagers")
        self._leave(late)
        return VMS

    # -- out of band: what the provider does on its own -----------------------------------

    def _end(self, session: int, why: str) -> None:
        self.ended.add(session)
        now = trio.current_time()
        for token in self.tokens.values():
            if token.session == session:
                token.killed_at = min(token.killed_at, now)
        self.note(f"session {session} ended ({why})")

    def end_sessions(self, why: str) -> None:
        for session in list(self.sessions):
            if session not in self.ended:
                self._end(session, why)

    def revoke_refresh_tokens(self) -> None:
        for record in self.refreshes.values():
            record.used = True  # refused from now on, and not a reuse by the client
        self.refreshes = {}
        self.note("refresh tokens revoked")

    def forget_old(self, now: float) -> None:
        """Keep the books small: tokens long expired cannot be handed out anyway."""
        self.tokens = {t: r for t, r in self.tokens.items() if r.expires_at > now - HOUR}
        self.refreshes = {t: r for t, r in self.refreshes.items()
                          if r.expires_at > now - HOUR or not r.used}
        old = {s for s, (started, _) in self.sessions.items()
               if started < now - SSO_MAX - HOUR and s != max(self.sessions)}
        self.sessions = {s: v for s, v in self.sessions.items() if s not in old}
        self.latest = {s: v for s, v in self.latest.items() if s not in old}
        self.ended -= old


@dataclass
class Stats:
    requests: int = 0
    served: int = 0
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    faults: collections.Counter[str] = field(default_factory=collections.Counter)
    reports: int = 0
    samples: list[dict[str, int]] = field(default_factory=list)


FAULT_KINDS = ("outage", "5xx", "429", "429-bare", "slow", "lost", "revoke", "end-session",
               "password", "step")


class Month:
    """The whole simulation: run() it under trio with the MockClock (autojump)."""

    def __init__(self, seed: int, days: float, *, clients: int = 2,
                 fault_gap: float = 10 * HOUR, fault_kinds: tuple[str, ...] = FAULT_KINDS,
                 drift: tuple[float, float] = (2 * DAY, 5 * DAY)) -> None:
        self.seed, self.days = seed, days
        self.rng = random.Random(seed)
        self.history: collections.deque[str] = collections.deque(maxlen=400)
        self.providers = {
            name: Provider(name, "legacy" if name == "legacy" else "oidc",
                           f"{name}-password-0", random.Random(self.rng.random()),
                           self.history)
            for name in PROFILES}
        self.clients = clients
        self.fault_gap = fault_gap
        self.fault_kinds = fault_kinds
        self.drift = drift
        self.stats = Stats()
        self.passwords = {name: p.password for name, p in self.providers.items()}
        self.wall_offset = 0.0
        self.keeper: Keeper | None = None
        self.dispatcher: Dispatcher | None = None
        self.in_use: dict[str, tuple[str, ...]] = {}
        self.last_asked: dict[tuple[str, str], float] = {}

    def fail(self, violation: Violation) -> NoReturn:
        history = "\n".join(self.history)
        raise Violation(violation.invariant,
                        f"{violation} (SOAK_SEED={self.seed}, day "
                        f"{trio.current_time() / DAY:.2f}); the last events:\n{history}")

    def note(self, text: str) -> None:
        self.history.append(f"{trio.current_time():12.1f} {text}")

    # -- setup ------------------------------------------------------------------------------

    async def _start(self, nursery: trio.Nursery) -> None:
        keeper = self.keeper = Keeper(rng=random.Random(self.rng.random()))
        keeper.default_profile = "legacy"
        for name, provider in self.providers.items():
            account = Account(provider, idle_timeout=HOUR, max_backoff=MAX_BACKOFF,
                              rng=random.Random(self.rng.random()))
            source = None if name == "person" else self._source(name)

            async def prepare(account: Account = account, source: Any = source,
                              provider: Provider = provider) -> None:
                if source is not None:
                    await account.start(source)
                else:
                    await self._person_logs_in(account, provider)

            await keeper.add(name, account, prepare)
        await nursery.start(keeper.run)
        self.dispatcher = Dispatcher(keeper, version="month", login=self._no_login,
                                     describe=lambda profile: {}, routes=Routes(keeper))

    def _source(self, name: str) -> PasswordSource:
        return PasswordSource(username=f"{name}@example.com",
                              password=SecretStr(self.passwords[name]))

    @staticmethod
    async def _no_login(profile: str | None, username: str, password: str) -> None:
        raise AssertionError("no client logs in through the socket here")

    async def _person_logs_in(self, account: Account, provider: Provider) -> None:
        """What `vm-token login --browser` ends with: a grant the daemon's session keeps."""
        requested = trio.current_time()
        provider.serial += 1
        session = provider.serial
        provider.sessions[session] = (requested, requested)
        grant = provider._issue(session, None, requested, SSO_IDLE)
        provider.note(f"a person logged in, session {session}")
        # a person's login is a person's decision to try now, Retry-After or not (the
        # daemon tries at once, as for `vm-token login`)
        provider.hold_until = -math.inf
        self.person_session = session
        await account.start_interactive(grant, "person@example.com",
                                        provider, "browser")  # type: ignore[arg-type]

    # -- the run ----------------------------------------------------------------------------

    async def run(self) -> Stats:
        end = self.days * DAY
        async with trio.open_nursery() as nursery:
            for provider in self.providers.values():
                def violated(v: Violation, scope: trio.CancelScope = nursery.cancel_scope
                             ) -> None:
                    self._violated(v, scope)

                provider.violated = violated
            await self._start(nursery)
            nursery.start_soon(self._drift)
            nursery.start_soon(self._person)
            for name in PROFILES:
                nursery.start_soon(self._faults, name, end)
                for n in range(self.clients):
                    nursery.start_soon(self._client, name, n)
            nursery.start_soon(self._sample)
            nursery.start_soon(self._count_calls)
            await trio.sleep_until(end)
            self._check_flat()
            nursery.cancel_scope.cancel()
        if self.violation is not None:
            self.fail(self.violation)
        return self.stats

    violation: Violation | None = None

    def _violated(self, violation: Violation, scope: trio.CancelScope) -> None:
        if self.violation is None:
            self.violation = violation
            self.note(f"broken: {violation}")
            scope.cancel()

    async def _drift(self) -> None:
        """Which VideoManagers each profile's clients use: a few, changing every few days
        (so that slots of those no longer used must be let go)."""
        while True:
            for name in PROFILES:
                self.in_use[name] = tuple(v.id for v in self.rng.sample(VMS, 2))
            self.note(f"in use now: {self.in_use}")
            await trio.sleep(self.rng.uniform(*self.drift))

    # -- clients and their invariants -------------------------------------------------------

    def _healthy(self, provider: Provider, now: float) -> bool:
        """The API has been healthy for max_backoff + 1 s (and past any Retry-After)."""
        return (not provider.faults and now - provider.healthy_since >= MAX_BACKOFF + 1
                and now >= provider.hold_until + 1)

    async def _client(self, name: str, n: int) -> None:
        provider = self.providers[name]
        rng = random.Random(self.rng.random())
        assert self.dispatcher is not None
        while True:
            await trio.sleep(rng.expovariate(1 / CLIENT_GAP))
            vm = rng.choice(self.in_use[name])
            min_ttl = rng.choice(MIN_TTLS)
            self.last_asked[name, vm] = trio.current_time()
            await self._ask(provider, name, vm, min_ttl)

    async def _ask(self, provider: Provider, name: str, vm: str, min_ttl: float,
                   *, retry: bool = True) -> None:
        assert self.dispatcher is not None
        request = {"v": 1, "op": "get", "vm": vm, "min_ttl": min_ttl, "profile": name}
        started = trio.current_time()
        healthy = self._healthy(provider, started) and self._credentials_good(name)
        self.stats.requests += 1
        frame = self.dispatcher.fast_reply(protocol.encode_frame(request)[4:])
        reply = protocol.decode_body(frame[4:]) if frame is not None \
            else await self.dispatcher(request)
        now = trio.current_time()
        if not reply.get("ok"):
            code = reply["error"]["code"]
            self.stats.errors[code] += 1
            if healthy and self._healthy(provider, now) and self._credentials_good(name):
                self.fail(Violation("served-once-healthy", (
                    f"{name}: {code} for {vm} at {now:.1f} though the API was healthy since "
                    f"{provider.healthy_since:.1f}: {reply['error']['message']}")))
            return
        self.stats.served += 1
        token = reply["token"]
        record = provider.tokens.get(token)
        if record is None or now >= record.expires_at or record.reported_at < now:
            self.fail(Violation("never-a-dead-token", (
                f"{name}: handed {token} for {vm} at {now:.1f}: "
                + ("unknown to the API" if record is None else
                   f"expired at {record.expires_at:.1f}" if now >= record.expires_at else
                   f"reported rejected at {record.reported_at:.1f}"))))
        if record.expires_at - now < min_ttl:
            self.fail(Violation("min-ttl", (
                f"{name}: {token} has {record.expires_at - now:.1f} s left, asked for "
                f"{min_ttl:g}")))
        wall_left = reply["expires_at"] - (self._wall(now))
        if abs(wall_left - (record.expires_at - now)) > 5:
            self.fail(Violation("expires-at", (
                f"{name}: expires_at says {wall_left:.0f} s left on the wall clock, the "
                f"API {record.expires_at - now:.0f}")))
        if healthy and now - started > 1.0:
            self.fail(Violation("no-delay-when-healthy", (
                f"{name}: a get for {vm} took {now - started:.1f} s with its API healthy")))
        if not provider.accepts(token, vm, now):
            # the API refuses it (its session ended out of band): report it, ask again
            self.stats.reports += 1
            record.reported_at = min(record.reported_at, now)
            await self.dispatcher({"v": 1, "op": "invalidate", "token": token, "vm": vm,
                                   "profile": name})
            if retry:
                await self._ask(provider, name, vm, min_ttl, retry=False)

    def _wall(self, now: float) -> float:
        return self.wall_zero + now + self.wall_offset

    wall_zero = 1.8e9  # the wall clock when the month starts

    def _credentials_good(self, name: str) -> bool:
        """Whether the daemon holds credentials the provider takes (a person's session:
        whether one is alive)."""
        provider = self.providers[name]
        if name == "person":
            # its session alive at the provider, and not waiting for a person's login
            session = self.person_session
            started, _ = provider.sessions.get(session, (-math.inf, 0.0))
            now = trio.current_time()
            latest = provider.refreshes.get(provider.latest.get(session, ""))  # None: revoked
            return (not self.person_out and session not in provider.ended
                    and now < started + SSO_MAX and latest is not None
                    and now < latest.expires_at)
        return self.passwords[name] == provider.password

    person_out = False
    person_session = 0

    # -- faults -----------------------------------------------------------------------------

    async def _faults(self, name: str, end: float) -> None:
        provider = self.providers[name]
        rng = random.Random(self.rng.random())
        while True:
            await trio.sleep(rng.expovariate(1 / self.fault_gap))
            kind = rng.choice(self.fault_kinds)
            if kind in ("revoke", "end-session") and name == "legacy":
                kind = "revoke"
            if kind == "password" and name == "person":
                kind = "end-session"
            self.stats.faults[kind] += 1
            await self._fault(provider, name, kind, rng)

    async def _fault(self, provider: Provider, name: str, kind: str,
                     rng: random.Random) -> None:
        now = trio.current_time()
        if kind in ("revoke", "end-session", "password", "step"):
            # at once: out of band; the API is "unhealthy" for what follows it
            provider.healthy_since = now
            if kind == "revoke":
                provider.revoke_refresh_tokens()
            elif kind == "end-session":
                provider.end_sessions("ended by the provider")
            elif kind == "password":
                await self._password_changes(provider, name, rng)
            else:
                self.wall_offset += rng.choice((-1, 1)) * rng.uniform(1, 2 * HOUR)
                self.note(f"the wall clock stepped to offset {self.wall_offset:.0f}")
            return
        length = math.exp(rng.uniform(math.log(1), math.log(3 * HOUR)))
        fault = Fault(kind, now, now + length,
                      retry_after=rng.uniform(1, 600) if kind == "429" else 0.0)
        provider.faults.append(fault)
        provider.note(f"{kind} for {length:.0f} s")
        await trio.sleep(length)
        provider.faults.remove(fault)
        # a call that began slow ends (fails) up to the timeout after the fault
        provider.healthy_since = trio.current_time() + (
            UPSTREAM_TIMEOUT if kind == "slow" else 0.0)
        provider.note(f"{kind} over")

    async def _password_changes(self, provider: Provider, name: str,
                                rng: random.Random) -> None:
        """The password changes at the provider (its sessions end); the daemon learns it
        by a reload some time later."""
        provider.password = f"{name}-password-{provider.serial}"
        provider.end_sessions("password changed")
        provider.note("password changed")
        await trio.sleep(rng.uniform(60, 3 * HOUR))
        self.passwords[name] = provider.password
        provider.rejected_passwords.clear()
        provider.healthy_since = trio.current_time()
        assert self.keeper is not None
        await self.keeper.account(name).start(self._source(name))
        self.note(f"{name}: reloaded with the new password")

    async def _person(self) -> None:
        """Whoever logs in for the `person` profile: some time after the daemon says a
        login is required (the session ended: by the provider, its lifetime, a refresh
        lost), minutes to hours later."""
        assert self.keeper is not None
        provider = self.providers["person"]
        rng = random.Random(self.rng.random())
        while True:
            await trio.sleep(60)
            if self.keeper.state("person").get("state") != "login_required":
                continue
            self.person_out = True
            provider.note("the daemon asks for a login")
            await trio.sleep(rng.uniform(60, 4 * HOUR))
            while True:
                try:
                    await self._person_logs_in(self.keeper.account("person"), provider)
                    break
                except Refused as exc:  # the login failed (the API fails): try again
                    provider.note(f"the login failed: {exc.message}")
                    await trio.sleep(rng.uniform(60, 600))
            self.person_out = False
            provider.healthy_since = trio.current_time()

    # -- calls in a healthy hour ------------------------------------------------------------

    async def _count_calls(self) -> None:
        """Each hour the API was healthy throughout (since SETTLE before it, credentials
        good): legacy at most CALLS_PER_HOUR per VideoManager in use, OIDC for all."""
        while True:
            start = trio.current_time()
            good = {name: self._credentials_good(name) for name in PROFILES}
            await trio.sleep(HOUR)
            end = trio.current_time()
            self._check_slots()  # first: a slot never let go costs calls too
            for name, provider in self.providers.items():
                if (provider.faults or provider.healthy_since > start - SETTLE
                        or provider.hold_until > start - SETTLE
                        or not good[name] or not self._credentials_good(name)):
                    continue
                calls = sum(1 for t in provider.calls if start <= t < end)
                in_use = {vm for (p, vm), t in self.last_asked.items()
                          if p == name and t >= start - HOUR} | {VMS[0].id}
                bound = CALLS_PER_HOUR * (len(in_use) if name == "legacy" else 1)
                if calls > bound:
                    self.fail(Violation("calls-per-hour", (
                        f"{name}: {calls} upstream calls in the healthy hour from "
                        f"{start:.0f}, more than {bound}")))
            for provider in self.providers.values():
                provider.calls = [t for t in provider.calls if t >= end]

    # -- nothing grows ----------------------------------------------------------------------

    async def _sample(self) -> None:
        while True:
            await trio.sleep(DAY)
            for provider in self.providers.values():
                provider.forget_old(trio.current_time())
            self.stats.samples.append(self._measure())

    def _check_slots(self) -> int:
        """The slots held; none for a VideoManager unused for longer than the idle
        timeout and the refresh after it (the default one is kept: pinned)."""
        assert self.keeper is not None
        slots = 0
        for name, account in self.keeper.accounts.items():
            session = account.session
            if session is None:
                continue
            for slot in session.slots():
                slots += 1
                vm = slot.label
                asked = max((t for (p, v), t in self.last_asked.items()
                             if p == name and (v == vm or f"VM{int(v) - 1000}" == vm)),
                            default=-math.inf)
                if name == "legacy" and vm != VMS[0].name \
                        and trio.current_time() - asked > 2 * HOUR + 600:
                    # (the default VideoManager's is kept: pinned)
                    self.fail(Violation("slots-let-go", (
                        f"{name}: a slot for {vm} held though unused since {asked:.0f}")))
        return slots

    def _measure(self) -> dict[str, int]:
        assert self.keeper is not None and self.dispatcher is not None
        gc.collect()
        slots = self._check_slots()
        return {"tasks": count_tasks(), "slots": slots,
                "frames": len(self.dispatcher._frames),
                "known_gets": len(self.dispatcher._known_gets),
                "objects": len(gc.get_objects())}

    def _check_flat(self) -> None:
        samples = self.stats.samples
        if len(samples) < 3:
            return
        first = samples[0]
        for later in samples[1:]:
            for key, value in later.items():
                # caches have bounds of their own; the rest is flat after the first day
                allowed = {"objects": first[key] * 1.25 + 20, "known_gets": FAST_CACHE,
                           "frames": 3 * len(VMS) * len(PROFILES)}.get(key, first[key] + 8)
                if value > allowed:
                    self.fail(Violation("nothing-grows", (
                        f"{key} went from {first[key]} on day 1 to {value}")))


class _WallClock:
    """The `time` module for the keeper's: the month's wall clock, which steps."""

    def __init__(self, month: Month) -> None:
        self.month = month

    def time(self) -> float:
        return self.month._wall(trio.current_time())

    @staticmethod
    def monotonic() -> float:
        return trio.current_time()


def run_month(seed: int, days: float, **options: Any) -> Stats:
    """One run on the MockClock (autojump); Violation if an invariant breaks."""
    from vm_tokend.keeper import session as session_module
    from vm_tokend.keeper import slot as slot_module

    # trio shuffles the tasks it runs at each step, on purpose, from a random number
    # generator of its own (the clock's offset too): seeded, a run is the same each time.
    trio._core._run._r.seed(seed)  # noqa: SLF001 - no public way to seed it
    month = Month(seed, days, **options)
    clock = trio.testing.MockClock(autojump_threshold=0)
    result: list[Stats] = []

    async def main() -> None:
        result.append(await month.run())

    modules = (slot_module, session_module)
    saved = [getattr(module, "time") for module in modules]  # noqa: B009 - not exported
    for module in modules:
        setattr(module, "time", _WallClock(month))  # noqa: B010
    saved_boot = slot_module.boot_clock
    slot_module.boot_clock = trio.current_time  # the month's machine never sleeps
    # a month of warnings is a hundred thousand lines: what the run reports is the history
    logging.disable(logging.CRITICAL)
    try:
        trio.run(main, clock=clock)
    except BaseExceptionGroup as group:  # a violation met in a task of the run's
        found = group.subgroup(Violation)
        if found is None:
            raise
        first: BaseException = found
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from None
    finally:
        for module, value in zip(modules, saved, strict=True):
            setattr(module, "time", value)  # noqa: B010
        slot_module.boot_clock = saved_boot
        logging.disable(logging.NOTSET)
    return result[0]

