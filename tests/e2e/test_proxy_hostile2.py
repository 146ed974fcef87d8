"""A second hostile reading of `vm-tokend proxy`: of the fixes made after 635fced for the
defects tests/e2e/test_proxy_hostile.py shows. Each test here fails on the branch as it is
(issue17 at the time of writing) and says why in its docstring.

Black-box, as test_proxy_hostile.py, whose fixtures and helpers it borrows.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.conftest import BIN, make_tls
from tests.e2e import test_proxy_hostile as hostile
from tests.e2e.conftest import Proxy
from tests.e2e.test_proxy_hostile import VIDEOS, curl, daemon_token
from tests.h11_api import Answer, FakeApi, Seen, daemon_env, json_answer

# the fixtures of test_proxy_hostile.py, as they are there (make_api, api, start_proxy
# come from tests/e2e/conftest.py)
daemon, proxy = hostile.daemon, hostile.proxy

pytestmark = pytest.mark.timeout(120)


# -- 1. over https, an early answer's body is lost: the cancelled send broke the TLS stream

class EarlyTlsApi(FakeApi):
    """Answers a request whose target says `early` as soon as its head came, without
    reading its body (a moment later: the proxy's send is then blocked, waiting for room);
    the answer's head and body leave in two writes (two TLS records, as
    many servers write them), then the connection stays open, unread, for a while."""

    def _read_request(self, sock, conn, request, number):
        if b"early" in request.target:
            time.sleep(1.0)  # the proxy's send now waits for room: the API reads nothing
            return Seen(request.method.decode(), request.target.decode("latin-1"),
                        list(request.headers.raw_items()), b"", number)
        return super()._read_request(sock, conn, request, number)

    def _send(self, sock, conn, answer):
        super()._send(sock, conn, answer)
        if answer.status == 413:
            time.sleep(6.0)  # neither reads nor closes: no reset to blame


def test_over_tls_an_early_answer_arrives_whole(start_daemon, start_proxy, tmp_path):
    """forward.py `_send`: when the task reading the answer gets the head, it cancels the
    nursery, and with it `api.send_body`, blocked in SSLStream.send_all because the API
    stopped reading. trio marks an SSLStream whose send_all was cancelled BROKEN (trio/
    _ssl.py `_retry`: "Some unknown amount of our data got sent ... This stream is
    doomed"), so every later receive_some raises BrokenResourceError: the early answer's
    body, unless it came in the same TLS record as its head, cannot be read. `_relay` has
    sent the head already; the client gets a 413 whose body breaks off (curl: "transfer
    closed with N bytes remaining"), and its connection is dropped. Over plain http (the
    first hostile test) a cancelled send leaves the socket usable, so this shows on https
    only — the API's real scheme."""
    (tmp_path / "ca").mkdir()
    tls = make_tls(tmp_path / "ca")
    api = EarlyTlsApi(host="127.0.0.2", tls=tls.server).start()
    try:
        daemon = start_daemon(None, env={**daemon_env(api),
                                         "VM_TOKEN_CA_BUNDLE": tls.ca_file})
        proxy = start_proxy(daemon)
        assert curl(proxy).status == 200
        body = b'{"message": "too large"}' + b" " * 40_000  # more than one TLS record

        def pieces() -> Iterator[bytes]:
            yield b""  # the head alone
            time.sleep(0.3)
            yield body
        api.script(Answer(413, [("Content-Type", "application/json"),
                                ("Content-Length", str(len(body)))], pieces()))
        upload = tmp_path / "upload.bin"
        upload.write_bytes(b"v" * (16 << 20))
        reply = curl(proxy, "-X", "POST", "--data-binary", f"@{upload}",
                     path=VIDEOS + "?early")
        assert (reply.status, len(reply.body)) == (413, len(body)), (
            reply.status, len(reply.body), proxy.log()[-800:])
    finally:
        api.stop()


# -- 2. an endpoint that refuses every token costs a refresh per request, then everyone's

def test_a_url_the_api_always_refuses_does_not_take_the_token_from_every_other_request(
        api, daemon, proxy):
    """The fix for the first hostile test dropped forward.py's rate limit on reports
    (`_may_report`, REPORT_INTERVAL) and now reports every 401 and asks for the token the
    daemon holds after it, relying on the daemon ("a token ... no longer its current one
    changes nothing there"). But a request's token IS the current one when it is the
    replacement the previous 401 brought: a URL the API refuses whatever the token (a
    resource the user may not see that the API answers 401 for, a typo'd API key header a
    client adds, an API bug) makes each request through the proxy throw the current token
    away (`invalidate`) and the daemon fetch another from the API (a refresh per request,
    twice the API requests); from the second quick one the daemon's slot backs off
    (keeper/slot.py QUICK_INVALIDATION: "replacements back off like failures"), up to
    max_backoff (60 s) with no token at all: meanwhile EVERY request for that
    VideoManager — through the proxy, from git, from scripts — is refused 502
    upstream_unavailable. One script polling a refused URL takes the API away from all the
    user's programs. Expected: a 401 for a token the daemon handed out moments ago (or
    after a replay that was refused too) is passed back without a report; the others are
    served."""
    assert curl(proxy).status == 200

    def answer(seen: Seen) -> Answer:
        if "denied" in seen.target:
            return json_answer({"message": "not for you"}, 401)
        return json_answer({"ok": True})
    api.default = answer
    refreshes = len([a for a in api.logins() if a.startswith("refresh")])
    for _ in range(8):  # a script that polls it, or retries
        assert curl(proxy, path=VIDEOS + "?denied").status in (401, 502)
    refreshed = len([a for a in api.logins() if a.startswith("refresh")]) - refreshes
    reply = curl(proxy, path=VIDEOS + "?another-program")
    assert reply.status == 200 and refreshed <= 2, (reply, f"{refreshed} refreshes",
                                                    api.logins())


# -- 3. the CAs the daemon trusts, when the proxy cannot see them: the system's instead --

def test_a_daemon_configured_by_flags_does_not_leave_the_proxy_trusting_the_system_cas(
        make_api, start_daemon, private_dir, tmp_path):
    """trust.py `tls_context` decides what the proxy trusts from its OWN reading of the
    configuration (`load_config(flags)` with the proxy's few flags and environment), and
    matches bundles to the origin the daemon reports through the profiles' api_url as
    the proxy reads them. A daemon configured otherwise — `vm-tokend --api-url URL
    --ca-bundle PRIVATE-CA` (the daemon's documented flags), or an environment the proxy's
    unit does not share — serves an API the proxy finds no profile for: no bundle, so
    `None`, "the system's CAs". That is the fail-open the fix meant to end ("a bundle is
    often there to trust *fewer*: a private CA"). Here the system's store (SSL_CERT_FILE,
    as OpenSSL reads it) trusts a second CA, which signs the certificate of an impostor on
    the API's address: the proxy hands it the token. Expected: what the daemon trusts
    (the proxy could ask it), or, when the proxy cannot tell, nothing (its own 502)."""
    (tmp_path / "private").mkdir()
    (tmp_path / "public").mkdir()
    private = make_tls(tmp_path / "private", ca_name="the API's private CA")
    public = make_tls(tmp_path / "public", ca_name="a CA the system trusts")
    api = make_api(host="127.0.0.2", tls=private.server)
    env = {k: v for k, v in daemon_env(api).items() if k != "VM_TOKEN_API_URL"}
    daemon = start_daemon(None, env=env, args=["--api-url", api.url,
                                               "--ca-bundle", private.ca_file])
    daemon_token(daemon)  # logged in, over TLS, trusting the private CA only

    api.tls = public.server  # from now on, an impostor with a publicly trusted certificate
    path = private_dir / "vm-token" / "proxy"
    log_path = private_dir / "proxy.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [str(BIN / "vm-tokend"), "proxy", "--log-level", "debug"],
            env={**daemon.env, "SSL_CERT_FILE": public.ca_file},
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while not path.exists():
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.02)
        reply = curl(Proxy(proc, path, log_path))
        assert api.requests() == [], (
            f"the token went to a server the daemon does not trust: {reply.status}")
        assert reply.headers.get("x-vm-token-error") == "upstream_unavailable", reply
    finally:
        proc.terminate()
        proc.wait(timeout=15)
