"""Upstream load: one simulated hour on trio's MockClock, the real Keeper against an
in-memory API with the documented lifetimes (access tokens 5 minutes, refresh tokens one
hour), three VideoManagers, clients asking at a steady rate. Counts the API calls — for
the API's own login (a token per VideoManager) and for OpenID Connect (one token for
all, refresh tokens rotated on every use and never to be sent twice).
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import trio
import trio.testing
from pydantic import SecretStr

from vm_tokend.config.settings import PasswordSource
from vm_tokend.keeper import Keeper
from vm_tokend.upstream import base as upstream
from vm_tokend.upstream.base import Grant, VideoManagerRef

HOUR = 3600.0
ACCESS_LIFETIME = 300.0
REFRESH_LIFETIME = 3600.0
VIDEOMANAGERS = (VideoManagerRef("1", "Marketing"), VideoManagerRef("2", "Sales"),
                 VideoManagerRef("3", "Support"))
BATCH = 0.01  # clients' requests are issued in batches every 10 ms of virtual time


class SimulatedApi:
    """Login and refresh as the API documents them; counts calls per VideoManager."""

    kind = "legacy"

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.per_videomanager: Counter[str] = Counter()
        self._refresh_expires = 0.0
        self._serial = 0

    def _grant(self, vm: str, refresh_token: str) -> Grant:
        self._serial += 1
        return Grant(
            access_token=f"access-{self._serial}", refresh_token=refresh_token,
            videomanagers=VIDEOMANAGERS, valid_for=vm,
            lifetime=ACCESS_LIFETIME - upstream.CLOCK_SLACK,
            refresh_lifetime=REFRESH_LIFETIME - upstream.CLOCK_SLACK,
            requested_at=trio.current_time(),
        )

    async def login(self, username: str, password: str) -> Grant:
        self.calls["login"] += 1
        self.per_videomanager["1"] += 1
        self._refresh_expires = trio.current_time() + REFRESH_LIFETIME
        return self._grant("1", f"refresh-{self._serial}")

    async def refresh(self, refresh_token: str, videomanager_id: str) -> Grant:
        self.calls["refresh"] += 1
        self.per_videomanager[videomanager_id] += 1
        if trio.current_time() >= self._refresh_expires:
            raise upstream.RefreshRejected("refresh token expired")
        return self._grant(videomanager_id, refresh_token)  # not rotated: the worst case


class SimulatedOidc:
    """Keycloak's password and refresh grants with rotation: a reused refresh token ends
    the session (counted in `reused`). One token covers every VideoManager."""

    kind = "oidc"
    issuer = "https://login.example/auth/realms/platform"
    client_id = "anonymous"

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.per_videomanager: Counter[str] = Counter()  # stays empty: one token for all
        self.reused = 0
        self._current: str | None = None
        self._used: set[str] = set()
        self._refresh_expires = 0.0
        self._serial = 0

    def _grant(self) -> Grant:
        self._serial += 1
        self._current = f"refresh-{self._serial}"
        return Grant(
            access_token=f"access-{self._serial}", refresh_token=self._current,
            videomanagers=(), valid_for=None,
            lifetime=ACCESS_LIFETIME - upstream.CLOCK_SLACK,
            refresh_lifetime=self._refresh_expires - trio.current_time(),
            requested_at=trio.current_time(),
        )

    async def login(self, username: str, password: str) -> Grant:
        self.calls["login"] += 1
        self._refresh_expires = trio.current_time() + REFRESH_LIFETIME  # the SSO session
        return self._grant()

    async def refresh(self, refresh_token: str) -> Grant:
        self.calls["refresh"] += 1
        if refresh_token in self._used:
            self.reused += 1
            self._current = None
        self._used.add(refresh_token)
        if refresh_token != self._current or trio.current_time() >= self._refresh_expires:
            raise upstream.RefreshRejected("invalid_grant")
        return self._grant()

    async def videomanagers(self, access_token: str) -> tuple[VideoManagerRef, ...]:
        self.calls["videomanagers"] += 1
        return VIDEOMANAGERS


async def _simulate(rate: float, oidc: bool) -> dict[str, Any]:
    api: SimulatedApi | SimulatedOidc = SimulatedOidc() if oidc else SimulatedApi()
    names = [vm.name for vm in VIDEOMANAGERS]
    served = 0
    async with trio.open_nursery() as nursery:
        keeper = Keeper(api, rng=random.Random(7))  # noqa: S311 - jitter, not crypto
        await nursery.start(keeper.run)
        await keeper.start_session(PasswordSource("bench", SecretStr("pw")))
        started = trio.current_time()
        per_batch = rate * BATCH
        owed = 0.0
        tick = 0
        while trio.current_time() - started < HOUR:
            owed += per_batch
            while owed >= 1:
                await keeper.get(names[served % 3])
                served += 1
                owed -= 1
            tick += 1
            await trio.sleep_until(started + tick * BATCH)
        nursery.cancel_scope.cancel()
    token_calls = api.calls["login"] + api.calls["refresh"]
    return {"rate": rate, "served": served, "calls": sum(api.calls.values()),
            "token_calls": token_calls, "listings": api.calls["videomanagers"],
            "per_videomanager": max(api.per_videomanager.values(), default=0),
            "mean_per_videomanager": token_calls / len(VIDEOMANAGERS),
            "reused": getattr(api, "reused", 0)}


def simulate(rate: float, oidc: bool = False) -> dict[str, Any]:
    """Upstream calls in one simulated hour of clients asking `rate` times a second."""
    return trio.run(_simulate, rate, oidc,
                    clock=trio.testing.MockClock(autojump_threshold=0))
