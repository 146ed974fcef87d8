"""What `vm-tokend proxy` sends to the API and passes back, seen on the wire.

Black-box: the real vm-tokend and `vm-tokend proxy`, real curl (and Python's http.client
for keep-alive) over the proxy's Unix socket, and an API of our own (tests/h11_api.py, h11
as the server) that logs vm-tokend in with the legacy endpoints, records every request
exactly as it came (headers in order, body bytes, framing) and answers what each test
scripts. Nothing here depends on how the proxy talks to the API, only on what the API and
the client see.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import Daemon, Tls, make_tls
from tests.e2e.conftest import Proxy
from tests.h11_api import Answer, FakeApi, Seen, daemon_env, json_answer, point_config_at, wait_for

pytestmark = pytest.mark.timeout(60)

VIDEOS = "/v1/vms/1001/videos"
# RFC 9110 7.6.1 and their kin: never forwarded, either way.
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "upgrade",
              "proxy-authorization", "proxy-authenticate", "trailer", "x-secret-hop"}


# -- the pieces: our API, the daemon logged in against it, the proxy, the clients ---------

@pytest.fixture
def proxy(api: FakeApi, start_daemon: Callable[..., Daemon],
          start_proxy: Callable[..., Proxy]) -> Proxy:
    return start_proxy(start_daemon(None, env=daemon_env(api)))


@dataclass
class Reply:
    status: int
    headers: list[tuple[str, str]]  # names lower-cased, in order
    body: bytes

    def all(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key == name]

    def one(self, name: str) -> str | None:
        values = self.all(name)
        assert len(values) <= 1, (name, values)
        return values[0] if values else None


def curl(proxy: Proxy, *args: str, host: str = "localhost", path: str = VIDEOS,
         stdin: bytes | None = None, output: Path | None = None) -> Reply:
    """One request through the proxy with curl; the answer's head as curl got it (-D -)
    and the body as it came (no --compressed: not decoded), or written to `output`."""
    done = subprocess.run(
        ["curl", "-sS", "--max-time", "20", "--unix-socket", str(proxy.socket), "-D", "-",
         "-o", "-" if output is None else str(output), *args, f"http://{host}{path}"],
        input=stdin, capture_output=True, timeout=30, check=False)
    assert done.returncode == 0, (done.returncode, done.stderr, proxy.log()[-2000:])
    rest = done.stdout
    while True:
        head, _, rest = rest.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 1"):  # past any 100 Continue
            break
    lines = head.decode("latin-1").split("\r\n")
    headers = [(name.strip().lower(), value.strip())
               for name, _, value in (line.partition(":") for line in lines[1:])]
    return Reply(int(lines[0].split()[1]), headers, rest)


class UnixConnection(http.client.HTTPConnection):
    """http.client over the proxy's socket: one keep-alive connection, request after
    request (it reconnects silently when the proxy closed: compare `sock` to see it)."""

    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=20)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(str(self.path))


def exactly(count: int, seen: list[Seen]) -> list[Seen]:
    assert len(seen) == count, [(s.method, s.target, s.token) for s in seen]
    return seen


def only(seen: list[Seen]) -> Seen:
    return exactly(1, seen)[0]


# -- 1. request bodies: chunked stays chunked, a length stays a length -----------------

def test_a_chunked_body_reaches_the_api_chunked_and_a_sized_one_keeps_its_length(
        api, proxy, tmp_path):
    data = os.urandom(300_000) + b"\r\n0\r\n\r\n"  # past one read, and a chunk's end in it
    upload = tmp_path / "upload.bin"
    upload.write_bytes(data)

    # chunked by the client's choice: chunked upstream, no length, the exact bytes
    reply = curl(proxy, "-X", "POST", "-H", "Transfer-Encoding: chunked",
                 "--data-binary", f"@{upload}")
    assert reply.status == 200, reply
    seen = api.requests()[-1]
    assert (seen.method, seen.chunked, seen.content_length) == ("POST", True, None)
    assert seen.body == data

    # `-T -` streams stdin, chunked (curl cannot know its length)
    reply = curl(proxy, "-T", "-", stdin=data)
    assert reply.status == 200, reply
    seen = api.requests()[-1]
    assert (seen.method, seen.chunked, seen.content_length) == ("PUT", True, None)
    assert seen.body == data

    # an empty stdin: still chunked, and empty
    assert curl(proxy, "-T", "-", stdin=b"").status == 200
    seen = api.requests()[-1]
    assert (seen.method, seen.chunked, seen.content_length, seen.body) == (
        "PUT", True, None, b"")

    # a Content-Length body keeps it: not turned into chunked
    assert curl(proxy, "-X", "POST", "--data-binary", f"@{upload}").status == 200
    seen = api.requests()[-1]
    assert (seen.method, seen.chunked, seen.content_length) == ("POST", False, len(data))
    assert seen.body == data

    # and a POST with Content-Length: 0 says so (some servers want a 411 without it)
    assert curl(proxy, "-X", "POST", "--data-binary", "").status == 200
    seen = api.requests()[-1]
    assert (seen.method, seen.chunked, seen.content_length, seen.body) == (
        "POST", False, 0, b"")
    assert api.errors == []


# -- 2. Accept-Encoding, and encoded answers passed through raw ----------------------

def test_accept_encoding_is_identity_unless_asked_and_gzip_comes_back_raw(api, proxy):
    reply = curl(proxy)  # curl sends no Accept-Encoding without --compressed
    assert reply.status == 200
    assert api.requests()[-1].all("accept-encoding") == ["identity"]

    plain = b'{"videos": [' + b'{"title": "a video"},' * 2000 + b"{}]}"
    packed = gzip.compress(plain, mtime=0)
    api.script(Answer(200, [("Content-Type", "application/json"), ("Content-Encoding", "gzip"),
                            ("Content-Length", str(len(packed)))], [packed]))
    reply = curl(proxy, "-H", "Accept-Encoding: gzip")
    assert api.requests()[-1].all("accept-encoding") == ["gzip"]
    assert reply.status == 200
    assert reply.all("content-encoding") == ["gzip"]
    assert reply.body == packed  # byte for byte: not decoded, not re-encoded
    assert api.errors == []


# -- 3. nothing of the proxy's own goes upstream ------------------------------------

@pytest.fixture
def two_profiles(api, start_daemon, start_proxy, private_dir) -> tuple[Daemon, Proxy]:
    """The default profile and `other` (another user), both on our API (the same origin)."""
    api.users["other-user"] = "other-pw"
    config = private_dir / "config" / "vm-token" / "config.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(f'[profiles.other]\napi_url = "{api.url}"\nusername = "other-user"\n'
                      'password = "other-pw"\nauth = "legacy"\n')
    daemon = start_daemon(None, env=daemon_env(api))
    return daemon, start_proxy(daemon)


def daemon_token(daemon: Daemon, profile: str | None = None) -> str:
    fields = {"profile": profile} if profile else {}
    with daemon.client(timeout=10) as client:
        return str(client.request("get", vm="1001", **fields)["token"])


def test_the_proxy_adds_nothing_of_its_own_upstream(api, two_profiles):
    daemon, proxy = two_profiles
    # a client that sends nothing but Host: the API sees Host, the token, and identity
    reply = curl(proxy, "-H", "User-Agent:", "-H", "Accept:")
    assert reply.status == 200, reply
    seen = api.requests()[-1]
    assert sorted(seen.names) == ["accept-encoding", "authorization", "host"], seen.headers
    assert seen.one("host") == api.host  # the API's own host:port, not the client's
    assert seen.token == daemon_token(daemon)

    # a User-Agent only when the client sent one, and then the client's
    curl(proxy, "-A", "my-tool/1.0")
    assert api.requests()[-1].all("user-agent") == ["my-tool/1.0"]

    # the client's Authorization (two of them, even) never goes: exactly one, the daemon's
    curl(proxy, "-H", "Authorization: Bearer client-one", "-H", "authorization: Basic dXNlcg==")
    seen = api.requests()[-1]
    assert seen.all("authorization") == [f"Bearer {daemon_token(daemon)}"], seen.headers

    # cookies the API sets are the client's business: the proxy keeps none and sends none,
    # for the same profile or another one on the same API
    api.script(json_answer({"ok": True}, headers=[("Set-Cookie", "session=abc; Path=/")]))
    reply = curl(proxy)
    assert reply.all("set-cookie") == ["session=abc; Path=/"]  # passed to the client
    curl(proxy)
    curl(proxy, host="other")
    curl(proxy, host="other", path="/v1/vms")
    same, other, other_root = api.requests()[-3:]
    for seen in (same, other, other_root):
        assert seen.all("cookie") == [], seen.headers
    assert other.token == daemon_token(daemon, "other") != same.token
    assert api.errors == []


# -- 4. hop-by-hop headers are dropped both ways, end-to-end ones kept --------------

def test_hop_by_hop_headers_are_dropped_both_ways_and_end_to_end_ones_kept(api, proxy):
    api.script(Answer(200, [
        ("Content-Type", "text/plain"),
        ("Connection", "keep-alive, X-Secret-Hop"), ("X-Secret-Hop", "1"),
        ("Keep-Alive", "timeout=5"), ("Proxy-Connection", "keep-alive"), ("TE", "trailers"),
        ("Upgrade", "h2c"), ("Proxy-Authenticate", "Basic realm=x"),
        ("Proxy-Authorization", "Basic c2VjcmV0"),
        ("X-Custom", "one"), ("X-Custom", "two"), ("X-Other", "x"), ("X-Custom", "three"),
        ("Content-Length", "5")], [b"hello"]))
    reply = curl(proxy, "-H", "Connection: keep-alive, X-Secret-Hop", "-H", "X-Secret-Hop: 1",
                 "-H", "Keep-Alive: timeout=5", "-H", "Proxy-Connection: keep-alive",
                 "-H", "TE: trailers", "-H", "Upgrade: websocket",
                 "-H", "Proxy-Authorization: Basic c2VjcmV0",
                 "-H", "X-Custom: a", "-H", "X-Custom: b")
    seen = only(api.requests())
    assert [name for name in seen.names if name in HOP_BY_HOP] == [], seen.headers
    assert seen.all("x-custom") == ["a", "b"]

    assert (reply.status, reply.body) == (200, b"hello"), reply
    # the proxy may say keep-alive or close of its own, nothing the API said hop-by-hop
    connection = {token.strip().lower() for value in reply.all("connection")
                  for token in value.split(",")}
    assert connection <= {"keep-alive", "close"}, reply.headers
    leaked = [name for name, _ in reply.headers if name in HOP_BY_HOP - {"connection"}]
    assert leaked == [], reply.headers
    assert reply.all("x-custom") == ["one", "two", "three"]
    assert reply.all("x-other") == ["x"]
    assert api.errors == []


# -- 5. an answer framed two ways reaches the client framed once --------------------

def test_an_answer_framed_two_ways_is_passed_framed_once_and_the_connection_goes_on(
        api, proxy):
    api.script(
        Answer(raw=b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n"
                   b"Transfer-Encoding: chunked\r\n\r\n"
                   b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
        Answer(200, [("Content-Length", "6")], [b"second"]))
    client = UnixConnection(proxy.socket)
    try:
        client.request("GET", VIDEOS)
        response = client.getresponse()
        headers = [(name.lower(), value) for name, value in response.getheaders()]
        body = response.read()
        first_socket = client.sock
        assert (response.status, body) == (200, b"hello world"), headers
        assert "content-length" not in dict(headers), headers  # the chunks say the length
        # the same client connection carries the next request, answered right
        client.request("GET", VIDEOS)
        response = client.getresponse()
        assert (response.status, response.read()) == (200, b"second")
        assert client.sock is not None and client.sock is first_socket
    finally:
        client.close()
    assert [seen.method for seen in api.requests()] == ["GET", "GET"]
    assert api.errors == []


# -- 6. HEAD: headers, no body, and the connections stay in step --------------------

def test_head_gets_the_headers_no_body_and_the_next_request_is_answered(api, proxy):
    def answer(seen: Seen) -> Answer:
        if seen.method == "HEAD":  # as a GET would say: 1000 bytes, which HEAD never gets
            return Answer(200, [("Content-Type", "application/octet-stream"),
                                ("Content-Length", "1000"), ("X-Custom", "head")])
        return Answer(200, [("Content-Length", "9")], [b"after-" + seen.target[-3:].encode()])
    api.default = answer
    client = UnixConnection(proxy.socket)
    try:
        first_socket = None
        for round_ in ("one", "two"):
            client.request("HEAD", f"{VIDEOS}?{round_}")
            response = client.getresponse()
            assert response.status == 200
            assert response.getheader("x-custom") == "head"
            assert response.getheader("content-length") == "1000"
            assert response.read() == b""
            first_socket = first_socket or client.sock
            client.request("GET", f"{VIDEOS}?{round_}")
            response = client.getresponse()
            assert (response.status, response.read()) == (200, f"after-{round_}".encode())
            assert client.sock is first_socket  # the proxy kept the client's connection
    finally:
        client.close()
    assert [(seen.method, seen.target[-3:]) for seen in api.requests()] == [
        ("HEAD", "one"), ("GET", "one"), ("HEAD", "two"), ("GET", "two")]
    assert api.errors == []


# -- 7. a reload that moves the profile's API ---------------------------------------

def test_a_reload_that_moves_the_api_moves_the_proxy_and_its_tokens(
        make_api, start_daemon, start_proxy, private_dir):
    first, second = make_api(), make_api()
    config = private_dir / "config" / "vm-token" / "config.toml"

    def point_at(api: FakeApi) -> None:
        point_config_at(config, api)

    point_at(first)
    daemon = start_daemon(None)  # everything from the config file
    proxy = start_proxy(daemon)
    assert curl(proxy).status == 200
    seen = only(first.requests())
    assert seen.token in first.tokens() and seen.one("host") == first.host

    point_at(second)
    daemon.signal(signal.SIGHUP)

    def moved() -> bool:
        with daemon.client(timeout=10) as client:
            return bool(client.request("get")["api_url"] == second.url)
    wait_for(moved, 15, "the daemon to say the second API")

    reply = curl(proxy)
    assert reply.status == 200, reply
    assert len(first.requests()) == 1, "the request went to the API the profile left"
    seen = only(second.requests())
    assert seen.one("host") == second.host
    assert seen.token in second.tokens()
    # neither API ever sees the other's token
    assert not {s.token for s in second.requests()} & set(first.tokens())
    assert not {s.token for s in first.requests()} & set(second.tokens())


# -- 8. what is retried: a 401 once, nothing else -----------------------------------

def test_a_429_and_its_retry_after_pass_through_untried(api, proxy):
    api.script(json_answer({"message": "slow down"}, 429, headers=[("Retry-After", "7")]))
    reply = curl(proxy)
    assert (reply.status, reply.one("retry-after")) == (429, "7"), reply
    assert reply.body == b'{"message": "slow down"}'
    assert reply.one("x-vm-token-error") is None  # the API's answer, not the proxy's
    time.sleep(0.5)  # a retry, if the proxy made one, would have come by now
    assert len(api.requests()) == 1


def test_a_401_on_a_get_is_replayed_once_with_a_fresh_token(api, proxy):
    api.script(json_answer({"message": "token refused"}, 401,
                           headers=[("WWW-Authenticate", "Bearer")]))
    reply = curl(proxy)
    assert (reply.status, reply.body) == (200, b'{"ok": true}'), reply
    refused, replayed = exactly(2, api.requests())
    issued = api.tokens()
    assert refused.token != replayed.token
    # the replay carries a token the API handed out after the refused one
    assert issued.index(replayed.token) > issued.index(refused.token)
    assert len(api.logins()) <= 2, api.logins()  # the login, then one new token


def test_a_second_401_goes_back_to_the_client_as_it_is(api, proxy):
    refusal = json_answer({"message": "token refused"}, 401,
                          headers=[("WWW-Authenticate", 'Bearer error="invalid_token"')])
    api.default = refusal
    reply = curl(proxy)
    assert reply.status == 401, reply
    assert reply.body == b'{"message": "token refused"}'
    assert reply.one("www-authenticate") == 'Bearer error="invalid_token"'
    assert reply.one("x-vm-token-error") is None
    time.sleep(1)  # no loop: nothing more comes, of requests or of logins
    refused, replayed = exactly(2, api.requests())
    assert refused.token != replayed.token
    assert len(api.logins()) <= 2, api.logins()
    # and the next client request is served as before, with one replay at most
    api.default = json_answer({"ok": True})
    assert curl(proxy).status == 200
    assert len(api.requests()) in (3, 4)


# -- 9. https: the API's certificate checked against what the daemon trusts ----------
#
# Our API on https://127.0.0.2:PORT with a certificate of a test CA, the daemon and the
# proxy given that CA as ca_bundle (VM_TOKEN_CA_BUNDLE: the proxy reads the daemon's
# settings). What is under test is the proxy's own TLS client (trio's SSLStream over its
# h11 connections) and its pool: requests and bodies pass whole, a certificate it does not
# trust gets nothing, and one TLS connection serves request after request.

DOWNLOAD_SIZE = 64 << 20
PIECE = 1 << 20


def tls_env(api: FakeApi, tls: Tls) -> dict[str, str]:
    return {**daemon_env(api), "VM_TOKEN_CA_BUNDLE": tls.ca_file}


@pytest.fixture
def tls_api(make_api: Callable[..., FakeApi], tls: Tls) -> FakeApi:
    return make_api(host="127.0.0.2", tls=tls.server)


@pytest.fixture
def over_tls(tls_api: FakeApi, tls: Tls, start_daemon: Callable[..., Daemon],
             start_proxy: Callable[..., Proxy]) -> tuple[Daemon, Proxy]:
    daemon = start_daemon(None, env=tls_env(tls_api, tls))
    return daemon, start_proxy(daemon)


def pattern(size: int, piece: int) -> Iterator[bytes]:
    """`size` bytes of a pattern that no two pieces share, `piece` bytes at a time."""
    for index, start in enumerate(range(0, size, piece)):
        block = hashlib.sha256(index.to_bytes(8, "big")).digest() * (piece // 32 + 1)
        yield block[:min(piece, size - start)]


def sha256_of(pieces: Iterable[bytes]) -> str:
    digest = hashlib.sha256()
    for piece in pieces:
        digest.update(piece)
    return digest.hexdigest()


def get(client: http.client.HTTPConnection, query: str) -> tuple[int, bytes]:
    client.request("GET", f"{VIDEOS}?{query}")
    response = client.getresponse()
    return response.status, response.read()


def test_over_tls_a_get_and_a_json_post_reach_the_api_with_the_daemons_token(
        tls_api, over_tls):
    daemon, proxy = over_tls
    assert tls_api.url.startswith("https://127.0.0.2:")
    reply = curl(proxy)
    assert (reply.status, reply.body) == (200, b'{"ok": true}'), reply
    seen = only(tls_api.requests())
    assert (seen.method, seen.target) == ("GET", VIDEOS)
    assert seen.tls is not None and seen.tls.startswith("TLSv1."), seen.tls  # not plain http
    assert seen.one("host") == tls_api.host
    assert seen.token == daemon_token(daemon)

    document = {"title": "a video über TLS", "tags": ["a", "b"], "length": 12.5}
    body = json.dumps(document).encode()
    tls_api.script(lambda seen: json_answer({"got": json.loads(seen.body)}, 201))
    reply = curl(proxy, "-X", "POST", "-H", "Content-Type: application/json",
                 "--data-binary", "@-", stdin=body)
    assert reply.status == 201, reply
    assert json.loads(reply.body) == {"got": document}
    seen = tls_api.requests()[-1]
    assert (seen.method, seen.body, seen.content_length, seen.chunked) == (
        "POST", body, len(body), False)
    assert seen.one("content-type") == "application/json"
    assert seen.tls is not None and seen.token == daemon_token(daemon)
    assert tls_api.errors == []


def test_over_tls_a_64_mib_download_and_a_chunked_one_arrive_whole(
        tls_api, over_tls, tmp_path):
    _, proxy = over_tls
    # Content-Length: the proxy moves the body as it comes off the TLS stream
    tls_api.script(Answer(200, [("Content-Type", "application/octet-stream"),
                                ("Content-Length", str(DOWNLOAD_SIZE))],
                          pattern(DOWNLOAD_SIZE, PIECE)))  # a generator: streamed
    output = tmp_path / "download.bin"
    reply = curl(proxy, output=output)
    assert reply.status == 200, reply
    assert reply.one("content-length") == str(DOWNLOAD_SIZE)
    assert output.stat().st_size == DOWNLOAD_SIZE
    with output.open("rb") as got:
        assert sha256_of(iter(lambda: got.read(PIECE), b"")) == \
            sha256_of(pattern(DOWNLOAD_SIZE, PIECE))

    # chunked, in pieces of odd sizes (one byte, past a TLS record, past a read): h11's way
    sizes = [1, 16_384, 16_385, 65_537, 300_001, 7, 1 << 20, 3]
    pieces = [os.urandom(size) for size in sizes]
    tls_api.script(Answer(200, [("Content-Type", "application/octet-stream"),
                                ("Transfer-Encoding", "chunked")], iter(pieces)))
    reply = curl(proxy, output=output)
    assert reply.status == 200, reply
    assert reply.all("transfer-encoding") == ["chunked"] and reply.one("content-length") is None
    assert output.stat().st_size == sum(sizes) > 1 << 20
    assert sha256_of([output.read_bytes()]) == sha256_of(pieces)

    # both on the one connection the proxy keeps to the API
    assert len({seen.connection for seen in exactly(2, tls_api.requests())}) == 1
    assert tls_api.errors == []


def untrusting_proxy(how: str, api: FakeApi, tls: Tls, daemon: Daemon,
                     start_proxy: Callable[..., Proxy], directory: Path) -> Proxy:
    """A proxy that must not trust what `api` shows: it trusts the test CA (as the daemon
    does: the daemon says so with each token), and the API (someone in between) shows a
    certificate for its very address from another CA."""
    proxy = start_proxy(daemon)
    api.tls = make_tls(directory, ca_name="an impostor CA").server
    return proxy


DISTRUST = ["impostor certificate"]


@pytest.mark.parametrize("distrust", DISTRUST)
def test_an_api_certificate_the_proxy_does_not_trust_gets_no_request_and_a_502(
        distrust, tls_api, tls, start_daemon, start_proxy, tmp_path):
    daemon = start_daemon(None, env=tls_env(tls_api, tls))
    token = daemon_token(daemon)  # the daemon logged in over TLS: it trusts this API
    proxy = untrusting_proxy(distrust, tls_api, tls, daemon, start_proxy, tmp_path)
    connections = tls_api.connections
    for _ in range(2):  # a failed handshake leaves nothing behind that a retry would use
        reply = curl(proxy)
        assert reply.status == 502, reply
        assert reply.one("x-vm-token-error") == "upstream_unavailable", reply
        answer = json.loads(reply.body)
        assert answer["error"] == "upstream_unavailable", answer
        assert "certificate is not trusted" in answer["message"], answer
    # the proxy did reach the API (a connection each time: the API showed its certificate)
    # and broke off in the handshake: no request, no token over an unverified connection
    assert tls_api.connections == connections + 2
    assert tls_api.requests() == [] and tls_api.elsewhere == []
    assert token not in proxy.log()


def test_the_connection_of_a_refused_handshake_is_closed_at_once(
        tls_api, tls, start_daemon, start_proxy, tmp_path):
    daemon = start_daemon(None, env=tls_env(tls_api, tls))
    daemon_token(daemon)
    proxy = untrusting_proxy(DISTRUST[0], tls_api, tls, daemon, start_proxy, tmp_path)
    assert curl(proxy).status == 502
    # the API waits for the rest of the handshake (h11_api.HANDSHAKE_TIMEOUT, 10 s) unless
    # the proxy hangs up: an end it sees at once
    wait_for(lambda: any("TLS handshake" in error for error in tls_api.errors), 3,
             "the API to see the refused connection end")
    assert not [error for error in tls_api.errors if "timed out" in error], tls_api.errors


def test_over_tls_one_api_connection_carries_a_keep_alive_clients_requests(
        tls_api, over_tls):
    _, proxy = over_tls
    client = UnixConnection(proxy.socket)
    try:
        for number in range(20):
            assert get(client, f"n={number}") == (200, b'{"ok": true}')
        seen = exactly(20, tls_api.requests())
        assert [s.target for s in seen] == [f"{VIDEOS}?n={n}" for n in range(20)]
        [first] = {s.connection for s in seen}  # one TLS connection for all twenty
        assert all(s.tls is not None for s in seen)

        # the API closes the connection while it is idle in the proxy's pool (its own
        # keep-alive timeout): the next request goes on a new one, and succeeds
        wait_for(lambda: first in tls_api.idle(), 5, "the proxy's connection idle at the API")
        assert first in tls_api.close_idle()
        assert get(client, "after-close") == (200, b'{"ok": true}')
        after = exactly(21, tls_api.requests())[-1]
        assert after.target.endswith("after-close") and after.connection != first
    finally:
        client.close()
    assert tls_api.errors == []


@pytest.mark.parametrize("scheme", ["https", "http"])
def test_a_get_on_a_reused_connection_the_api_closes_unanswered_is_sent_again(
        scheme, make_api, tls, start_daemon, start_proxy):
    api = make_api(host="127.0.0.2", tls=tls.server if scheme == "https" else None)
    proxy = start_proxy(start_daemon(None, env=tls_env(api, tls)))
    client = UnixConnection(proxy.socket)
    try:
        assert get(client, "first") == (200, b'{"ok": true}')
        # the API closes the reused connection as the request comes, without an answer:
        # the race a look at the idle socket cannot see (it closed its end just as the
        # proxy sent); nothing is lost by sending a GET again on a new connection
        api.script(Answer(raw=b"", close=True))
        status, body = get(client, "closed-on-arrival")
        assert (status, body) == (200, b'{"ok": true}'), body
    finally:
        client.close()
    first, dropped, again = exactly(3, api.requests())
    assert first.connection == dropped.connection != again.connection
    assert dropped.target == again.target and dropped.token == again.token
    assert api.errors == []
