"""A hostile VideoManager list (issue 15, finding 14): at most 10,000 VideoManagers.

Far beyond any account, and a list of 146,000 cost half a second to parse and a tenth of
a second for every `status`: beyond the cap the login is `upstream_unavailable`, said once
in the log; the cap itself is served. Both ways of listing: the legacy login's answer and
the OpenID Connect API's list.
"""

from __future__ import annotations

import pytest

import vm_token
from vm_tokend.upstream.base import MAX_VIDEOMANAGERS

pytestmark = pytest.mark.timeout(90)


def many(count: int) -> list[tuple[str, str]]:
    return [(str(100_000 + i), f"VideoManager {i}") for i in range(count)]


@pytest.mark.parametrize("legacy_only", [True, False], ids=["legacy", "oidc"])
def test_one_more_than_the_cap_is_upstream_unavailable_said_once(legacy_only, make_standin,
                                                                 start_daemon):
    standin = make_standin(legacy_only=legacy_only,
                           videomanagers=many(MAX_VIDEOMANAGERS + 1))
    daemon = start_daemon(standin)
    with daemon.client(timeout=30) as client:
        for _ in range(3):
            with pytest.raises(vm_token.UpstreamUnavailable) as refused:
                client.get_token()
            assert "10,001 VideoManagers" in refused.value.message
            assert "at most 10,000" in refused.value.message
        assert client.status()["state"] == "upstream_unavailable"
    daemon.stop()
    assert daemon.log().count("10,001 VideoManagers") == 1, daemon.log()


@pytest.mark.parametrize("legacy_only", [True, False], ids=["legacy", "oidc"])
def test_the_cap_itself_is_served(legacy_only, make_standin, start_daemon):
    standin = make_standin(legacy_only=legacy_only, videomanagers=many(MAX_VIDEOMANAGERS))
    daemon = start_daemon(standin)
    with daemon.client(timeout=30) as client:
        token = client.get_token("VideoManager 9999")
        assert token.videomanager_id == str(100_000 + 9999)
        assert standin.token_valid(token.access_token, token.videomanager_id)
        assert client.status()["videomanagers_total"] == MAX_VIDEOMANAGERS
