"""Refused connections in the log: the first at once, then a count at most once a minute.

Another user connecting in a loop must not fill the log (or the journal's rate limit,
which would then hide our other lines); a socket open to everyone as far as the file
system goes (the token socket, 0666) makes that easy.
"""

from __future__ import annotations

import logging
import math
from typing import Final

import trio

__all__ = ["REFUSAL_LOG_INTERVAL", "RefusalLog"]

log = logging.getLogger(__name__)

# At most one "refused" line this often.
REFUSAL_LOG_INTERVAL: Final = 60.0


class RefusalLog:
    """The first refused connection is logged at once; those that follow within the
    interval are counted, and one line says how many when it has passed (or when the
    server stops, so a count is never lost)."""

    def __init__(self, interval: float = REFUSAL_LOG_INTERVAL, *, where: str = "") -> None:
        self.interval = interval
        self._where = where  # " on the token socket", say
        self._quiet_until = -math.inf  # no line before then; count instead
        self._logged_at = 0.0
        self._count = 0  # refused since the last line
        self._uids: set[int | None] = set()

    def refused(self, uid: int | None) -> bool:
        """Log a refusal of `uid`'s connection, or count it; True for the first one
        counted, whose task is then to write the count (write_count)."""
        now = trio.current_time()
        if now >= self._quiet_until and not self._count:
            log.warning("refused a connection from uid %s%s", uid, self._where)
            self._logged_at, self._quiet_until = now, now + self.interval
            return False
        self._count += 1
        self._uids.add(uid)
        return self._count == 1

    async def write_count(self, stopping: trio.Event) -> None:
        """At the interval's end (or `stopping`), one line for the refusals counted."""
        try:
            with trio.move_on_at(self._quiet_until):
                await stopping.wait()
        finally:  # cancelled too: else every later refusal would be counted, never written
            now = trio.current_time()
            uids = ", ".join(sorted(str(uid) for uid in self._uids))
            log.warning("refused %d more connection%s from uid %s%s in the last %.0f s",
                        self._count, "s" if self._count > 1 else "", uids, self._where,
                        now - self._logged_at)
            self._count, self._uids = 0, set()
            self._logged_at, self._quiet_until = now, now + self.interval
