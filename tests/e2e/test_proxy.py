"""`vm-tokend proxy` with real clients (curl over its Unix socket) against the stand-in."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from standin.server import bulk_block
from tests.conftest import BIN, Daemon, clean_env
from tests.e2e.test_auth_hosts import Recorder
from tests.e2e.test_login_takeover import OTHER_UID, as_other_user

pytestmark = pytest.mark.timeout(60)


class Proxy:
    def __init__(self, proc: subprocess.Popen[bytes], socket: Path, log_path: Path) -> None:
        self.proc, self.socket, self.log_path = proc, socket, log_path
        self.port: int | None = None

    def tcp(self, *args: str, path: str = "/v1/vms") -> tuple[int, dict[str, str], bytes]:
        """One request to the --listen port with curl (status 0: no answer)."""
        done = subprocess.run(
            ["curl", "-sS", "-D", "-", "-o", "-", "--max-time", "10", *args,
             f"http://127.0.0.1:{self.port}{path}"],
            capture_output=True, timeout=20, check=False)
        return _parse(done.stdout)

    def curl(self, *args: str, host: str = "localhost", path: str = "/v1/vms"
             ) -> tuple[int, dict[str, str], bytes]:
        """(status, headers with lower-case names, body) of one request through the proxy."""
        done = subprocess.run(
            ["curl", "-sS", "--unix-socket", str(self.socket), "-D", "-", "-o", "-",
             *args, f"http://{host}{path}"],
            capture_output=True, timeout=20, check=True)
        return _parse(done.stdout)


def _parse(output: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = output.partition(b"\r\n\r\n")
    while head.startswith(b"HTTP/1.1 100"):
        head, _, body = body.partition(b"\r\n\r\n")
    if not head:
        return 0, {}, b""
    lines = head.decode().split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in
               (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


@pytest.fixture
def start_proxy(private_dir: Path) -> Iterator[Callable[[Daemon], Proxy]]:
    proxies: list[Proxy] = []

    def start(daemon: Daemon, *args: str) -> Proxy:
        socket = Path(daemon.env.get("VM_TOKEN_PROXY_SOCKET")
                      or private_dir / "vm-token" / "proxy")
        log_path = private_dir / "proxy.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [str(BIN / "vm-tokend"), "proxy", "--log-level", "debug", *args],
                env=daemon.env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        proxy = Proxy(proc, socket, log_path)
        proxies.append(proxy)
        deadline = time.monotonic() + 10
        while not socket.exists() or ("--listen" in args and proxy.port is None):
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            found = re.search(r"also serving on \S+ port (\d+)", log_path.read_text())
            proxy.port = int(found[1]) if found else None
            time.sleep(0.02)
        return proxy

    yield start
    for proxy in proxies:
        if proxy.proc.poll() is None:
            proxy.proc.terminate()
            proxy.proc.wait(timeout=10)


def test_curl_gets_the_api_through_the_proxy_with_the_daemons_token(
        standin, start_daemon, start_proxy):
    daemon = start_daemon(standin)
    proxy = start_proxy(daemon)
    # the client's own Authorization is replaced by the daemon's token
    status, headers, body = proxy.curl("-H", "Authorization: Bearer not-a-token")
    assert status == 200, body
    assert "x-vm-token-error" not in headers
    listed = json.loads(body)
    assert {vm["name"] for vm in listed} >= {"Marketing", "Sales"}
    status, _, body = proxy.curl(path="/v1/vms/1001/videos")
    assert status == 200, body
    assert standin.counts["api_rejected"] == 0


def test_a_post_body_reaches_the_api(standin, start_daemon, start_proxy):
    daemon = start_daemon(standin)
    proxy = start_proxy(daemon)
    status, _, body = proxy.curl("-X", "POST", "-H", "Content-Type: application/json",
                                 "--data", json.dumps({"title": "a video"}),
                                 path="/v1/vms/1001/videos")
    assert status == 201, body


def test_what_the_proxy_will_not_forward_it_answers_itself(standin, start_daemon,
                                                           start_proxy):
    daemon = start_daemon(standin)
    proxy = start_proxy(daemon)
    before = standin.counts["api"]
    status, headers, body = proxy.curl(path="/auth/login")
    assert (status, headers["x-vm-token-error"]) == (404, "not_found")
    assert json.loads(body)["error"] == "not_found"
    status, headers, body = proxy.curl(host="elsewhere")
    assert (status, headers["x-vm-token-error"]) == (421, "unknown_profile")
    assert "names no profile" in json.loads(body)["message"]
    status, headers, _ = proxy.curl("--path-as-is", path="/v1/vms/../auth/login")
    assert status == 404
    assert standin.counts["api"] == before  # none of them reached the API


def test_a_refused_token_is_replaced_and_a_small_request_replayed_once(
        standin, start_daemon, start_proxy):
    daemon = start_daemon(standin)
    proxy = start_proxy(daemon)
    assert proxy.curl(path="/v1/vms/1001/videos")[0] == 200  # the daemon holds a token
    standin.revoke_access_tokens()  # the API refuses it from now on; the daemon does not know
    status, headers, body = proxy.curl("-X", "POST", "--data", json.dumps({"title": "t"}),
                                       "-H", "Content-Type: application/json",
                                       path="/v1/vms/1001/videos")
    assert status == 201, body
    assert "x-vm-token-replaced" not in headers
    assert standin.counts["api_rejected"] == 1  # refused once, replayed with a fresh one


def test_a_refused_token_on_a_long_body_comes_back_marked_and_the_retry_succeeds(
        standin, start_daemon, start_proxy, tmp_path):
    daemon = start_daemon(standin)
    proxy = start_proxy(daemon)
    assert proxy.curl(path="/v1/vms/1001/videos")[0] == 200
    standin.revoke_access_tokens()
    upload = tmp_path / "upload.bin"
    upload.write_bytes(b"v" * (2 * 1024 * 1024))  # past what the proxy keeps for a replay
    status, headers, _ = proxy.curl("-X", "POST", "--data-binary", f"@{upload}",
                                    path="/v1/vms/1001/videos")
    assert (status, headers.get("x-vm-token-replaced")) == (401, "1")
    status, _, body = proxy.curl("-X", "POST", "--data-binary", f"@{upload}",
                                 path="/v1/vms/1001/videos")
    assert status == 201, body
    assert standin.counts["api_rejected"] == 1


def test_the_tcp_port_serves_our_uid_with_its_own_host_and_no_browser(
        standin, start_daemon, start_proxy):
    daemon = start_daemon(standin)
    proxy = start_proxy(daemon, "--listen", "127.0.0.1:0")
    before = standin.counts["api"]
    status, headers, body = proxy.tcp()
    assert status == 200, body
    # DNS rebinding: a name that resolves here is still not this listener's own
    status, headers, body = proxy.tcp("-H", "Host: evil.example")
    assert (status, headers["x-vm-token-error"]) == (421, "bad_request")
    # a web page's request (fetch sends Origin; navigation sends Sec-Fetch-Site)
    status, headers, _ = proxy.tcp("-H", "Origin: http://evil.example")
    assert (status, headers["x-vm-token-error"]) == (403, "forbidden")
    assert "access-control-allow-origin" not in headers
    status, _, _ = proxy.tcp("-H", "Sec-Fetch-Site: cross-site")
    assert status == 403
    assert proxy.tcp("-H", "Sec-Fetch-Site: none")[0] == 200  # typed into the address bar
    # another local user gets no answer at all
    assert as_other_user(f"http://127.0.0.1:{proxy.port}/v1/vms") == 0
    assert standin.counts["api"] == before + 2
    assert "refused a connection from uid 65534" in proxy.log_path.read_text()


def test_listen_takes_only_a_loopback_address(start_daemon, standin, private_dir):
    daemon = start_daemon(standin)
    for bad in ("0.0.0.0:8181", "192.0.2.1:8181", "localhost:8181", "127.0.0.1"):
        done = subprocess.run([str(BIN / "vm-tokend"), "proxy", "--listen", bad],
                              env=daemon.env, capture_output=True, text=True, timeout=20,
                              check=False)
        assert done.returncode == 2, (bad, done.stderr)
        assert len(done.stderr.splitlines()) == 1 and "--listen" in done.stderr, done.stderr


def test_a_listen_port_in_use_is_one_line_and_exit_2(private_dir):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        done = subprocess.run([str(BIN / "vm-tokend"), "proxy", "--listen",
                               f"127.0.0.1:{port}"], env=clean_env(private_dir),
                              capture_output=True, text=True, timeout=20, check=False)
    assert (done.returncode, done.stderr) == (
        2, f"vm-tokend proxy: cannot listen on 127.0.0.1:{port}: Address already in use\n")
    assert not (private_dir / "vm-token" / "proxy").exists()


# A client of another uid, on a Unix socket: what it could do, and what it got back.
OTHER_CLIENT = r"""
import socket, sys
sock = socket.socket(socket.AF_UNIX)
try:
    sock.connect(sys.argv[1])
