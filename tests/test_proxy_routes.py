"""Where the proxy sends a request: pure functions, no I/O (vm_tokend.proxy.routes)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vm_tokend.proxy.routes import Refusal, Upstream, end_to_end, videomanager_of

API = Upstream.from_api_url("https://api.video-cdn.net/v1/vms")


@pytest.mark.parametrize(("path", "expected"), [
    ("/v1/vms/1002/videos", "1002"),
    ("/v1/vms/1002", "1002"),
    ("/v1/vms/%31%30%30%32/videos", "1002"),  # as the API decodes it
    ("/v1/vms//1002/videos", "1002"),
    ("/v1/vms", None),
    ("/v1/vms/", None),
    ("/v1/vms/videos/1002", None),
    ("/v1/vms/12ab/videos", None),
])
def test_the_videomanager_is_the_one_the_api_reads_from_the_path(path, expected):
    assert videomanager_of(path, API.root) == expected


@pytest.mark.parametrize("target", [
    b"/auth/login", b"/v1/vmsx", b"/v1/vms/../auth", b"/v1/vms/%2e%2e/auth",
    b"/v1/vms/%252e%252e/auth", b"/v1/vms/..;/x", b"/v1/vms/a#b", b"/v1/vms\\..",
    b"http://evil/v1/vms", b"//evil/v1/vms", b"*",
])
def test_targets_outside_the_api_root_are_refused(target):
    with pytest.raises(Refusal):
        API.url_for(target)


@given(st.text(alphabet="/.%2e5cC;#?ab\\", max_size=30))
def test_every_url_the_proxy_forwards_is_on_the_api_origin_under_its_root(tail):
    try:
        url = API.url_for(("/v1/vms/" + tail).encode())
    except Refusal:
        return
    assert url.startswith("https://api.video-cdn.net/v1/vms")
    assert "/../" not in url and "#" not in url


def test_hop_by_hop_headers_and_those_connection_names_are_dropped():
    headers = [(b"connection", b"keep-alive, X-Hop"), (b"x-hop", b"1"), (b"te", b"trailers"),
               (b"keep-alive", b"5"), (b"x-end", b"1"), (b"x-end", b"2"),
               (b"proxy-authorization", b"Basic x"), (b"upgrade", b"h2c")]
    assert end_to_end(headers) == [(b"x-end", b"1"), (b"x-end", b"2")]
