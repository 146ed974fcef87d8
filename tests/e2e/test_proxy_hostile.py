"""A hostile reading of `vm-tokend proxy`: each test here showed a defect (and failed on
635fced, before the fixes); they stay as the regression tests of those fixes.

Black-box, as tests/e2e/test_proxy_upstream.py: the real vm-tokend and `vm-tokend proxy`,
an API of our own (tests/h11_api.py) that logs vm-tokend in and records what it got, and
clients on the proxy's Unix socket (curl, or a raw socket where curl would hide what
happens). The fixtures are this file's own, so that it does not depend on how the other
proxy test files grow.
"""

from __future__ import annotations

import concurrent.futures
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest

import vm_token
from tests.conftest import BIN, Daemon
from tests.e2e.conftest import Proxy
from tests.h11_api import Answer, FakeApi, Seen, daemon_env, json_answer, point_config_at, wait_for

pytestmark = pytest.mark.timeout(90)

VIDEOS = "/v1/vms/1001/videos"


# -- the pieces -------------------------------------------------------------------------

@pytest.fixture
def daemon(api: FakeApi, start_daemon: Callable[..., Daemon]) -> Daemon:
    return start_daemon(None, env=daemon_env(api))


@pytest.fixture
def proxy(daemon: Daemon, start_proxy: Callable[..., Proxy]) -> Proxy:
    return start_proxy(daemon)


@dataclass
class Reply:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes


def curl(proxy: Proxy, *args: str, host: str = "localhost", path: str = VIDEOS,
         max_time: float = 20) -> Reply:
    """One request through the proxy's socket with curl (status 0: no answer)."""
    done = subprocess.run(
        ["curl", "-sS", "--max-time", str(max_time), "--unix-socket", str(proxy.socket),
         "-D", "-", "-o", "-", *args, f"http://{host}{path}"],
        capture_output=True, timeout=max_time + 10, check=False)
    rest = done.stdout
    while True:
        head, _, rest = rest.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 1"):
            break
    if not head:
        return Reply(0, {}, b"")
    lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip()
               for name, _, value in (line.partition(":") for line in lines[1:])}
    return Reply(int(lines[0].split()[1]), headers, rest)


def daemon_token(daemon: Daemon) -> str:
    with daemon.client(timeout=10) as client:
        return str(client.request("get", vm="1001")["token"])


# -- 1. a 401 for a token another request already reported is not replayed -------------

def test_requests_in_flight_when_a_token_is_refused_are_all_replayed(api, daemon, proxy):
    """The issue: "On a 401 from the API the token is reported (invalidate) and the request
    replayed once with the fresh one, when its body was empty or buffered". Two GETs that
    left with the same token, refused by the API a moment apart: the first is replayed,
    the second goes back to its client as a bare 401 (not replayed, not even marked
    X-VM-Token-Replaced) because forward.py `_may_report` keys on (profile, VideoManager)
    and not on the token the request carried — "the first request after a refresh
    fails", the very complaint (kubernetes#87369) the issue cites."""
    assert curl(proxy).status == 200
    old = daemon_token(daemon)
    both_in = threading.Barrier(2, timeout=10)

    def answer(seen: Seen) -> Answer:
        if seen.token != old:
            return json_answer({"ok": True, "target": seen.target})
        both_in.wait()  # both requests carry the old token
        if seen.target.endswith("?second"):
            time.sleep(1.0)  # refused after the first one was reported and replayed
        return json_answer({"message": "token refused"}, 401)
    api.default = answer

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(curl, proxy, path=VIDEOS + "?first")
        second = pool.submit(curl, proxy, path=VIDEOS + "?second")
        first_reply, second_reply = first.result(), second.result()
    assert first_reply.status == 200, first_reply
    assert (second_reply.status, second_reply.headers.get("x-vm-token-replaced")) == (
        200, None), (second_reply, [(s.target, s.token == old) for s in api.requests()])


# -- 2. the replay after a 401 goes to the API the request left for, with the new token --

