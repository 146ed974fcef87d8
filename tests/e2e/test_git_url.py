"""`url=` handed to the helper: a host hidden after `#`, `?` or `/` gets no token (issue 15,
finding 13)."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest

from tests.e2e.test_git_and_scripts import attributes, git_credential

pytestmark = pytest.mark.timeout(60)


def test_a_host_after_the_authority_gets_no_token(standin, start_daemon):
    daemon = start_daemon(standin)
    netloc = urlsplit(standin.url).netloc
    for mark in ("#", "?", "/"):
        url = f"http://evil.example{mark}@{netloc}/"
        direct = daemon.cli("get", input=f"url={url}\n\n")
        assert (direct.returncode, direct.stdout, direct.stderr) == (0, "", "")
        # git cuts the URL the same way and asks the helper for evil.example: nothing.
        fill = git_credential(daemon, "fill", f"url={url}\n\n")
        assert fill.returncode != 0
        assert not any(token in fill.stdout for token in standin.issued)
    # The API's own URL still gets one, the userinfo's `@` notwithstanding.
    ok = daemon.cli("get", input=f"url=http://a@b@{netloc}/v1/vms/1002/videos\n\n")
    assert standin.token_valid(attributes(ok.stdout)["password"], "1002")
