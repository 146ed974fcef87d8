"""When to refresh and how long to back off: the keeper's time rules in one place.

All times are on trio's clock, so tests run them on a MockClock with exact values.
"""

from __future__ import annotations

import random
from typing import Final

from ..upstream.base import Grant

REFRESH_AT: Final = 2 / 3
REFRESH_JITTER: Final = 0.05  # of the lifetime, either way
BACKOFF_INITIAL: Final = 1.0
BACKOFF_CAP: Final = 60.0
# However short-lived the API says its tokens are, we do not ask for a new one more often
# than this: a broken or hostile answer cannot turn us into a request storm.
MIN_REFRESH_INTERVAL: Final = 1.0


def seconds(value: float) -> str:
    """`12 s`: how messages say a delay."""
    return f"{max(0.0, value):.0f} s"


class Timing:
    """Refresh times with jitter and backoff delays with full jitter, from one random
    source (tests pin it to get exact schedules)."""

    def __init__(self, rng: random.Random | None = None, max_backoff: float = BACKOFF_CAP) -> None:
        self.rng = rng if rng is not None else random.Random()  # noqa: S311 - jitter, not crypto
        self.max_backoff = max_backoff

    def backoff(self, failures: int, retry_after: float | None) -> float:
        """The delay after `failures` failures in a row: random in [0, 1 s · 2^failures],
        capped at max_backoff, and never shorter than the API's Retry-After."""
        ceiling = min(self.max_backoff, BACKOFF_INITIAL * 2.0 ** min(failures, 32))
        delay = self.rng.uniform(0.0, ceiling)
        if retry_after is not None:
            delay = max(delay, retry_after)
        return delay

    def refresh_at(self, grant: Grant) -> float:
        """When to replace the token of `grant`: at 2/3 of its life ± 5 % of it."""
        jitter = self.rng.uniform(-REFRESH_JITTER, REFRESH_JITTER)
        return grant.requested_at + max(MIN_REFRESH_INTERVAL,
                                        grant.lifetime * (REFRESH_AT + jitter))