except PermissionError:
    sys.exit(print("not allowed to connect"))
got = b""
try:
    sock.sendall(b"GET /v1/vms HTTP/1.1\r\nHost: localhost\r\n\r\n")
    sock.settimeout(10)
    while chunk := sock.recv(65536):
        got += chunk
except (ConnectionResetError, BrokenPipeError):
    pass
print(f"connected, {len(got)} bytes back")
"""


def test_another_uid_on_the_unix_socket_is_refused_by_the_proxy_itself(
        standin, start_daemon, start_proxy):
    """The proxy makes its socket 0600 in a 0700 directory: another uid is stopped by the
    file system before the proxy's own check (SO_PEERCRED) is reached. Here the way is
    opened afterwards (the directories 0711, the socket 0666: a careless chmod, or a
    directory some tool made wider), and the proxy itself must close the connection
    without a byte, while our own uid is served on the same socket."""
    python = "/usr/bin/python3"  # the venv's may be in a directory closed to that uid
    if os.getuid() != 0 or shutil.which("setpriv") is None or not os.path.exists(python):
        if os.environ.get("CI") == "true":
            pytest.fail("CI must run the other-uid tests (root, setpriv, python3)")
        pytest.skip("needs root, setpriv and /usr/bin/python3 to act as another uid")
    # under /tmp itself: the pytest and private directories are closed to other uids
    opened = Path(tempfile.mkdtemp(prefix="vmt-open-"))
    try:
        daemon = start_daemon(standin)
        daemon.env["VM_TOKEN_PROXY_SOCKET"] = str(opened / "proxy" / "socket")
        proxy = start_proxy(daemon)

        def as_other_uid() -> str:
            done = subprocess.run(
                ["setpriv", f"--reuid={OTHER_UID}", f"--regid={OTHER_UID}", "--clear-groups",
                 python, "-c", OTHER_CLIENT, str(proxy.socket)],
                capture_output=True, text=True, timeout=20, check=True)
            return done.stdout.strip()

        # as the proxy made them, the directory stops that uid
        assert as_other_uid() == "not allowed to connect"
        for directory in (opened, proxy.socket.parent):
            directory.chmod(0o711)
        proxy.socket.chmod(0o666)
        before = standin.counts["api"]
        assert as_other_uid() == "connected, 0 bytes back"
        assert proxy.curl()[0] == 200  # our own uid, on the same socket
        assert standin.counts["api"] == before + 1
        assert f"refused a connection from uid {OTHER_UID}" in proxy.log_path.read_text()
    finally:
        shutil.rmtree(opened, ignore_errors=True)


ALLOWED_UID = 12345


def curl_as(uid: int, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "curl", "-sS",
         "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10", *args],
        capture_output=True, timeout=20, check=False)


def test_allow_uids_opens_the_socket_and_the_port_to_that_uid_only(
        standin, start_daemon, start_proxy, private_dir):
    if os.getuid() != 0 or shutil.which("setpriv") is None:
        if os.environ.get("CI"):
            pytest.fail("CI must run the other-uid tests (root, setpriv)")
        pytest.skip("needs root and setpriv to act as another uid")
    private_dir.chmod(0o711)
    daemon = start_daemon(standin)
    daemon.env["VM_TOKEN_PROXY_SOCKET"] = str(private_dir / "shared" / "proxy")
    daemon.env["VM_TOKEN_ALLOW_UIDS"] = str(ALLOWED_UID)
    proxy = start_proxy(daemon, "--listen", "127.0.0.1:0")
    assert proxy.socket.stat().st_mode & 0o777 == 0o666
    before = standin.counts["api"]
    for where in (["--unix-socket", str(proxy.socket), "http://localhost/v1/vms"],
                  [f"http://127.0.0.1:{proxy.port}/v1/vms"]):
        allowed = curl_as(ALLOWED_UID, *where)
        assert allowed.stdout == b"200", allowed.stderr
        refused = curl_as(OTHER_UID, *where)
        # no answer: closed after the connect (52, 56), or as curl connected (7)
        assert refused.stdout == b"000" and refused.returncode in (7, 52, 56), refused
    assert standin.counts["api"] == before + 2
    assert standin.counts["api_rejected"] == 0

GIB = 1 << 30


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@pytest.mark.timeout(180)
def test_a_gigabyte_each_way_streams_through_in_bounded_memory(
        standin, start_daemon, start_proxy, tmp_path):
    daemon = start_daemon(standin)
    proxy = start_proxy(daemon)
    upload = tmp_path / "upload.bin"
    with upload.open("wb") as file:
        file.truncate(GIB)  # sparse: a gigabyte of zeros, no disk
    expected = hashlib.sha256()
    zeros = bytes(1 << 20)
    for _ in range(GIB >> 20):
        expected.update(zeros)
    status, _, body = proxy.curl("-T", str(upload), path="/v1/vms/_bulk/upload")
    assert status == 200, body
    assert json.loads(body) == {"bytes": GIB, "sha256": expected.hexdigest()}
    got, size = hashlib.sha256(), 0
    with subprocess.Popen(
            ["curl", "-sS", "--fail", "--unix-socket", str(proxy.socket),
             f"http://localhost/v1/vms/_bulk/download?bytes={GIB}"],
            stdout=subprocess.PIPE) as download:
        assert download.stdout is not None
        while chunk := download.stdout.read(1 << 20):
            got.update(chunk)
            size += len(chunk)
    assert download.returncode == 0
    block = bulk_block()
    want = hashlib.sha256()
    for _ in range(GIB // len(block)):
        want.update(block)
    assert (size, got.hexdigest()) == (GIB, want.hexdigest())
    peak = peak_rss_mib(proxy.proc.pid)
    print(f"proxy peak RSS after 1 GiB each way: {peak:.1f} MiB")
    assert peak < 80


_TOKEN = st.sampled_from([b"GET", b"POST", b"PUT", b"CONNECT", b"OPTIONS", b"G\x00T", b""])
_TARGET = st.sampled_from([b"/v1/vms", b"/v1/vms/1001/videos", b"http://evil.example/",
                           b"*", b"/../etc", b"/v1/vms?x=1", b"", b"/\xff", b"/v1/vms/%2e%2e"])
_VERSION = st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2", b"HTTP/1.1x", b""])
_HEADER = st.one_of(
    st.tuples(st.sampled_from([b"Host", b"Content-Length", b"Transfer-Encoding", b"Expect",
                               b"Connection", b"Origin", b"X"]),
              st.sampled_from([b"localhost", b"-1", b"5", b"99999999999", b"chunked",
                               b"100-continue", b"close", b"gzip, chunked", b"\x00", b""]))
    .map(lambda kv: kv[0] + b": " + kv[1]),
    st.binary(max_size=40),
)
_BODY = st.one_of(st.binary(max_size=200),
                  st.sampled_from([b"5\r\nhello\r\n0\r\n\r\n", b"5\r\nhel", b"zz\r\n",
                                   b"ffffffffffffffff\r\n", b"0\r\n"]))


@settings(max_examples=120, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=_TOKEN, target=_TARGET, version=_VERSION, headers=st.lists(_HEADER, max_size=6),
       body=_BODY, line_end=st.sampled_from([b"\r\n", b"\n"]))
def test_nothing_a_client_sends_stops_the_proxy(proxied, method, target, version, headers,
                                                body, line_end):
    proxy = proxied
    request = method + b" " + target + b" " + version + line_end
    request += b"".join(header + line_end for header in headers) + line_end + body
    answer = raw(proxy, request)
    if answer:
        assert answer.startswith(b"HTTP/1.1 "), answer[:100]
    assert proxy.proc.poll() is None, proxy.log_path.read_text()[-2000:]
    assert proxy.curl()[0] == 200  # and the next client is served


@pytest.fixture
def proxied(standin, start_daemon, start_proxy) -> Proxy:
    return start_proxy(start_daemon(standin))


NODE_CLIENT = r"""
const http = require("http");
const [socketPath, body] = process.argv.slice(1);
const request = http.request({socketPath, path: "/v1/vms/1001/videos", method: "POST",
    headers: {"Content-Type": "application/json", "Content-Length": Buffer.byteLength(body)}},
  (response) => {
    let text = "";
    response.on("data", (chunk) => { text += chunk; });
    response.on("end", () => {
      console.log(JSON.stringify({status: response.statusCode, body: text}));
    });
  });
