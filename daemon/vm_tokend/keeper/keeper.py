"""The keeper: the request API over the account that holds the tokens.

`server` asks it; only the account's sessions ask `upstream`. See session.py for the
concurrency rules, slot.py and timing.py for the time rules.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from typing import Any

import trio

from ..settings import Credentials
from .account import Account, Backend, Connect
from .slot import TokenInfo
from .timing import BACKOFF_CAP

__all__ = ["Keeper"]


class Keeper:
    """Fresh access tokens, in memory, for every client."""

    def __init__(
        self,
        connect: Connect | Backend,
        *,
        default_videomanager: str | None = None,
        videomanagers: Sequence[str] = (),
        idle_timeout: float = 3600.0,
        max_backoff: float = BACKOFF_CAP,
        rng: random.Random | None = None,
        calls: Counter[str] | None = None,
    ) -> None:
        self.account = Account(connect, default_videomanager=default_videomanager,
                               videomanagers=videomanagers, idle_timeout=idle_timeout,
                               max_backoff=max_backoff, rng=rng, calls=calls)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the keeper's tasks until cancelled."""
        await self.account.run(task_status=task_status)

    async def start_session(self, credentials: Credentials | None) -> None:
        """Forget everything and, given credentials, log in with them in the background."""
        await self.account.start(credentials)

    def configure(self, *, default_videomanager: str | None, videomanagers: Sequence[str],
                  idle_timeout: float, max_backoff: float = BACKOFF_CAP) -> None:
        self.account.configure(default_videomanager=default_videomanager,
                               videomanagers=videomanagers, idle_timeout=idle_timeout,
                               max_backoff=max_backoff)

    @property
    def calls(self) -> Counter[str]:
        """Upstream calls made, by kind (login, refresh, videomanagers, webfinger, …)."""
        return self.account.calls

    @property
    def credentials(self) -> Credentials | None:
        return self.account.credentials

    @property
    def rejected(self) -> bool:
        return self.account.rejected

    def logged_in_with(self, password: str) -> bool:
        return self.account.logged_in_with(password)

    async def wait_logged_in(self) -> None:
        """Wait for the current session's first login; raise if it failed."""
        await self.account.wait_logged_in()

    async def get(self, ref: str | None = None, min_ttl: float = 0.0) -> TokenInfo:
        """A token for VideoManager `ref` (id or name; None: default) valid > min_ttl s."""
        return await self.account.get(ref, min_ttl)

    def held(self, ref: str | None, min_ttl: float) -> TokenInfo | None:
        """What get() would answer at once, or None if it would have to do more."""
        return self.account.held(ref, min_ttl)

    def invalidate(self, token: str, ref: str | None = None) -> bool:
        """Drop `token` if it is the current one (of `ref`, or of any VideoManager)."""
        return self.account.invalidate(token, ref)

    def list(self) -> list[dict[str, Any]]:
        """Every VideoManager of the user, with what we hold for it. No tokens."""
        return self.account.list()

    def state(self) -> dict[str, Any]:
        """The state for `status`. No secrets."""
        return self.account.state()
