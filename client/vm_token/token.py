"""The Token a client receives."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

__all__ = ["Token"]


@dataclass(frozen=True, slots=True)
class Token:
    """An access token for one VideoManager.

    `repr()` and `str()` never show `access_token`, so a Token can be logged or printed in a
    traceback without leaking it.
    """

    access_token: str = field(repr=False)
    videomanager_id: str
    videomanager_name: str
    expires_at: datetime  # timezone-aware, UTC

    @classmethod
    def from_reply(cls, reply: dict[str, object]) -> Token:
        expires = reply["expires_at"]
        if not isinstance(expires, int | float):
            raise TypeError("expires_at must be a number")
        return cls(
            access_token=str(reply["token"]),
            videomanager_id=str(reply["videomanager_id"]),
            videomanager_name=str(reply["videomanager_name"]),
            expires_at=datetime.fromtimestamp(expires, UTC),
        )

    @property
    def expires_in(self) -> float:
        """Seconds until the token expires, by the local wall clock (negative once expired)."""
        return self.expires_at.timestamp() - time.time()

    @property
    def authorization(self) -> str:
        """The value of an Authorization header carrying this token."""
        return f"Bearer {self.access_token}"

    def __str__(self) -> str:
        return repr(self)
