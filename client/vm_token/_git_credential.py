"""git's credential-helper protocol: parsing what git sends, formatting what we answer.

The rules, from git-credential(1) "INPUT/OUTPUT FORMAT":

* one `key=value` attribute per line, up to a blank line or the end of input;
* a key holds any bytes but `=`, newline and NUL; a value any bytes but newline and NUL;
  nothing is quoted; a line, its newline included, is at most 65535 bytes;
* we accept only UTF-8: everything we use goes on to the daemon as msgpack text, and git's
  hosts, user names and paths are UTF-8 (or percent-encoded) anyway;
* keys ending in `[]` are lists: each line appends, an empty value clears the list;
  other keys keep their last value;
* `url=` stands for its parts (protocol, username, host, path), and replaces them: its
  authority ends at the first `/`, `?` or `#` (RFC 3986 §3.2, as git cuts it);
* keys we do not know are ignored.

Pure functions, no I/O: `parse` is fuzzed by the tests.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable

MAX_LINE = 65535  # bytes, the newline included


class CredentialInputError(ValueError):
    """Input that does not follow git's credential format."""


class Credential:
    """The attributes of one credential description."""

    __slots__ = ("lists", "values")

    def __init__(self) -> None:
        self.values: dict[str, str] = {}
        self.lists: dict[str, list[str]] = {}

    def get(self, key: str) -> str | None:
        return self.values.get(key)

    def has_capability(self, name: str) -> bool:
        return name in self.lists.get("capability[]", ())

    def __repr__(self) -> str:
        # Never show a password or a credential; the keys say enough.
        return f"Credential(keys={sorted([*self.values, *self.lists])})"


# Where an authority ends (RFC 3986 §3.2; git's credential_from_url cuts it the same way):
# an `@` after any of them belongs to the path, query or fragment, never to a userinfo.
_AUTHORITY_ENDS = "/?#"
# What `url=` stands for: git clears these before it sets them from the URL.
_URL_KEYS = ("protocol", "host", "username", "password", "path")


def _split_url(credential: Credential, url: str) -> None:
    """Set protocol, username, host and path from a URL, as git does for `url=`."""
    scheme, sep, rest = url.partition("://")
    if not sep or not scheme:
        raise CredentialInputError("url= needs a scheme, like https://host/path")
    end = min((i for i in map(rest.find, _AUTHORITY_ENDS) if i >= 0), default=len(rest))
    authority, path = rest[:end], rest[end:].strip("/")
    # A userinfo has no `@` of its own (it would be %40); of several, the last one ends it,
    # as urlsplit and urllib3 have it: the host is then the one they would connect to.
    userinfo, at, host = authority.rpartition("@")
    if not host:
        raise CredentialInputError("url= needs a host, like https://host/path")
    for key in _URL_KEYS:
        credential.values.pop(key, None)
    credential.values["protocol"] = scheme.lower()
    credential.values["host"] = host
    if at:
        credential.values["username"] = userinfo.partition(":")[0]
    if path:
        credential.values["path"] = path


def parse(data: bytes) -> Credential:
    """Parse a credential description; CredentialInputError if it is not one."""
    credential = Credential()
    if b"\0" in data:
        raise CredentialInputError("input contains a NUL byte")
    for number, raw in enumerate(data.split(b"\n"), 1):
        if len(raw) + 1 > MAX_LINE:
            raise CredentialInputError(f"a line is longer than {MAX_LINE} bytes")
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            # Say where, never what: the line may hold a password.
            raise CredentialInputError(f"line {number} is not valid UTF-8") from None
        if line.endswith("\r"):  # git reads lines with strbuf_getline: CRLF counts as LF
            line = line[:-1]
        if not line:
            break
        key, sep, value = line.partition("=")
        if not sep or not key:
            raise CredentialInputError(f"line {number} is not key=value")  # never its text
        if key.endswith("[]"):
            if value:
                credential.lists.setdefault(key, []).append(value)
            else:
                credential.lists.pop(key, None)
        elif key == "url":
            _split_url(credential, value)
        else:
            credential.values[key] = value
    return credential


def videomanager_from_path(path: str | None) -> str | None:
    """The id in a path like `v1/vms/1234/videos` (sent with credential.useHttpPath)."""
    if not path:
        return None
    parts = [p for p in path.split("?")[0].split("/") if p]
    for i, part in enumerate(parts[:-1]):
        if part == "vms":
            return parts[i + 1]
    return None


def format_answer(items: Iterable[tuple[str, str]]) -> str:
    """Lines for git; refuses values git could misread (a newline or NUL in them)."""
    lines = []
    for key, value in items:
        if "\n" in value or "\0" in value or "\n" in key or "=" in key:
            raise CredentialInputError(f"cannot send {key} to git: it contains a newline")
        lines.append(f"{key}={value}\n")
    return "".join(lines)
