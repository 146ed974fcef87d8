"""Putting text that came from outside into a message: bounded, and never a repr of a blob."""

from __future__ import annotations

from typing import Final

__all__ = ["MAX_ECHO", "quote", "shorten"]

# How much of a client's or the API's text a message repeats: enough to recognise it.
MAX_ECHO: Final = 100


def shorten(text: str, limit: int = MAX_ECHO) -> str:
    """`text` cut to `limit` characters (the last one an ellipsis when cut)."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def quote(text: str, limit: int = MAX_ECHO) -> str:
    """`text` quoted as Python would, control characters escaped, at most `limit`
    characters in all (escapes count: one character may take ten)."""
    return shorten(repr(text[: limit + 1]), limit)