request.on("error", (error) => { console.error(error.message); process.exit(1); });
request.end(body);
"""


def test_nodes_own_http_module_posts_through_the_socket(standin, start_daemon, start_proxy):
    node = shutil.which("node") or shutil.which("nodejs")
    if node is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI must run the Node client (.ci/run installs nodejs)")
        pytest.skip("needs nodejs")
    proxy = start_proxy(start_daemon(standin))
    done = subprocess.run([node, "-e", NODE_CLIENT, str(proxy.socket),
                           json.dumps({"title": "from node"})],
                          capture_output=True, text=True, timeout=30, check=True)
    answer = json.loads(done.stdout)
    assert answer["status"] == 201, answer


def test_python_clients_over_the_socket(standin, start_daemon, start_proxy):
    import http.client

    import httpx

    proxy = start_proxy(start_daemon(standin))
    transport = httpx.HTTPTransport(uds=str(proxy.socket))
    with httpx.Client(transport=transport, base_url="http://localhost") as client:
        assert client.get("/v1/vms").status_code == 200
        created = client.post("/v1/vms/1001/videos", json={"title": "from httpx"})
        assert created.status_code == 201, created.text

    class UnixConnection(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(str(proxy.socket))

    connection = UnixConnection("localhost")
    try:
        for _ in range(3):  # one keep-alive connection, three requests
            connection.request("GET", "/v1/vms")
            response = connection.getresponse()
            assert response.status == 200 and json.loads(response.read())
        first = connection.sock
        # a refusal of a request read whole keeps the connection; one with a body unread
        # closes it
        connection.request("GET", "/auth/login")
        response = connection.getresponse()
        assert (response.status, response.will_close) == (404, False)
        response.read()
        connection.request("GET", "/v1/vms")
        response = connection.getresponse()
        assert response.status == 200 and json.loads(response.read())
        assert connection.sock is first  # the same connection served all five
        connection.request("POST", "/auth/login", body=b"x" * 100_000)
        response = connection.getresponse()
        assert (response.status, response.will_close) == (404, True)
    finally:
        connection.close()


@pytest.fixture
def evil() -> Iterator[Recorder]:
    recorder = Recorder("127.0.0.2", status=200)
    yield recorder
    recorder.stop()


def test_a_redirect_goes_back_to_the_client_and_no_token_leaves_the_api(
        standin, start_daemon, start_proxy, evil):
    standin.upload_origin = evil.origin
    proxy = start_proxy(start_daemon(standin))
    for method in ("GET", "POST", "PUT"):
        status, headers, _ = proxy.curl("-X", method, "--data", "x",
                                        path="/v1/vms/_bulk/redirect")
        assert status == 307, (method, headers)
        assert headers["location"] == f"{evil.origin}/upload?token=upload-own"
    assert evil.seen == []  # followed by nobody: the client decides, with the upload's token


def test_health_is_answered_by_the_proxy_and_says_the_daemons_state(
        standin, start_daemon, start_proxy):
    daemon = start_daemon(standin)
    proxy = start_proxy(daemon)
    before = standin.counts["api"]
    status, headers, body = proxy.curl(path="/_vm-token/health")
    assert status == 200, body
    answer = json.loads(body)
    assert isinstance(answer.pop("tasks"), int)  # the proxy's own, to its own user only
    assert answer == {"daemon": "reachable", "profile": "default", "state": "logged_in"}
    assert standin.counts["api"] == before
    daemon.stop()
    status, headers, body = proxy.curl(path="/_vm-token/health")
    assert (status, headers["x-vm-token-error"]) == (502, "daemon_unreachable")
    status, headers, _ = proxy.curl()  # and a forwarded request says the same
    assert (status, headers["x-vm-token-error"]) == (502, "daemon_unreachable")


def test_tasks_in_status_and_health_come_and_go_with_the_connections(
        standin, start_daemon, start_proxy):
    """What `make soak` samples to see a leak: each side counts its own trio tasks, one
    more per open connection, and as many as before once the connections are gone."""
    daemon = start_daemon(standin)
    proxy = start_proxy(daemon)
    client = daemon.client()

    def proxy_tasks() -> int:
        return int(json.loads(proxy.curl(path="/_vm-token/health")[2])["tasks"])

    def settled(count: Callable[[], int]) -> int:
        """The count once it stopped moving (a closed connection's task ends soon after)."""
        last, deadline = count(), time.monotonic() + 10
        while time.monotonic() < deadline:
            time.sleep(0.2)
            now = count()
            if now == last:
                return now
            last = now
        raise AssertionError("the task count did not settle")

    proxy_before = settled(proxy_tasks)  # first: its own connection to the daemon stays
    daemon_before = settled(lambda: int(client.status()["tasks"]))
    opened = []
    for where in (daemon.socket, proxy.socket):
        for _ in range(10):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(where))
            opened.append(sock)
    try:
        assert settled(lambda: int(client.status()["tasks"])) >= daemon_before + 10
        assert settled(proxy_tasks) >= proxy_before + 10
    finally:
        for sock in opened:
            sock.close()
    assert settled(lambda: int(client.status()["tasks"])) == daemon_before
    assert settled(proxy_tasks) == proxy_before


