"""What every way of logging in shares: the errors, `Grant`, sending a request, and reading
answers defensively.

Two backends log in: `legacy.VideoManagerApi` (the API's original `/auth/login` and
`/auth/refresh/{id}`: a token per VideoManager) and `oidc.OidcApi` (the vendor's OpenID
Connect: one token for every VideoManager). Their errors:

    UpstreamError
    ├── CredentialsRejected   the password was refused (legacy: 401, or 403 with the API's
    │                         JSON; OIDC: invalid_grant): never retry on a timer
    ├── ClientRejected        the identity provider refused our client (id, secret, scope,
    │                         grant type) or its discovery is inconsistent: a configuration
    │                         error, never retried on a timer
    ├── RefreshRejected       the refresh token is gone (legacy 401, OIDC invalid_grant):
    │                         log in again
    ├── Forbidden             refresh answered 403: no rights for that VideoManager
    └── TransientError        network trouble, timeouts, 5xx, 429, a proxy's 403 page,
                              garbage, an empty VideoManager list: back off, retry

Error messages are built here from status codes and the API's `message` field, truncated and
scrubbed of anything we sent, so no secret can reach a log or a client through them.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import quote as urlquote
from urllib.parse import quote_plus

import httpx
import trio

__all__ = [
    "ClientRejected",
    "CredentialsRejected",
    "Forbidden",
    "Grant",
    "RefreshRejected",
    "TransientError",
    "UpstreamError",
    "VideoManagerRef",
    "jwt_claims",
]

# The API documents nothing about total request time; 15 s is far beyond a healthy answer
# (tens of ms) and short enough that a hung proxy does not hold a refresh for long.
TOTAL_TIMEOUT: Final = 15.0
CONNECT_TIMEOUT: Final = 5.0
# How much of an error body we repeat to users. Enough for a sentence, not a whole page.
MAX_MESSAGE: Final = 200
# Tokens carry whole-second `iat`/`exp`, and a response takes time to arrive: we shorten
# every computed lifetime by this much so we never think a token lives longer than it does.
CLOCK_SLACK: Final = 1.0
# A Retry-After beyond this is treated as this: a broken proxy should not silence us for
# a day. A guess, but well above the 60 s backoff cap.
MAX_RETRY_AFTER: Final = 600.0
# What we accept from the API, so that nothing it sends can make a reply to a client
# overflow the 64 KiB frame: real tokens are 1-4 KiB (Keycloak's grow with roles), ids are
# short numbers, names a few words. Longer ids or tokens are "not the expected JSON";
# longer names are cut.
MAX_TOKEN: Final = 16 * 1024
MAX_ID: Final = 64
MAX_NAME: Final = 200
# The largest answer we read: a VideoManager list of a few thousand is well under it, and
# a proxy streaming a gigabyte must not fill our memory.
MAX_RESPONSE: Final = 4 * 1024 * 1024
# A VideoManager list longer than this is refused: far beyond any account, and a hostile
# one of 146,000 (4 MiB) cost half a second to parse and a tenth of one per `status`.
MAX_VIDEOMANAGERS: Final = 10_000
# A lifetime beyond this is treated as this (a token claiming to live for years would
# never be refreshed); a day is far beyond the API's five minutes. A guess.
MAX_LIFETIME: Final = 86400.0


class UpstreamError(Exception):
    """Base of the errors the API can cause; the message is safe to show."""


class CredentialsRejected(UpstreamError):
    pass


class ClientRejected(UpstreamError):
    pass


class RefreshRejected(UpstreamError):
    pass


class Forbidden(UpstreamError):
    pass


class TransientError(UpstreamError):
    def __init__(self, message: str, retry_after: float | None = None, *,
                 maybe_done: bool = False) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        # The request may have reached the server and taken effect (a timeout or a
        # connection lost after sending): a refresh token it carried may be used up.
        self.maybe_done = maybe_done


@dataclass(frozen=True, slots=True)
class VideoManagerRef:
    id: str
    name: str


@dataclass(frozen=True, slots=True)
class Grant:
    """What a login or refresh gave us. Secrets are kept out of repr."""

    access_token: str = field(repr=False)
    refresh_token: str | None = field(repr=False)  # None: keep the one we have
    videomanagers: tuple[VideoManagerRef, ...]  # as a legacy login lists them; OIDC: ()
    valid_for: str | None  # the VideoManager id the token is for; None: every one (OIDC)
    lifetime: float  # seconds the access token lives, counted from `requested_at`
    refresh_lifetime: float | None  # the same for the refresh token, when it says
    # trio.current_time() when the request was sent: the token was issued after it, so
    # counting from here errs on the early side however slow the answer was.
    requested_at: float
    id_token: str | None = field(default=None, repr=False)  # OIDC: who logged in


def loads(data: str | bytes) -> Any:
    """JSON, or ValueError — also for JSON nested too deep for the parser."""
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("JSON nested too deep") from None


def jwt_claims(token: str) -> dict[str, Any] | None:
    """The payload of a JWT, unverified; None if `token` is not one."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    payload = parts[1]
    try:
        raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
        claims = loads(raw)
    except (binascii.Error, ValueError):
        return None
    return claims if isinstance(claims, dict) else None