def test_a_replay_never_takes_a_token_to_the_api_a_reload_left(
        make_api, start_daemon, start_proxy, private_dir):
    """The daemon's `get` says the API its token is for, and forward() checks it before
    the first attempt — but the replay after a 401 asks for a fresh token and throws the
    api_url away (`token, _ = await self._token(key)`), then sends it to the pool of the
    origin the request was first sent to. A reload that moved the profile while a request
    was in flight (the old host slow, then refusing: say a host the user just noticed
    was wrong) hands the NEW API's token to the OLD host."""
    first, second = make_api(), make_api()
    config = private_dir / "config" / "vm-token" / "config.toml"

    def point_at(api: FakeApi) -> None:
        point_config_at(config, api)

    point_at(first)
    daemon = start_daemon(None)
    proxy = start_proxy(daemon)
    assert curl(proxy).status == 200

    def moved() -> bool:
        with vm_token.Client(daemon.socket, timeout=10) as client:
            return bool(client.request("get", vm="1001")["api_url"] == second.url)

    def slow_then_refused(seen: Seen) -> Answer:
        point_at(second)  # meanwhile, the user moves the profile to another API
        daemon.signal(signal.SIGHUP)
        wait_for(moved, 15, "the daemon to say the second API")
        return json_answer({"message": "token refused"}, 401)
    first.script(slow_then_refused)

    curl(proxy)  # whatever it answers: what matters is where the tokens went
    leaked = [s for s in first.requests() if s.token in second.tokens()]
    assert leaked == [], "the second API's token was sent to the first API"


# -- 3. clients that gave up still hold the API's connections: everyone else waits -------

