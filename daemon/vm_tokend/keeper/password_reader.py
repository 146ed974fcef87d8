"""Reading a session's password when it logs in, and telling whether it changed since."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from ..config.settings import PasswordSource

__all__ = ["PasswordReader"]

# One key per daemon: a digest of the password last used lets a reload tell whether a
# password file changed without keeping a second copy of the password around.
_DIGEST_KEY = secrets.token_bytes(32)


def _digest(password: str) -> bytes:
    return hmac.new(_DIGEST_KEY, password.encode(), hashlib.sha256).digest()


class PasswordReader:
    """Reads a PasswordSource (given, file or command) when a login needs the password, and
    remembers only a keyed digest of it."""

    def __init__(self, source: PasswordSource) -> None:
        self.source = source
        self._last: bytes | None = None

    @property
    def username(self) -> str:
        return self.source.username

    async def read(self) -> str:
        """The password, read now (a file or a command may give a new one); remembered
        only as a keyed digest. PasswordUnavailable if it cannot be had."""
        password = await self.source.read_password()
        self._last = _digest(password)
        return password

    def last_read(self, password: str) -> bool:
        """Whether `password` is the one the last login used."""
        return self._last is not None and hmac.compare_digest(self._last, _digest(password))