def test_the_log_has_a_line_per_request_without_queries_or_header_values(
        standin, start_daemon, start_proxy):
    daemon = start_daemon(standin)
    proxy = start_proxy(daemon)
    token = daemon.client().get_token("1001").access_token
    proxy.curl("-H", "X-Secret: header-value-9f3", path="/v1/vms?query=secret-7c1")
    curl = subprocess.Popen(["curl", "-sS", "-o", "/dev/null", "--unix-socket",
                             str(proxy.socket), "http://localhost/v1/vms/1001/videos"])
    assert curl.wait(timeout=20) == 0
    deadline = time.monotonic() + 10  # the line is written once the answer is out
    while "GET '/v1/vms/1001/videos' -> 200" not in (log := proxy.log_path.read_text()):
        assert time.monotonic() < deadline, log
        time.sleep(0.02)
    assert "GET '/v1/vms' -> 200" in log
    # who asked: SO_PEERCRED's uid and pid, the very curl that did
    [line] = [line for line in log.splitlines() if "GET '/v1/vms/1001/videos'" in line]
    assert line.endswith(f", uid {os.getuid()}, pid {curl.pid}"), line
    # an absolute-form target is refused, and its userinfo and fragment are not logged
    assert raw(proxy, b"GET http://me:pass-51d@localhost/v1/vms#frag-0e2 HTTP/1.1\r\n"
                      b"Host: localhost\r\n\r\n").startswith(b"HTTP/1.1 400")
    raw(proxy, b"GET /v1/vms/1001#frag-77a HTTP/1.1\r\nHost: localhost\r\n\r\n")
    deadline = time.monotonic() + 10
    while not {"'(not a path)' -> 400", "'/v1/vms/1001' -> 400"} <= set(
            re.findall(r"'[^']*' -> \d+", log := proxy.log_path.read_text())):
        assert time.monotonic() < deadline, log
        time.sleep(0.02)
    for secret in ("secret-7c1", "header-value-9f3", token, standin.password, "pass-51d",
                   "frag-0e2", "frag-77a"):
        assert secret not in log


