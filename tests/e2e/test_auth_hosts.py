"""The httpx/requests auth gives a token only where git's helper would (issue 15, finding 1).

A token goes only to a profile's API host or its `credential_hosts`, only over https (plain
http to loopback only). Any other request goes out as the caller made it, and its 401 is
returned as it is, reported to nobody. Real httpx and requests clients, a real daemon, the
stand-in as the API and loopback servers that record the Authorization header of every
request they get: 127.0.0.1, 127.0.0.2 and localhost are different hosts to the rule, and a
host's port is part of its name.
"""

from __future__ import annotations

import ssl
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import requests
import trio

import vm_token
from tests.conftest import Tls

pytestmark = pytest.mark.timeout(90)

KINDS = ["httpx", "httpx-async", "requests"]
# A profile's host (credential_hosts) that is not loopback: plain http to it must carry no
# token. Requests for it go to a recording forward proxy, so it need not resolve.
REMOTE_HOST = "api.test.example"
NOBODY = "http://evil.example/steal"  # not any profile's host, through the proxy too
ROUTED = (f"http://{REMOTE_HOST}", "http://evil.example")  # what goes to the proxy


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = b""
            while size := int(self.rfile.readline().split(b";")[0], 16):
                body += self.rfile.read(size)
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            return body
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _serve(self) -> None:
        recorder = self.server.recorder
        body = self._body()
        with recorder.lock:
            recorder.seen.append(Seen(self.command, self.path,
                                      self.headers.get("Authorization"), body))
        self.send_response(recorder.status)
        if recorder.location:
            self.send_header("Location", recorder.location)
        if recorder.status == 401:
            self.send_header("WWW-Authenticate", "Bearer")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    do_GET = do_POST = do_PUT = _serve

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    recorder: Recorder


@dataclass
class Seen:
    method: str
    target: str  # the path, or the whole URL when used as a proxy
    authorization: str | None
    body: bytes


