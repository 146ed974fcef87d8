"""The keeper: the request API over the accounts that hold the tokens, one per profile.

`server` asks it; only the accounts' sessions ask `upstream`. See session.py for the
concurrency rules, slot.py and timing.py for the time rules. Each account is on its own:
its session, tokens, backoff and failures never delay another's clients.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

from vm_token.errors import UnknownProfile

from ..config.settings import DEFAULT_PROFILE, PasswordSource
from ..text import quote
from .account import Account, Backend, Connect
from .answers import Changes
from .slot import TokenInfo
from .timing import BACKOFF_CAP

__all__ = ["Keeper"]


class Keeper:
    """Fresh access tokens, in memory, for every client, for every profile."""

    def __init__(
        self,
        connect: Connect | Backend | None = None,
        *,
        default_videomanager: str | None = None,
        videomanagers: Sequence[str] = (),
        idle_timeout: float = 3600.0,
        max_backoff: float = BACKOFF_CAP,
        rng: random.Random | None = None,
        calls: Counter[str] | None = None,
    ) -> None:
        self.accounts: dict[str, Account] = {}
        self.default_profile = DEFAULT_PROFILE
        self._nursery: trio.Nursery | None = None
        self._pending: list[Callable[[], Awaitable[None]]] = []
        self.changes = Changes()  # of every account: what `status` shows changed
        if connect is not None:
            account = self.accounts[DEFAULT_PROFILE] = Account(
                connect, default_videomanager=default_videomanager,
                videomanagers=videomanagers, idle_timeout=idle_timeout,
                max_backoff=max_backoff, rng=rng, calls=calls)
            account.config.changes = self.changes

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run every account's tasks until cancelled."""
        async with trio.open_nursery() as nursery:
            for account in self.accounts.values():
                await nursery.start(account.run)
            self._nursery = nursery
            for prepare in self._pending:
                await prepare()
            self._pending.clear()
            task_status.started()
            await trio.sleep_forever()

    async def add(self, name: str, account: Account,
                  prepare: Callable[[], Awaitable[None]] | None = None) -> None:
        """A new profile's account, running from now on; `prepare` (starting its session)
        runs before clients can see it, so none meets an account without one."""
        account.config.changes = self.changes
        if self._nursery is not None:
            await self._nursery.start(account.run)
            if prepare is not None:
                await prepare()
            self.accounts[name] = account
        else:
            self.accounts[name] = account  # run() starts it; prepare after that
            if prepare is not None:
                self._pending.append(prepare)

    def remove(self, name: str) -> None:
        """A profile gone from the configuration: its session ends, its tokens go."""
        account = self.accounts.pop(name, None)
        if account is not None:
            account.stop()
            self.changes.note()

    def account(self, profile: str | None = None) -> Account:
        """The account of `profile` (None: the default one); UnknownProfile if none."""
        name = profile if profile is not None else self.default_profile
        account = self.accounts.get(name)
        if account is None:
            known = ", ".join(sorted(self.accounts)) or "none"
            raise UnknownProfile(f"no profile {quote(name)}; configured: {known}")
        return account

    # -- the default profile's account, as before profiles (tests, single-profile use) --

    async def start_session(self, source: PasswordSource | None,
                            profile: str | None = None) -> None:
        await self.account(profile).start(source)

    def configure(self, *, default_videomanager: str | None, videomanagers: Sequence[str],
                  idle_timeout: float, max_backoff: float = BACKOFF_CAP,
                  profile: str | None = None) -> None:
        self.account(profile).configure(default_videomanager=default_videomanager,
                                        videomanagers=videomanagers,
                                        idle_timeout=idle_timeout, max_backoff=max_backoff)

    @property
    def calls(self) -> Counter[str]:
        """Upstream calls made, by kind, over every profile."""
        total: Counter[str] = Counter()
        for account in self.accounts.values():
            total.update(account.calls)
        return total

    # -- requests ---------------------------------------------------------------------------

    async def wait_logged_in(self, profile: str | None = None) -> None:
        """Wait for the profile's session's first login; raise if it failed."""
        await self.account(profile).wait_logged_in()

    async def get(self, ref: str | None = None, min_ttl: float = 0.0, *,
                  profile: str | None = None) -> TokenInfo:
        """A token for VideoManager `ref` (id or name; None: default) valid > min_ttl s."""
        return await self.account(profile).get(ref, min_ttl)

    def held(self, ref: str | None, min_ttl: float,
             profile: str | None = None) -> TokenInfo | None:
        """What get() would answer at once, or None (also for a profile that is not
        configured: the full path says so)."""
        account = self.accounts.get(profile if profile is not None else self.default_profile)
        return account.held(ref, min_ttl) if account is not None else None

    def invalidate(self, token: str, ref: str | None = None, *,
                   profile: str | None = None) -> bool:
        """Drop `token` if it is the current one (of `ref`, or of any VideoManager)."""
        return self.account(profile).invalidate(token, ref)

    def list(self, profile: str | None = None) -> list[dict[str, Any]]:
        """The profile's VideoManagers, with what we hold for each. No tokens."""
        return self.account(profile).list()

    def state(self, profile: str | None = None) -> dict[str, Any]:
        """The profile's state for `status`. No secrets."""
        return self.account(profile).state()

    def next_expiry(self) -> float:
        """When the first token held, of any profile, expires (inf: none held); see
        `changes` for every other change `status` shows."""
        return min((account.session.next_expiry() for account in self.accounts.values()
                    if account.session is not None), default=math.inf)