def test_sigterm_lets_a_download_in_flight_finish_then_exits(standin, start_daemon,
                                                            start_proxy):
    proxy = start_proxy(start_daemon(standin))
    size = 64 << 20
    with subprocess.Popen(
            ["curl", "-sS", "--fail", "--limit-rate", "32M", "--unix-socket",
             str(proxy.socket), f"http://localhost/v1/vms/_bulk/download?bytes={size}"],
            stdout=subprocess.PIPE) as download:
        assert download.stdout is not None
        first = download.stdout.read(1 << 20)  # under way
        proxy.proc.terminate()
        received = len(first)
        while chunk := download.stdout.read(1 << 20):
            received += len(chunk)
    assert (download.returncode, received) == (0, size)
    assert proxy.proc.wait(timeout=15) == 0
    assert not proxy.socket.exists()
    assert "draining and stopping" in proxy.log_path.read_text()


def test_an_api_silent_past_the_read_timeout_is_a_504_and_the_socket_is_a_setting(
        standin, start_daemon, start_proxy, private_dir):
    daemon = start_daemon(standin)
    elsewhere = private_dir / "vm-token" / "elsewhere"
    daemon.env["VM_TOKEN_PROXY_SOCKET"] = str(elsewhere)  # the setting, from the environment
    proxy = start_proxy(daemon, "--read-timeout", "0.5")
    assert proxy.socket == elsewhere
    status, headers, body = proxy.curl(path="/v1/vms/_bulk/slow?seconds=0.1")
    assert status == 200, body
    status, headers, body = proxy.curl(path="/v1/vms/_bulk/slow?seconds=3")
    assert (status, headers["x-vm-token-error"]) == (504, "upstream_timeout")