class Recorder:
    """A loopback HTTP(S) server answering every request with `status`, recording what it
    got. As a forward proxy it records the request and forwards nothing."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, status: int = 401,
                 location: str | None = None, tls: ssl.SSLContext | None = None) -> None:
        self.status, self.location = status, location
        self.seen: list[Seen] = []
        self.lock = threading.Lock()
        self._server = _Server((host, port), _Handler)
        self._server.recorder = self
        if tls is not None:
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
        self.scheme = "https" if tls is not None else "http"
        self.host, self.port = host, self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def origin(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    def authorizations(self) -> list[str | None]:
        with self.lock:
            return [seen.authorization for seen in self.seen]

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def recorders() -> Iterator[Callable[..., Recorder]]:
    started: list[Recorder] = []

    def start(*args: Any, **options: Any) -> Recorder:
        started.append(Recorder(*args, **options))
        return started[-1]

    yield start
    for recorder in started:
        recorder.stop()


# -- one way to send a request, whichever the client ----------------------------------------

Send = Callable[..., Any]  # (method, url, *, headers=None, body=None, redirects=False)


def _content(body: Any) -> Any:
    return body() if callable(body) else body  # a callable: a streamed body, made afresh


@contextmanager
def sync_client(kind: str, auth_options: dict[str, Any], tls: Tls,
                proxy: str | None) -> Iterator[Send]:
    if kind == "httpx":
        mounts = {url: httpx.HTTPTransport(proxy=proxy) for url in ROUTED} if proxy else {}
        verify = ssl.create_default_context(cafile=tls.ca_file)
        with httpx.Client(auth=vm_token.VideoManagerAuth(**auth_options), verify=verify,
                          mounts=mounts, timeout=15) as client:
            def send(method: str, url: str, *, headers: Any = None, body: Any = None,
                     redirects: bool = False) -> httpx.Response:
                return client.request(method, url, headers=headers, content=_content(body),
                                      follow_redirects=redirects)
            yield send
    else:
        with requests.Session() as session:
            session.auth = vm_token.RequestsAuth(**auth_options)
            if proxy:
                session.proxies = {url: proxy for url in ROUTED}

            def send_requests(method: str, url: str, *, headers: Any = None, body: Any = None,
                              redirects: bool = False) -> requests.Response:
                # verify= here: REQUESTS_CA_BUNDLE in the environment beats session.verify.
                return session.request(method, url, headers=headers, data=_content(body),
                                       allow_redirects=redirects, timeout=15,
                                       verify=tls.ca_file)
            yield send_requests


async def run_with(kind: str, scenario: Callable[[Send], None], tls: Tls,
                   proxy: str | None = None, **auth_options: Any) -> None:
    """Run `scenario(send)` in a thread, `send` going through a client of `kind`."""
    with trio.fail_after(60):
        if kind != "httpx-async":
            def in_thread() -> None:
                with sync_client(kind, auth_options, tls, proxy) as send:
                    scenario(send)
            await trio.to_thread.run_sync(in_thread)
            return
        mounts = ({url: httpx.AsyncHTTPTransport(proxy=proxy) for url in ROUTED} if proxy
                  else {})
        verify = ssl.create_default_context(cafile=tls.ca_file)
        async with httpx.AsyncClient(auth=vm_token.VideoManagerAuth(**auth_options),
                                     verify=verify, mounts=mounts, timeout=15) as client:
            def send(method: str, url: str, *, headers: Any = None, body: Any = None,
                     redirects: bool = False) -> httpx.Response:
                content = _content(body)
                if content is not None and not isinstance(content, bytes):
                    chunks = list(content)

                    async def stream() -> Any:
                        for chunk in chunks:
                            yield chunk
                    content = stream()
                return trio.from_thread.run(partial(
                    client.request, method, url, headers=headers, content=content,
                    follow_redirects=redirects))
            await trio.to_thread.run_sync(scenario, send)


def held_token(daemon: Any) -> str:
    with vm_token.Client(daemon.socket) as client:
        return client.get_token("1001").access_token


# -- the tests -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_a_foreign_host_never_gets_the_token_and_its_401_changes_nothing(
        kind, make_standin, start_daemon, recorders, tls):
    standin = make_standin()
    daemon = start_daemon(standin, env={"VM_TOKEN_CREDENTIAL_HOSTS": REMOTE_HOST})
    api_port = urlsplit(standin.url).port
    evil = recorders("127.0.0.1")                  # the API's address, another port
    twin = recorders("127.0.0.2", api_port)        # the API's port, another address
    evil_tls = recorders("127.0.0.2", tls=tls.server)
    proxy = recorders("127.0.0.1")                 # for hosts that do not resolve
    foreign = [
        f"{evil.origin}/v1/vms/1001/videos",
        f"http://localhost:{evil.port}/v1/vms",    # loopback, but no profile's host
        f"{twin.origin}/v1/vms/1001/videos",
        f"{evil_tls.origin}/v1/vms/1001/videos",   # https changes nothing
        f"http://{REMOTE_HOST}/v1/vms/1001/videos",  # a profile's host, plain http, remote
        NOBODY,
    ]

    def scenario(send: Send) -> None:
        assert send("GET", f"{standin.url}/1001/videos").status_code == 200
        token, counts = held_token(daemon), dict(standin.counts)
        for url in foreign:
            for method, body in (("GET", None), ("POST", b"{}")):
                response = send(method, url, body=body)
                assert response.status_code == 401, url  # as the host answered, no retry
                assert not response.history
        # An Authorization the caller set on a foreign request is theirs: it stays.
        send("GET", f"{evil.origin}/theirs", headers={"Authorization": "Basic bWU6cHc="})
        # On the API, the auth's token replaces it (that is what the auth is for).
        mine = send("GET", f"{standin.url}/1001/videos", headers={"Authorization": "Bearer x"})
        assert mine.status_code == 200
        assert held_token(daemon) == token, "a 401 above was reported"
        assert {k: standin.counts[k] for k in ("login", "refresh")} == \
            {k: counts.get(k, 0) for k in ("login", "refresh")}

    await run_with(kind, scenario, tls, proxy=proxy.origin, socket=daemon.socket)
    assert evil.authorizations() == [None] * 4 + ["Basic bWU6cHc="]
    assert twin.authorizations() == evil_tls.authorizations() == [None] * 2
    assert proxy.authorizations() == [None] * 4
    assert [seen.target for seen in proxy.seen] == [
        f"http://{REMOTE_HOST}/v1/vms/1001/videos"] * 2 + [NOBODY] * 2
    assert "reported as rejected" not in daemon.log()


@pytest.mark.parametrize("kind", KINDS)
async def test_an_upload_to_the_location_the_api_names_works_without_our_token(
        kind, standin, start_daemon, recorders, tls):
    daemon = start_daemon(standin)
    asset_in = recorders("127.0.0.2", status=201)  # plays asset-in.video-cdn.net
    standin.upload_origin = asset_in.origin

    def scenario(send: Send) -> None:
        created = send("POST", f"{standin.url}/1001/videos", body=b'{"title": "t"}')
        assert created.status_code == 201
        location = created.headers["Location"]
        assert location.startswith(f"{asset_in.origin}/upload/") and "token=" in location
        assert send("PUT", location, body=b"a" * 100_000).status_code == 201
        assert send("POST", location, body=lambda: iter([b"b" * 1000] * 10)).status_code == 201

    await run_with(kind, scenario, tls, socket=daemon.socket)
    assert [(seen.method, seen.authorization, len(seen.body)) for seen in asset_in.seen] == [
        ("PUT", None, 100_000), ("POST", None, 10_000)]
    # Each went to the URL the API named, with the upload's own token in it.
    assert asset_in.seen[0].target == asset_in.seen[1].target
    assert asset_in.seen[0].target.startswith("/upload/") and "token=" in asset_in.seen[0].target


@pytest.mark.parametrize("kind", KINDS)
async def test_a_401_after_a_redirect_to_another_host_is_not_ours(
        kind, make_standin, start_daemon, recorders, tls):
    """A host of ours redirects to a foreign one, which answers 401: the token did not go
    there, so it is not reported, and no retry takes it there."""
    standin = make_standin()
    evil = recorders("127.0.0.1")
    ours = recorders("127.0.0.2", status=307, location=f"{evil.origin}/v1/vms/1001/videos")
    daemon = start_daemon(standin, env={"VM_TOKEN_CREDENTIAL_HOSTS": f"127.0.0.2:{ours.port}"})

    def scenario(send: Send) -> None:
        token, counts = held_token(daemon), dict(standin.counts)
        response = send("GET", f"{ours.origin}/v1/vms/1001/videos", redirects=True)
        assert response.status_code == 401
        assert held_token(daemon) == token, "the 401 was reported"
        assert standin.counts["refresh"] == counts.get("refresh", 0)

    await run_with(kind, scenario, tls, socket=daemon.socket)
    assert ours.authorizations() == [f"Bearer {held_token(daemon)}"]  # a host of ours
    assert evil.authorizations() == [None]


async def test_a_named_profile_gives_no_token_to_a_foreign_host(standin, start_daemon,
                                                                recorders, tls):
    daemon = start_daemon(standin)
    evil = recorders("127.0.0.1")

    def scenario(send: Send) -> None:
        assert send("GET", f"{standin.url}/1002/videos").status_code == 200
        assert send("GET", f"{evil.origin}/v1/vms/1002/videos").status_code == 401

    await run_with("httpx", scenario, tls, socket=daemon.socket, profile="default")
    assert evil.authorizations() == [None]