def send_and_leave(proxy: Proxy, request: bytes) -> None:
    """A client that sends a request and closes without waiting for the answer (a
    timeout of its own ran out, or it was killed)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(proxy.socket))
        sock.sendall(request)


def test_clients_that_left_do_not_keep_the_api_connections_from_the_others(api, proxy):
    """Nothing watches the client while the proxy waits for the API's answer (forward.py
    `_attempt` → api_http `receive_head`, up to read_timeout, 300 s by default): a request
    whose client has gone keeps its pooled connection (one of MAX_CONNECTIONS = 100 per
    API) until the API answers. A slow API and clients with a timeout of their own that
    retry — the usual retry storm — leave every other program with a 503 proxy_busy after
    POOL_TIMEOUT. Expected: a request whose client left gives its connection back (close
    it, as nginx's proxy_ignore_client_abort off does)."""
    release = threading.Event()

    def answer(seen: Seen) -> Answer:
        if "slow" in seen.target:
            release.wait(60)
        return json_answer({"ok": True})
    api.default = answer
    try:
        for n in range(100):
            send_and_leave(proxy, f"GET {VIDEOS}?slow={n} HTTP/1.1\r\n"
                                  "Host: localhost\r\n\r\n".encode())
        wait_for(lambda: len(api.requests()) >= 100, 30, "the 100 abandoned requests")
        started = time.monotonic()
        reply = curl(proxy, path=VIDEOS + "?fast")
        assert reply.status == 200, (reply, f"after {time.monotonic() - started:.1f} s")
    finally:
        release.set()


# -- 4. the TCP port serves root's connections, which the login listener's helper refuses

async def test_the_tcp_port_admits_only_our_uid_not_root(monkeypatch):
    """DESIGN.md: "Every loopback TCP listener (the login callback, the proxy's --listen)
    admits only our uid"; the issue: on TCP "connections whose peer is another uid are
    refused ... share the helper with the login listener". The helper's answer
    (`_loopback.serves_peer`: the peer's uid == ours) refuses root; the proxy's TcpGate
    (gates.py `_ours`: ours or 0) admits it. On a Unix socket "root aside" is the issue's
    rule, but a loopback port is reachable by far more of root: any container run as root
    with the host's network (docker --network=host without userns-remap: kuid 0, and no
    way into the user's files or memory) can then spend the user's token. Here the test
    (root) plays such a peer for a proxy whose uid is 4242."""
    import os

    import trio

    from vm_token import _loopback
    from vm_tokend.proxy.gates import TcpGate

    if os.getuid() != 0:
        pytest.skip("needs root to play a root peer")
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    async with listener:
        client = trio.socket.socket()
        await client.connect(("127.0.0.1", port))
        stream = await listener.accept()
        monkeypatch.setattr(os, "getuid", lambda: 4242)  # the proxy runs as uid 4242
        try:
            # the helper the login listener uses says no
            assert not _loopback.serves_peer(stream.socket)  # type: ignore[arg-type]
            admission = await TcpGate("127.0.0.1", port, None).admits(stream)
        finally:
            monkeypatch.undo()
            client.close()
            await stream.aclose()
    assert admission.uid == 0
    assert not admission.admitted, "a root peer was served on the --listen port"


# -- 5. a profile whose API hangs: "vm-tokend did not answer", and the others wait ---------

def test_a_profile_whose_api_hangs_is_not_reported_as_the_daemon_and_delays_no_other(
        api, start_daemon, start_proxy, private_dir):
    """The proxy asks the daemon for a token per request through ONE vm_token.AsyncClient
    with its defaults (command.py `vm_token.AsyncClient(settings.socket_path)`):
    max_connections 4, and a 5 s timeout that includes the wait for a free connection. A
    `get` for a profile whose API (or identity provider) does not answer blocks in the
    daemon while it logs in, longer than 5 s: the client gets 502 `daemon_unreachable`,
    "vm-tokend did not answer within 5 s" — the daemon is there and fine, the API is not
    (the issue: `upstream_unavailable`). And four such requests hold every daemon
    connection: a request for another profile, logged in and healthy, waits in line
    behind them (about 4 s here; up to the 5 s timeout)."""
    hole = socket.create_server(("127.0.0.1", 0), backlog=64)  # accepts, never answers
    try:
        config = private_dir / "config" / "vm-token" / "config.toml"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(
            f'[profiles.down]\napi_url = "http://127.0.0.1:{hole.getsockname()[1]}/v1/vms"\n'
            'username = "u"\npassword = "p"\nauth = "legacy"\n')
        daemon = start_daemon(None, env=daemon_env(api))
        proxy = start_proxy(daemon)
        assert curl(proxy).status == 200  # the default profile is logged in and served
        with concurrent.futures.ThreadPoolExecutor(9) as pool:
            stuck = [pool.submit(curl, proxy, host="down", max_time=15) for _ in range(8)]
            time.sleep(1.0)
            started = time.monotonic()
            healthy = curl(proxy, max_time=15)
            took = time.monotonic() - started
            down = [future.result() for future in stuck]
        codes = {reply.headers.get("x-vm-token-error") for reply in down}
        assert "daemon_unreachable" not in codes, down[0]
        assert healthy.status == 200 and took < 2.0, (healthy, f"after {took:.1f} s")
    finally:
        hole.close()


# -- 6. an API that answers before it has read the body, and waits -------------------------

class EarlyApi(FakeApi):
    """Answers a request whose target says `early` as soon as its head came, without
    reading its body; then, with `stall`, neither reads nor closes for a while (as a
    server does that answered and waits for the client to stop sending)."""

    stall = 0.0

    def _read_request(self, sock, conn, request, number):
        if b"early" in request.target:
            return Seen(request.method.decode(), request.target.decode("latin-1"),
                        list(request.headers.raw_items()), b"", number)
        return super()._read_request(sock, conn, request, number)

    def _send(self, sock, conn, answer):
        super()._send(sock, conn, answer)
        if answer.status == 401:
            time.sleep(self.stall)


def test_an_answer_that_comes_before_the_body_is_read_is_passed_on(
        start_daemon, start_proxy, tmp_path):
    """RFC 9112 9.5 lets a server answer before it has read the request (a 401 or 413 to
    an upload, typically): a client should stop sending and take the answer. The proxy
    reads the API's answer only once the whole body went (forward.py `_send`:
    send_body, then receive_head), so an API that answered early and waits gets nothing
    read: the proxy sits in send_all until read_timeout (300 s by default; 3 s here) and
    answers 504 upstream_timeout. The API's 401 is lost, the token is never reported, and
    the upload "timed out" instead of coming back marked X-VM-Token-Replaced."""
    api = EarlyApi()
    api.stall = 8.0
    api.start()
    try:
        daemon = start_daemon(None, env=daemon_env(api))
        proxy = start_proxy(daemon, "--read-timeout", "3")
        assert curl(proxy).status == 200
        api.script(json_answer({"message": "token refused"}, 401))
        upload = tmp_path / "upload.bin"
        upload.write_bytes(b"v" * (10 << 20))
        reply = curl(proxy, "-X", "POST", "--data-binary", f"@{upload}",
                     path=VIDEOS + "?early")
        assert (reply.status, reply.headers.get("x-vm-token-replaced")) == (401, "1"), reply
    finally:
        api.stop()


# -- 7. small things ---------------------------------------------------------------------

def raw_exchange(proxy: Proxy, data: bytes, wait: float = 2.0) -> bytes:
    """Send `data` on one connection; everything that comes back, and `<EOF>` if the
    proxy closed the connection (else `<open>`)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(proxy.socket))
        sock.sendall(data)
        sock.settimeout(wait)
        got = b""
        try:
            while chunk := sock.recv(65536):
                got += chunk
            return got + b"<EOF>"
        except TimeoutError:
            return got + b"<open>"


def test_a_head_the_proxy_refuses_keeps_the_connection_like_a_get(api, proxy):
    """service.py `_exchange` answers a Refusal with Conversation.answer, which sends a
    JSON body whatever the method: h11 refuses a body in an answer to HEAD ("Too much data
    for declared Content-Length"), so the keep-alive connection is dropped after the head
    (a GET refused the same way keeps it, and its next request is answered)."""
    pipelined = (b"HEAD /elsewhere HTTP/1.1\r\nHost: localhost\r\n\r\n"
                 b"GET /v1/vms HTTP/1.1\r\nHost: localhost\r\n\r\n")
    got = raw_exchange(proxy, pipelined)
    assert got.count(b"HTTP/1.1 ") == 2 and b'{"ok": true}' in got, (got, proxy.log()[-600:])


def test_no_cors_header_is_ever_sent_on_the_tcp_port(api, daemon, start_proxy):
    """The issue, on --listen: "no CORS header is ever sent". The API's own
    Access-Control-* headers pass through (end_to_end drops hop-by-hop ones only)."""
    proxy = start_proxy(daemon, "--listen", "127.0.0.1:0")
    found = wait_for(lambda: re.search(r"also serving on \S+ port (\d+)", proxy.log()),
                     10, "the TCP port")
    assert isinstance(found, re.Match)
    port = found[1]
    api.default = json_answer({"ok": True}, headers=[
        ("Access-Control-Allow-Origin", "*"), ("Access-Control-Allow-Credentials", "true")])
    done = subprocess.run(["curl", "-sS", "-D", "-", "-o", "/dev/null", "--max-time", "10",
                           f"http://127.0.0.1:{port}{VIDEOS}"],
                          capture_output=True, text=True, timeout=20, check=False)
    assert done.stdout.startswith("HTTP/1.1 200"), done
    cors = [line for line in done.stdout.lower().splitlines()
            if line.startswith("access-control-")]
    assert cors == [], cors


def test_the_proxy_takes_min_ttl_as_the_issue_says():
    """The issue: "`--min-ttl` (default 30 s)". command.py has no such option (the
    Forwarder takes min_ttl, nothing sets it but the constant)."""
    done = subprocess.run([str(BIN / "vm-tokend"), "proxy", "--help"], capture_output=True,
                          text=True, timeout=20, check=False)
    assert "--min-ttl" in done.stdout, done.stdout


def test_sigterm_does_not_wait_for_idle_keep_alive_clients(api, proxy):
    """The issue: "SIGTERM drains requests in flight (bounded), then exits 0". A client
    that merely keeps its connection open between requests (any HTTP client's pool) has
    nothing in flight, yet service.py's handler waits in next_event(between_requests=True)
    until the drain deadline cancels it: every stop or restart takes the full 10 s."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(proxy.socket))
        sock.sendall(f"GET {VIDEOS} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        sock.settimeout(10)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        proxy.proc.terminate()
        assert proxy.proc.wait(timeout=20) == 0
        took = time.monotonic() - started
    assert took < 3.0, f"stopped after {took:.1f} s"


# -- 8. a CA bundle the proxy cannot read: it trusted the system's CAs instead -----------

def test_a_ca_bundle_that_cannot_be_read_makes_the_proxy_trust_nothing_else(
        make_api, tls, start_daemon, start_proxy, private_dir):
    """command.py `tls_context` answered "the system's CAs" when the configuration or a
    profile's ca_bundle could not be read (removed, replaced, unreadable) — fail open: a
    ca_bundle is there to trust one private CA, and the system's trust hundreds, any of
    which may sign for the API's name. Expected: the proxy's own 502 naming the file, and
    nothing sent to the API (not even a connection); once the bundle is back, served."""
    import json
    import shutil

    bundle = private_dir / "ca.pem"
    shutil.copy(tls.ca_file, bundle)  # the module's CA file is shared: a copy to remove
    api = make_api(host="127.0.0.2", tls=tls.server)
    daemon = start_daemon(None, env={**daemon_env(api), "VM_TOKEN_CA_BUNDLE": str(bundle)})
    proxy = start_proxy(daemon)
    daemon_token(daemon)  # the daemon logged in over TLS with that bundle
    connections = api.connections

    aside = bundle.rename(private_dir / "ca.aside")  # removed after the daemon read it
    reply = curl(proxy)
    assert (reply.status, reply.headers.get("x-vm-token-error")) == (
        502, "upstream_unavailable"), reply
    assert f"cannot read the CA bundle {bundle}" in json.loads(reply.body)["message"], reply

    bundle.write_text("not a certificate\n")  # replaced by something that is not PEM
    reply = curl(proxy)
    assert (reply.status, reply.headers.get("x-vm-token-error")) == (
        502, "upstream_unavailable"), reply
    assert f"cannot read the CA bundle {bundle}" in json.loads(reply.body)["message"], reply
    assert (api.connections, api.requests()) == (connections, [])  # nothing reached the API

    aside.replace(bundle)  # back: trusted as before
    assert curl(proxy).status == 200
    assert len(api.requests()) == 1