def test_a_client_idle_past_the_proxy_idle_timeout_setting_is_closed(
        standin, start_daemon, start_proxy):
    """`proxy_idle_timeout` (60 s unless set) reaches the proxy: at 1 s, a keep-alive
    client that asks nothing more is closed well within the 10 s this test waits."""
    daemon = start_daemon(standin)
    daemon.env["VM_TOKEN_PROXY_IDLE_TIMEOUT"] = "1"
    proxy = start_proxy(daemon)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(proxy.socket))
        sock.sendall(b"GET /v1/vms HTTP/1.1\r\nHost: localhost\r\n\r\n")
        sock.settimeout(10)  # the default idle timeout would leave it open for 60 s
        got = b""
        while chunk := sock.recv(65536):
            got += chunk
    assert got.startswith(b"HTTP/1.1 200 ") and got.count(b"HTTP/1.1 ") == 1, got[:200]


@pytest.mark.timeout(120)
def test_two_hundred_streams_at_once_and_a_stalled_reader_delays_nobody(
        standin, start_daemon, start_proxy):
    import httpx

    proxy = start_proxy(start_daemon(standin))
    size = 256 * 1024
    block = bulk_block()
    expected = (block * (size // len(block) + 1))[:size]

    async def main() -> list[bool]:
        transport = httpx.AsyncHTTPTransport(uds=str(proxy.socket))
        limits = httpx.Limits(max_connections=250)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost",
                                     limits=limits, timeout=60) as client:
            # one client asks for a large answer and never reads it
            stalled = await client.send(client.build_request(
                "GET", f"/v1/vms/_bulk/download?bytes={64 << 20}"), stream=True)
            results: list[bool] = []

            async def one() -> None:
                response = await client.get(f"/v1/vms/_bulk/download?bytes={size}")
                results.append(response.status_code == 200 and response.content == expected)

            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    for _ in range(200):
                        nursery.start_soon(one)
            await stalled.aclose()
            return results

    results = trio.run(main)
    assert len(results) == 200 and all(results)


def raw(proxy: Proxy, request: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(proxy.socket))
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


@pytest.mark.parametrize("target", [b"/v1/vms/..#", b"/v1/vms/..;/auth/login",
                                    b"/v1/vms/..\\auth", b"/v1/vms/%252e%252e/auth/login",
                                    b"/v1/vms/%2E%2E/auth"])
def test_no_target_climbs_out_of_the_api_root(proxied, standin, target):
    before = standin.counts["api"]
    answer = raw(proxied, b"GET " + target + b" HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert answer.startswith((b"HTTP/1.1 400", b"HTTP/1.1 404")), answer[:80]
    assert b"x-vm-token-error" in answer.lower()
    assert standin.counts["api"] == before


def test_a_request_framed_two_ways_is_refused_not_smuggled(proxied, standin):
    before = dict(standin.counts)
    answer = raw(proxied, b"POST /v1/vms/1001/videos HTTP/1.1\r\nHost: localhost\r\n"
                          b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
                          b"5\r\nAAAAA\r\n30\r\nGET /v1/vms/1001/videos HTTP/1.1\r\nHost: x\r\n\r\n"
                          b"\r\n0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400"), answer[:80]
    assert standin.counts == before  # nothing reached the API


def test_trace_is_refused_and_head_on_health_has_no_body(proxied, standin):
    before = standin.counts["api"]
    answer = raw(proxied, b"TRACE /v1/vms HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 405"), answer[:80]
    assert standin.counts["api"] == before
    answer = raw(proxied, b"HEAD /_vm-token/health HTTP/1.1\r\nHost: localhost\r\n\r\n"
                          b"GET /_vm-token/health HTTP/1.1\r\nHost: localhost\r\n\r\n")
    head, _, rest = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and rest.startswith(b"HTTP/1.1 200"), answer


def test_a_flood_of_refused_connections_is_two_log_lines(standin, start_daemon, start_proxy):
    """Another user connecting in a loop: the first refusal is logged, the rest counted
    in one line (once a minute, or when the proxy stops)."""
    proxy = start_proxy(start_daemon(standin), "--listen", "127.0.0.1:0")
    for _ in range(50):
        assert as_other_user(f"http://127.0.0.1:{proxy.port}/v1/vms") == 0
    assert proxy.tcp()[0] == 200  # and our own user is served meanwhile
    proxy.proc.terminate()
    assert proxy.proc.wait(timeout=15) == 0
    lines = [line for line in proxy.log_path.read_text().splitlines() if "refused" in line]
    assert len(lines) <= 2, lines
    assert "refused a connection from uid 65534" in lines[0]
    assert "refused 49 more connections from uid 65534" in lines[1]


def test_a_logout_counts_from_the_next_request(standin, start_daemon, start_proxy):
    daemon = start_daemon(standin)
    proxy = start_proxy(daemon)
    assert proxy.curl(path="/v1/vms/1001/videos")[0] == 200
    subprocess.run([str(BIN / "vm-token"), "logout"], env=daemon.env, check=True,
                   capture_output=True, timeout=20)
    status, headers, body = proxy.curl(path="/v1/vms/1001/videos")
    assert (status, headers.get("x-vm-token-error")) == (503, "not_logged_in"), body
    assert "vm-token login" in json.loads(body)["message"]


def test_a_client_done_sending_still_gets_its_answer(proxied, standin):
    # raw() shuts down its sending side after the request, as `nc -N` does: on a Unix
    # socket that is no hang-up, and the answer comes
    answer = raw(proxied, b"GET /v1/vms/_bulk/slow?seconds=0.5 HTTP/1.1\r\n"
                          b"Host: localhost\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert b'"slow": true' in answer


def test_the_tcp_port_carries_posts_uploads_and_downloads(standin, start_daemon, start_proxy,
                                                          tmp_path):
    proxy = start_proxy(start_daemon(standin), "--listen", "127.0.0.1:0")
    status, _, body = proxy.tcp("-X", "POST", "-H", "Content-Type: application/json",
                                "--data", json.dumps({"title": "over TCP"}),
                                path="/v1/vms/1001/videos")
    assert status == 201, body
    size = 64 << 20
    upload = tmp_path / "upload.bin"
    upload.write_bytes(bytes(range(256)) * (size // 256))
    # curl -T sends `Expect: 100-continue` for a body this long
    status, _, body = proxy.tcp("-T", str(upload), path="/v1/vms/_bulk/upload")
    assert status == 200, body
    assert json.loads(body) == {"bytes": size,
                                "sha256": hashlib.sha256(upload.read_bytes()).hexdigest()}
    status, _, body = proxy.tcp(path=f"/v1/vms/_bulk/download?bytes={size}")
    block = bulk_block()
    assert status == 200 and body == (block * (size // len(block)))
