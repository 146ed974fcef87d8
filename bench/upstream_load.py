"""Upstream load: one simulated hour on trio's MockClock, the real Keeper against an
in-memory API with the documented lifetimes (access tokens 5 minutes, refresh tokens one
hour), three VideoManagers, clients asking at a steady rate. Counts the API calls.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import trio
import trio.testing
from pydantic import SecretStr

from vm_tokend import upstream
from vm_tokend.keeper import Keeper
from vm_tokend.settings import Credentials
from vm_tokend.upstream import Grant, VideoManagerRef

HOUR = 3600.0
ACCESS_LIFETIME = 300.0
REFRESH_LIFETIME = 3600.0
VIDEOMANAGERS = (VideoManagerRef("1", "Marketing"), VideoManagerRef("2", "Sales"),
                 VideoManagerRef("3", "Support"))
BATCH = 0.01  # clients' requests are issued in batches every 10 ms of virtual time


class SimulatedApi:
    """Login and refresh as the API documents them; counts calls per VideoManager."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()  # the AuthBackend interface
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


async def _simulate(rate: float) -> dict[str, Any]:
    api = SimulatedApi()
    names = [vm.name for vm in VIDEOMANAGERS]
    served = 0
    async with trio.open_nursery() as nursery:
        keeper = Keeper(api, rng=random.Random(7))  # noqa: S311 - jitter, not crypto
        await nursery.start(keeper.run)
        await keeper.start_session(Credentials("bench", SecretStr("pw")))
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
    total = sum(api.calls.values())
    return {"rate": rate, "served": served, "calls": total,
            "per_videomanager": max(api.per_videomanager.values()),
            "mean_per_videomanager": total / len(VIDEOMANAGERS)}


def simulate(rate: float) -> dict[str, Any]:
    """Upstream calls in one simulated hour of clients asking `rate` times a second."""
    return trio.run(_simulate, rate, clock=trio.testing.MockClock(autojump_threshold=0))
