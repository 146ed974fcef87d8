"""An in-memory AuthBackend on trio's clock, for the keeper's time rules.

It behaves like the API as far as the keeper can tell — rotating refresh tokens, 401 on a
used or expired one, 403 for VideoManagers without rights — and records the virtual time
of every call, so tests can assert exact schedules.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio
from pydantic import SecretStr

from vm_tokend import upstream
from vm_tokend.config.settings import PasswordSource
from vm_tokend.keeper import Keeper
from vm_tokend.upstream.base import Grant, VideoManagerRef

VMS = (VideoManagerRef("1", "Marketing"), VideoManagerRef("2", "Sales"),
       VideoManagerRef("3", "Support"), VideoManagerRef("4", "Legal"))


@dataclass
class Call:
    at: float
    kind: str
    vm: str | None
    ended: float | None = None


async def _record(backend: FakeBackend | FakeOidc, kind: str, vm: str | None) -> Call:
    """Count and log a call at the virtual time it begins, take the backend's delay, and
    raise its injected fault, if any."""
    backend.calls[kind] += 1
    call = Call(trio.current_time(), kind, vm)
    backend.log.append(call)
    backend.in_flight += 1
    backend.max_in_flight = max(backend.max_in_flight, backend.in_flight)
    try:
        if backend.delay:
            await trio.sleep(backend.delay)
        if backend.fault is not None:
            backend.fault(kind)
        fault_for = getattr(backend, "fault_for", None)
        if fault_for is not None:
            fault_for(kind, vm)
    finally:
        backend.in_flight -= 1
        call.ended = trio.current_time()
    return call


@dataclass
class FakeBackend:
    lifetime: float = 300.0
    refresh_lifetime: float | None = None
    delay: float = 0.0
    password: str = "right"
    rotate: bool = True
    forbidden: set[str] = field(default_factory=set)
    # Called before answering; may raise an UpstreamError to inject a failure.
    fault: Callable[[str], None] | None = None
    # The same, told which VideoManager a refresh is for (None for a login).
    fault_for: Callable[[str, str | None], None] | None = None
    login_vm: str = "1"  # what a login's token is valid for
    videomanagers: tuple[VideoManagerRef, ...] = VMS
    send_refresh_token: bool = True  # False: refresh answers carry none (login's do)
    calls: Counter[str] = field(default_factory=Counter)
    log: list[Call] = field(default_factory=list)
    issued: list[str] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    reused_refresh_tokens: int = 0
    _refresh_token: str | None = None
    _used: set[str] = field(default_factory=set)
    _serial: int = 0

    def times(self, kind: str, vm: str | None = None) -> list[float]:
        return [c.at for c in self.log if c.kind == kind and (vm is None or c.vm == vm)]

    def access_tokens(self) -> list[str]:
        return [t for t in self.issued if t.startswith("access-")]

    def expire_refresh_token(self) -> None:
        self._refresh_token = None

    def _new(self, prefix: str) -> str:
        self._serial += 1
        token = f"{prefix}-{self._serial}"
        self.issued.append(token)
        return token

    def _grant(self, vm: str, refresh_token: str | None, call: Call) -> Grant:
        return Grant(
            access_token=self._new("access"),
            refresh_token=refresh_token,
            videomanagers=self.videomanagers,
            valid_for=vm,
            lifetime=self.lifetime,
            refresh_lifetime=self.refresh_lifetime,
            requested_at=call.at,
        )

    async def _enter(self, kind: str, vm: str | None) -> Call:
        return await _record(self, kind, vm)

    async def login(self, username: str, password: str) -> Grant:
        call = await self._enter("login", None)
        if password != self.password:
            raise upstream.CredentialsRejected("the API rejected the credentials: HTTP 401")
        self._refresh_token = self._new("refresh")
        return self._grant(self.login_vm, self._refresh_token, call)

    async def refresh(self, refresh_token: str, videomanager_id: str) -> Grant:
        call = await self._enter("refresh", videomanager_id)
        if refresh_token in self._used:
            self.reused_refresh_tokens += 1
        if refresh_token != self._refresh_token:
            raise upstream.RefreshRejected("the API rejected the refresh token: HTTP 401")
        if videomanager_id in self.forbidden:
            raise upstream.Forbidden(f"no rights for VideoManager {videomanager_id}: HTTP 403")
        if self.rotate:
            self._used.add(refresh_token)
            self._refresh_token = self._new("refresh")
        return self._grant(videomanager_id,
                           self._refresh_token if self.send_refresh_token else None, call)


@dataclass
class FakeOidc:
    """An OpenID Connect provider as Keycloak behaves, on trio's clock: one token for every
    VideoManager, refresh tokens rotated on every use, and a reused one ends the session
    (every later refresh is invalid_grant too, until a new login)."""

    kind = "oidc"
    issuer: str = "https://login.example/auth/realms/platform"
    client_id: str = "anonymous"
    lifetime: float = 300.0
    refresh_lifetime: float | None = 3600.0
    password: str = "right"
    rotate: bool = True
    videomanagers_listed: tuple[VideoManagerRef, ...] = VMS[:3]
    delay: float = 0.0
    fault: Callable[[str], None] | None = None
    calls: Counter[str] = field(default_factory=Counter)
    log: list[Call] = field(default_factory=list)
    issued: list[str] = field(default_factory=list)
    reused_refresh_tokens: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    _valid_refresh: str | None = None
    _refresh_expires: float = 0.0
    _used: set[str] = field(default_factory=set)
    _serial: int = 0

    def times(self, kind: str) -> list[float]:
        return [c.at for c in self.log if c.kind == kind]

    def access_tokens(self) -> list[str]:
        return [t for t in self.issued if t.startswith("access-")]

    def end_session(self) -> None:
        self._valid_refresh = None

    def _new(self, prefix: str) -> str:
        self._serial += 1
        token = f"{prefix}-{self._serial}"
        self.issued.append(token)
        return token

    async def _enter(self, kind: str) -> Call:
        return await _record(self, kind, None)

    def _grant(self, call: Call, refresh_token: str | None) -> Grant:
        return Grant(access_token=self._new("access"), refresh_token=refresh_token,
                     videomanagers=(), valid_for=None, lifetime=self.lifetime,
                     refresh_lifetime=self.refresh_lifetime, requested_at=call.at)

    async def login(self, username: str, password: str) -> Grant:
        call = await self._enter("login")
        if password != self.password:
            raise upstream.CredentialsRejected(
                "the identity provider rejected the credentials: invalid_grant")
        self._valid_refresh = self._new("refresh")
        self._refresh_expires = call.at + (self.refresh_lifetime or math.inf)
        return self._grant(call, self._valid_refresh)

    async def refresh(self, refresh_token: str) -> Grant:
        call = await self._enter("refresh")
        if refresh_token in self._used:
            self.reused_refresh_tokens += 1
            self._valid_refresh = None  # Keycloak ends the session
            raise upstream.RefreshRejected(
                "invalid_grant (Maximum allowed refresh token reuse exceeded)")
        if refresh_token != self._valid_refresh or call.at >= self._refresh_expires:
            raise upstream.RefreshRejected("invalid_grant (Session not active)")
        if not self.rotate:
            return self._grant(call, refresh_token)
        self._used.add(refresh_token)
        self._valid_refresh = self._new("refresh")
        return self._grant(call, self._valid_refresh)

    async def videomanagers(self, access_token: str) -> tuple[VideoManagerRef, ...]:
        await self._enter("videomanagers")
        return self.videomanagers_listed


class PinnedRandom(random.Random):
    """uniform(a, b) always answers a + (b - a) * pick: exact, predictable jitter."""

    def __init__(self, pick: float) -> None:
        super().__init__(0)
        self.pick = pick

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * self.pick


def credentials(password: str = "right") -> PasswordSource:
    return PasswordSource(username="someone@example.com", password=SecretStr(password))


@asynccontextmanager
async def running_keeper(backend: FakeBackend | FakeOidc, *, password: str | None = "right",
                         pick: float | None = 0.5, **options):
    rng = PinnedRandom(pick) if pick is not None else random.Random(1)
    async with trio.open_nursery() as nursery:
        keeper = Keeper(backend, rng=rng, **options)
        await nursery.start(keeper.run)
        if password is not None:
            await keeper.start_session(credentials(password))
        yield keeper
        nursery.cancel_scope.cancel()
