"""`url=` in git's credential format is cut as RFC 3986 §3.2 and git cut it (issue 15,
finding 13): the authority ends at the first `/`, `?` or `#`; the userinfo is what comes
before the last `@` inside it."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vm_token._git_credential import CredentialInputError, parse


def parts(url: str) -> dict[str, str]:
    return parse(f"url={url}\n".encode()).values


@pytest.mark.parametrize(("url", "host", "username", "path"), [
    # An `@` after the authority belongs to the fragment, query or path, not a userinfo.
    ("http://evil.example#@127.0.0.1:8080/", "evil.example", None, "#@127.0.0.1:8080"),
    ("http://evil.example?@127.0.0.1:8080/", "evil.example", None, "?@127.0.0.1:8080"),
    ("http://evil.example/@127.0.0.1:8080/", "evil.example", None, "@127.0.0.1:8080"),
    ("https://evil.example?x#@api.video-cdn.net", "evil.example", None, "?x#@api.video-cdn.net"),
    # A userinfo with `@` in it (not allowed unencoded, but sent): the last one ends it.
    ("https://a@b@api.video-cdn.net/v1/vms/7", "api.video-cdn.net", "a@b", "v1/vms/7"),
    ("https://me:pw@api.video-cdn.net", "api.video-cdn.net", "me", None),
    ("https://Sales@api.video-cdn.net:8443/x/", "api.video-cdn.net:8443", "Sales", "x"),
    ("http://[::1]:8080/v1/vms/3", "[::1]:8080", None, "v1/vms/3"),
    ("http://u@[::1]:8080", "[::1]:8080", "u", None),
])
def test_the_authority_ends_at_the_first_slash_question_mark_or_hash(url, host, username,
                                                                      path):
    values = parts(url)
    assert values.get("host") == host
    assert values.get("username") == username
    assert values.get("path") == path


def test_url_replaces_what_came_before_it_as_git_does():
    values = parse(b"host=api.video-cdn.net\nusername=x\npath=p\nurl=https://other.example\n"
                   b"\n").values
    assert values == {"protocol": "https", "host": "other.example"}


@pytest.mark.parametrize("url", ["https://", "https:///path", "https://user@/x",
                                 "https://#@api.video-cdn.net", "https://?@api.video-cdn.net"])
def test_a_url_without_a_host_is_refused(url):
    with pytest.raises(CredentialInputError, match="host"):
        parts(url)


AUTHORITY_CHARS = "abcAZ09.-_~%!$&'()*+,;=:@[]"
URL_CHARS = AUTHORITY_CHARS + "/?#"
schemes = st.from_regex(r"\A[a-z][a-z0-9+.-]{0,6}\Z")


@given(schemes, st.text(URL_CHARS, max_size=40))
def test_the_same_parts_as_urlsplit(scheme, rest):
    """Wherever urlsplit accepts the URL, its netloc gives the same host and username."""
    url = f"{scheme}://{rest}"
    try:
        split = urlsplit(url)
    except ValueError:  # brackets that are no IPv6 address: urlsplit refuses, git does not
        return
    userinfo, at, host = split.netloc.rpartition("@")
    if not host:
        with pytest.raises(CredentialInputError):
            parts(url)
        return
    values = parts(url)
    assert values["protocol"] == split.scheme
    assert values["host"] == host
    assert values.get("username") == (userinfo.partition(":")[0] if at else None)