def number(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def token_lifetime(token: str, default: float | None, wall_now: float) -> float | None:
    """How long `token` lives from now, by its own claims where it has them.

    `exp - iat` does not depend on our wall clock being right; only without `iat` do we
    fall back to `exp - now`. Not a JWT, or no `exp`: `default`.
    """
    claims = jwt_claims(token)
    exp = number(claims.get("exp")) if claims else None
    if exp is None:
        return default
    iat = number(claims.get("iat")) if claims else None
    lifetime = (exp - iat) if iat is not None else (exp - wall_now)
    lifetime -= CLOCK_SLACK
    if lifetime <= 0:
        # A token that is dead on arrival by its own claims (or our clock is far off and it
        # has no iat): trust the default rather than refreshing in a tight loop.
        return default
    return min(lifetime, MAX_LIFETIME)


def parse_retry_after(value: str | None, wall_now: float) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP-date), capped; None if absent."""
    if not value:
        return None
    value = value.strip()
    seconds: float | None
    # isdigit() alone also accepts "²" and "١٢", which float() refuses.
    if value.isascii() and value.isdigit():
        seconds = float(value)
    else:
        try:
            when = email.utils.parsedate_to_datetime(value)
            seconds = when.timestamp() - wall_now
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
    return max(0.0, min(seconds, MAX_RETRY_AFTER))


def valid_token(value: Any) -> str | None:
    """A token as the API sends it: non-empty visible ASCII of sane length; else None.
    (It goes into headers and git's line format: no spaces, no line breaks.)"""
    if (isinstance(value, str) and 0 < len(value) <= MAX_TOKEN and value.isascii()
            and value.isprintable() and " " not in value):
        return value
    return None


def parse_id(value: Any) -> str:
    """A VideoManager id (the API sends numbers; strings are taken too); TypeError if not."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise TypeError
    text = str(value).strip()
    if not text or len(text) > MAX_ID or not text.isprintable():
        raise TypeError
    return text


def check_count(listed: list[Any]) -> None:
    """Refuse a VideoManager list longer than MAX_VIDEOMANAGERS, before parsing it. No
    passing fault: the next attempt waits as long as a Retry-After may make it, so the
    log says it once, not once a minute."""
    if len(listed) > MAX_VIDEOMANAGERS:
        raise TransientError(f"the API listed {len(listed):,} VideoManagers; vm-tokend takes "
                             f"at most {MAX_VIDEOMANAGERS:,}", retry_after=MAX_RETRY_AFTER)


def parse_videomanager(item: Any) -> VideoManagerRef:
    if not isinstance(item, dict):
        raise TypeError
    name = item.get("name")
    name = name.strip() if isinstance(name, str) else ""
    name = "".join(ch if ch.isprintable() else " " for ch in name[:MAX_NAME])
    vm_id = parse_id(item.get("id"))
    return VideoManagerRef(id=vm_id, name=name or vm_id)


async def send(http: httpx.AsyncClient, method: str, url: str, *, peer: str = "the API",
               secrets: tuple[str, ...] = (), **options: Any) -> httpx.Response:
    """One HTTP request, its failures translated into TransientError (scrubbed of what we
    sent); the response whatever its status, its body read (at most MAX_RESPONSE)."""
    try:
        with trio.fail_after(TOTAL_TIMEOUT):
            async with http.stream(method, url, **options) as response:
                too_large = TransientError(f"{peer} answered HTTP {response.status_code} "
                                           f"with more than {MAX_RESPONSE} bytes")
                length = response.headers.get("content-length", "")
                if length.isascii() and length.isdigit() and int(length) > MAX_RESPONSE:
                    raise too_large  # not read at all
                body = bytearray()
                # Decoded bytes are counted: a small gzip bomb is as large as it unpacks to.
                # Past the limit the rest is read and dropped (within the time limit):
                # leaving httpx's stream half-read leaks its inner generators.
                async for chunk in response.aiter_bytes():
                    if len(body) <= MAX_RESPONSE:
                        body += chunk
                if len(body) > MAX_RESPONSE:
                    raise too_large
            return httpx.Response(response.status_code, headers=response.headers,
                                  content=bytes(body), request=response.request)
    except trio.TooSlowError:
        raise TransientError(f"no answer from {peer} within {TOTAL_TIMEOUT:g} s",
                             maybe_done=True) from None
    except httpx.TimeoutException as exc:
        raise TransientError(f"{peer} timed out",
                             maybe_done=not isinstance(exc, httpx.ConnectTimeout)) from None
    except httpx.HTTPError as exc:
        # httpx messages name the URL and the OS error, never the body we sent.
        raise TransientError(
            f"cannot reach {peer}: {scrub(str(exc) or type(exc).__name__, secrets)}",
            maybe_done=not isinstance(exc, httpx.ConnectError),
        ) from None


def content_type(response: httpx.Response, secrets: tuple[str, ...] = ()) -> str:
    """The media type of a response, for messages: only if it looks like one (the header
    is the sender's to fill, with anything, even what we sent it)."""
    value = response.headers.get("content-type")
    if value is None:
        return "no content type"
    media = str(value).split(";")[0].strip().lower()
    if (len(media) <= 50 and _MEDIA_TYPE.fullmatch(media)
            and not any(form.lower() in media for s in secrets for form in echo_forms(s))):
        return media
    return "an unexpected content type"


_MEDIA_TYPE: Final = re.compile(r"[a-z0-9][a-z0-9.+-]*/[a-z0-9][a-z0-9.+-]*")


REDACTED: Final = "[redacted]"
# How much of an upstream's text scrub() reads: far more than a message shows, so that
# redactions, which may shorten it, leave enough; bounded, so that a 4 MiB error body
# echoing a one-letter secret all over costs little. A guess.
SCRUB_WINDOW: Final = 64 * 1024
# A JSON string's escapes, read left to right (so `\\u0041` is a backslash, then text).
_JSON_ESCAPE: Final = re.compile(r"\\u([0-9a-f]{4})|\\.")


def _printable(text: str) -> str:
    return "".join(ch if ch.isprintable() else " " for ch in text)


def echo_forms(secret: str) -> set[str]:
    """The ways an upstream may write `secret` back to us: as sent; URL- or form-encoded;
    inside a JSON string, with non-ASCII escaped or not, its \\u escapes in lower-case hex
    (Python, JavaScript) or upper-case (Java's Jackson, as Keycloak writes them). Made
    printable, as scrub() looks for them in printable text."""
    if not secret:
        return set()
    forms = {secret, urlquote(secret, safe=""), quote_plus(secret)}
    for ascii_only in (True, False):
        escaped = json.dumps(secret, ensure_ascii=ascii_only)[1:-1]
        forms.add(escaped)
        forms.add(_JSON_ESCAPE.sub(lambda m: "\\u" + m[1].upper() if m[1] else m[0],
                                   escaped))
    return {_printable(form) for form in forms}


def scrub(text: str, secrets: tuple[str, ...]) -> str:
    """`text` without any of `secrets` in any of their echo_forms(), printable and bounded.

    Occurrences are looked for in the text as it came, never in text a replacement made,
    and overlapping ones make one mark: no piece left between the marks holds a whole
    form of a secret, whatever characters the secret and the marks share."""
    forms = {form for secret in secrets for form in echo_forms(secret)}
    cut = len(text) > SCRUB_WINDOW
    text = _printable(text[:SCRUB_WINDOW])
    # A form the window cut off could still show its beginning: show nothing from where
    # the first one could start.
    shown = len(text) - (max(map(len, forms), default=1) - 1 if cut else 0)
    spans = []
    for form in forms:
        start = text.find(form)
        while start >= 0:
            spans.append((start, start + len(form)))
            start = text.find(form, start + len(form))
    pieces, done = [], 0
    for start, end in sorted(spans):
        if start >= done:
            pieces += [text[done:min(start, shown)], REDACTED]
        done = max(done, end)
    pieces.append(text[done:shown] + ("…" if cut else ""))
    text = "".join(pieces).strip()
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 1] + "…"


def api_message(response: httpx.Response) -> str | None:
    """The `message` of the API's JSON error body; None if the body is something else."""
    try:
        data = loads(response.content)
    except ValueError:
        return None
    message = data.get("message") if isinstance(data, dict) else None
    return message if isinstance(message, str) and message.strip() else None


def describe(response: httpx.Response, secrets: tuple[str, ...]) -> str:
    """`HTTP 503: <the API's message>`, or a note that the body was not the API's JSON."""
    status = f"HTTP {response.status_code}"
    message = api_message(response)
    if message is not None:
        return f"{status}: {scrub(message, secrets)}"
    return f"{status} ({content_type(response, secrets)} body)"
