"""The Token a client receives."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

__all__ = ["Token"]

_new = object.__new__
_YEAR_10000 = 253402300800.0  # datetime's limit, as a Unix time


class Token:
    """An access token for one VideoManager.

    `repr()` and `str()` never show `access_token`, so a Token can be logged or printed in a
    traceback without leaking it. Its attributes are read-only; it compares and hashes by value.

    A class with slots and read-only properties rather than a frozen dataclass:
    `Client.get_token()` makes one per call, and the dataclass's `__init__` (every field
    set through `object.__setattr__`) and an eager `datetime` were measurable against a
    whole round trip to the daemon. `expires_at` is made from the timestamp when asked for.
    """

    __slots__ = ("_expires", "_id", "_name", "_token")

    def __init__(
        self, access_token: str, videomanager_id: str, videomanager_name: str,
        expires_at: datetime,
    ) -> None:
        self._token = access_token
        self._id = videomanager_id
        self._name = videomanager_name
        self._expires = expires_at.timestamp()

    @classmethod
    def from_reply(cls, reply: dict[str, Any]) -> Token:
        expires = reply["expires_at"]
        if not isinstance(expires, int | float) or isinstance(expires, bool):
            raise TypeError("expires_at must be a number")
        if not 0 <= expires < _YEAR_10000:  # also NaN: what a datetime can say
            raise ValueError("expires_at is out of range")
        token = _new(cls)
        token._token = str(reply["token"])
        token._id = str(reply["videomanager_id"])
        token._name = str(reply["videomanager_name"])
        token._expires = float(expires)
        return token

    @property
    def access_token(self) -> str:
        return self._token

    @property
    def videomanager_id(self) -> str:
        return self._id

    @property
    def videomanager_name(self) -> str:
        return self._name

    @property
    def expires_at(self) -> datetime:
        """When the token expires: a timezone-aware datetime in UTC."""
        return datetime.fromtimestamp(self._expires, UTC)

    @property
    def expires_in(self) -> float:
        """Seconds until the token expires, by the local wall clock (negative once expired)."""
        return self._expires - time.time()

    @property
    def authorization(self) -> str:
        """The value of an Authorization header carrying this token."""
        return f"Bearer {self.access_token}"

    def _key(self) -> tuple[str, str, str, float]:
        return (self._token, self._id, self._name, self._expires)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Token):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return (f"Token(videomanager_id={self.videomanager_id!r}, "
                f"videomanager_name={self.videomanager_name!r}, "
                f"expires_at={self.expires_at!r})")

    def __str__(self) -> str:
        return repr(self)

    def __reduce__(self) -> tuple[Any, ...]:
        # The token is in the pickle, as it was with the dataclass.
        return (Token, (self._token, self._id, self._name, self.expires_at))
