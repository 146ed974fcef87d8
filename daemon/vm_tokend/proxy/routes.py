"""Where a request may go, decided before anything is sent: pure functions, no I/O.

A request for `/PATH` goes to the profile's API origin + `/PATH`, and only for paths under
the API root (`/v1/vms` for the default api_url). The Host header names the profile on the
Unix socket (`localhost`: the default one); on a TCP listener it must be the listener's own
address (DNS rebinding), and a browser's request (`Origin`, `Sec-Fetch-Site` other than
`none`) is refused. Absolute-form targets and CONNECT are refused: never an open proxy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote, urlsplit

__all__ = ["HOP_BY_HOP", "Refusal", "Upstream", "end_to_end", "videomanager_of"]

# RFC 9110 7.6.1, and what proxies have used: never forwarded either way.
HOP_BY_HOP: Final = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
    b"transfer-encoding", b"upgrade", b"proxy-authorization", b"proxy-authenticate",
})
# The API's paths name the VideoManager as /v1/vms/{id}/…; its ids are digits.
_VM_IN_PATH: Final = re.compile(r"/(\d{1,20})(?:/|$)")


class Refusal(Exception):
    """A request the proxy answers itself: status, error code, message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass(frozen=True)
class Upstream:
    """A profile's API: its origin (scheme://host[:port]) and root path (`/v1/vms`)."""

    origin: str
    root: str

    @classmethod
    def from_api_url(cls, api_url: str) -> Upstream:
        parts = urlsplit(api_url)
        return cls(f"{parts.scheme}://{parts.netloc}", parts.path.rstrip("/") or "/")

    def url_for(self, target: bytes) -> str:
        """The upstream URL of an origin-form target under the root; Refusal otherwise."""
        if not target.startswith(b"/"):
            raise Refusal(400, "bad_request", "only origin-form targets (/path): this is not "
                          "an open proxy")
        try:
            text = target.decode("ascii")
        except UnicodeDecodeError:
            raise Refusal(400, "bad_request", "the request target is not ASCII") from None
        if "#" in text or "\\" in text:
            raise Refusal(400, "bad_request", "a target with '#' or '\\' is not forwarded")
        path = text.split("?", 1)[0]
        if self.root != "/" and not (path == self.root or path.startswith(self.root + "/")) \
                or _dot_segment(path):
            raise Refusal(404, "not_found", f"only paths under {self.root} go to the API")
        return self.origin + text


def _dot_segment(path: str) -> bool:
    """Whether a segment of `path` is `.` or `..` (or `..;…`, as Tomcat reads it), however
    often percent-encoded: a server that decodes it would leave the API root."""
    for _ in range(4):  # %252e%252e: decoded twice by a sloppy server
        if any(segment in (".", "..") or segment.startswith(("..;", ".;"))
               for segment in path.split("/")):
            return True
        decoded = unquote(path)
        if decoded == path:
            return False
        path = decoded
    return True  # encoded more deeply than anything honest


def videomanager_of(path: str, root: str) -> str | None:
    """The VideoManager a path names (`{root}/{id}/…`), None if it names none."""
    rest = path[len(root):] if path.startswith(root) else ""
    # as the API reads it: %31%30%30%32 is 1002, and so is //1002
    rest = "/" + unquote(rest).lstrip("/")
    found = _VM_IN_PATH.match(rest)
    return found.group(1) if found else None


def end_to_end(headers: list[tuple[bytes, bytes]], *, drop: frozenset[bytes] = frozenset()
               ) -> list[tuple[bytes, bytes]]:
    """`headers` without hop-by-hop ones, those the `Connection` header names, and `drop`."""
    named = {token.strip().lower() for name, value in headers if name.lower() == b"connection"
             for token in value.split(b",")}
    return [(name, value) for name, value in headers
            if name.lower() not in HOP_BY_HOP and name.lower() not in named
            and name.lower() not in drop]
