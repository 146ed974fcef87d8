"""A VideoManager API whose answers a test scripts and which records exactly what it got.

For black-box tests of what `vm-tokend proxy` sends upstream and passes back: h11 as the
server (no hand-written parser), plain threads and blocking sockets on 127.0.0.1, port 0
(another loopback address with `host`; https with `tls`, a server context: each accepted
connection does its handshake in its own thread, and one that fails is kept in `errors`).
It implements just enough of the legacy login for vm-tokend to log in against it:

    POST {url}/auth/login          {"username","password"} -> accessToken, refreshToken,
                                   videoManagerList, validForVideoManager
    POST {url}/auth/refresh/{vm}   {"refreshToken"}        -> accessToken for {vm}

Access tokens are unsigned-but-well-formed JWTs with `iat` and `exp` (vm-tokend reads the
lifetime from them, and verifies nothing), each unique (a `jti`), listed in `issued` in
the order they were handed out. Every other request under {url} is recorded (`seen`, a
Seen each: method, target, the raw header list in order, the body bytes, its framing, and
which upstream connection it came on) and answered with the next scripted Answer (`script`)
or, when none is queued, with `default`. Paths outside {url} get a 404 and go to
`elsewhere`. Errors while serving (a peer that breaks HTTP) are kept in `errors`, never
raised in a thread. An Answer's body may be a generator: it is then sent piece by piece as
it is made (a download of any size, never held whole). `close_idle()` closes the
connections waiting for their next request, as a server's keep-alive timeout does.
"""

from __future__ import annotations

import base64
import itertools
import json
import secrets
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import h11

__all__ = ["Answer", "FakeApi", "Seen"]

BASE_PATH = "/v1/vms"
RECEIVE = 65536
# How often a blocked accept(), recv() or send() looks whether the API is being stopped.
POLL = 0.1
# A TLS handshake gets this long (it is not polled: a client needs more than POLL for it).
HANDSHAKE_TIMEOUT = 10.0


@dataclass(frozen=True)
class Seen:
    """One request the API got, as it came on the wire (h11's view of it)."""

    method: str
    target: str
    headers: list[tuple[bytes, bytes]]  # raw names (their case as sent), in order
    body: bytes
    connection: int  # which upstream connection (1, 2, …) it came on
    tls: str | None = None  # the connection's TLS version ("TLSv1.3"), None: plain http

    def all(self, name: str) -> list[str]:
        """Every value of header `name` (any case), in order."""
        wanted = name.lower().encode()
        return [value.decode("latin-1") for key, value in self.headers
                if key.lower() == wanted]

    def one(self, name: str) -> str | None:
        values = self.all(name)
        assert len(values) <= 1, (name, values)
        return values[0] if values else None

    @property
    def names(self) -> list[str]:
        return [key.decode("latin-1").lower() for key, _ in self.headers]

    @property
    def chunked(self) -> bool:
        return any(v.strip().lower() == "chunked" for v in self.all("transfer-encoding"))

    @property
    def content_length(self) -> int | None:
        value = self.one("content-length")
        return int(value) if value is not None else None

    @property
    def token(self) -> str | None:
        """The bearer token of the (one) Authorization header, None without one."""
        value = self.one("authorization")
        if value is None:
            return None
        scheme, _, token = value.partition(" ")
        assert scheme == "Bearer", value
        return token


@dataclass
class Answer:
    """A scripted answer: status, raw header list, and the body as pieces (one h11 Data
    each: with `Transfer-Encoding: chunked` among the headers, one chunk each). A list is
    written with the head in one write; any other iterable (a generator) piece by piece, as
    it is made. `raw`, if given, is written to the socket as it is instead (for lies h11
    will not tell); the connection then goes on with whatever comes next."""

    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: Iterable[bytes] = field(default_factory=list)
    raw: bytes | None = None
    close: bool = False  # close the connection after this answer


Script = Answer | Callable[[Seen], Answer]


def jwt(claims: dict[str, object]) -> str:
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = b64(json.dumps(claims, separators=(",", ":")).encode())
    return f"{header}.{payload}.{b64(secrets.token_bytes(32))}"


def json_answer(value: object, status: int = 200,
                headers: list[tuple[str, str]] | None = None) -> Answer:
    body = json.dumps(value).encode()
    return Answer(status, [("Content-Type", "application/json"),
                           ("Content-Length", str(len(body))), *(headers or [])], [body])


class FakeApi:
    """The API. Thread-safe: tests script it and read what it saw while it serves."""

    def __init__(self, *, username: str = "proxy-user", password: str = "proxy-pw",
                 videomanagers: tuple[tuple[int, str], ...] = ((1001, "Marketing"),),
                 token_lifetime: int = 300, host: str = "127.0.0.1",
                 tls: ssl.SSLContext | None = None) -> None:
        self.username, self.password = username, password
        self.users = {username: password}  # more may be added: one per profile on this API
        self.videomanagers = videomanagers
        self.token_lifetime = token_lifetime
        self.seen: list[Seen] = []
        self.auth: list[str] = []  # "login" / "refresh/{vm}", in order
        self.issued: list[str] = []  # access tokens, in the order handed out
        self.elsewhere: list[Seen] = []
        self.errors: list[str] = []
        self.connections = 0
        self.tls = tls  # for connections accepted from now on: a test may swap it
        self.default: Script = json_answer({"ok": True})
        self._script: deque[Script] = deque()
        self._refresh_tokens: set[str] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._open: set[socket.socket] = set()
        self._idle: dict[socket.socket, int] = {}  # waiting for their next request
        self._closed_idle: set[socket.socket] = set()  # closed by close_idle(): no error
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.create_server((host, 0), family=family)
        self._listener.settimeout(POLL)
        self.port: int = self._listener.getsockname()[1]
        self.host = f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"
        self.url = f"{'https' if tls is not None else 'http'}://{self.host}{BASE_PATH}"
        self._thread = threading.Thread(target=self._accept, daemon=True)

    # -- for tests --------------------------------------------------------------------

    def start(self) -> FakeApi:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)
        with self._lock:
            for sock in list(self._open):
                _shutdown(sock)
        self._listener.close()

    def idle(self) -> set[int]:
        """The connections (their numbers) waiting for their next request."""
        with self._lock:
            return set(self._idle.values())

    def close_idle(self) -> set[int]:
        """Close every connection that waits for its next request (not one in the middle
        of an exchange), as a server does after its keep-alive timeout; their numbers."""
        with self._lock:
            idle, self._idle = self._idle, {}
            self._closed_idle |= set(idle)
        for sock in idle:
            _shutdown(sock)  # its thread then sees the end, and closes it
        return set(idle.values())

    def script(self, *answers: Script) -> None:
        """Answer the next API requests with these, in order (then with `default`)."""
        with self._lock:
            self._script.extend(answers)

    def requests(self) -> list[Seen]:
        with self._lock:
            return list(self.seen)

    def tokens(self) -> list[str]:
        with self._lock:
            return list(self.issued)

    def logins(self) -> list[str]:
        with self._lock:
            return list(self.auth)

    # -- serving ----------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.connections += 1
                number = self.connections
                self._open.add(sock)
            threading.Thread(target=self._serve, args=(sock, number), daemon=True).start()

    def _serve(self, sock: socket.socket, number: int) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            sock = self._secure(sock)
            sock.settimeout(POLL)
            while not self._stopping.is_set():
                with self._lock:
                    if conn.their_state is h11.IDLE and not conn.trailing_data[0]:
                        self._idle[sock] = number
                event = self._next(sock, conn)
                with self._lock:
                    self._idle.pop(sock, None)
                if not isinstance(event, h11.Request):
                    return  # closed (or stopping)
                seen = self._read_request(sock, conn, event, number)
                if seen is None:
                    return
                answer = self._answer_for(seen)
                if answer.raw is not None:
                    self._send_all(sock, answer.raw)
                    if answer.close:
                        return
                    # h11 did not send it, so h11 is out of step: a fresh one for what
                    # comes next, fed what it had already received
                    leftover, closed = conn.trailing_data
                    conn = h11.Connection(h11.SERVER)
                    conn.receive_data(leftover)
                    if closed:
                        conn.receive_data(b"")
                    continue
                self._send(sock, conn, answer)
                if answer.close or conn.our_state is h11.MUST_CLOSE:
                    return
                if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                    conn.start_next_cycle()
                else:
                    return
        except (h11.ProtocolError, OSError) as exc:
            with self._lock:
                if sock not in self._closed_idle:  # not an error: we closed it
                    self.errors.append(f"connection {number}: {type(exc).__name__}: {exc}")
        finally:
            with self._lock:
                self._open.discard(sock)
                self._idle.pop(sock, None)
                self._closed_idle.discard(sock)
            sock.close()

    def _secure(self, sock: socket.socket) -> socket.socket:
        """The connection as it is (http), or after the TLS handshake (https)."""
        with self._lock:
            context = self.tls
        if context is None:
            return sock
        sock.settimeout(HANDSHAKE_TIMEOUT)
        secured = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        with self._lock:  # stop() and close_idle() see the socket that is served
            self._open.discard(sock)
            self._open.add(secured)
        try:
            secured.do_handshake()
        except OSError as exc:  # ssl.SSLError is one: the client refused our certificate
            with self._lock:
                self._open.discard(secured)
            secured.close()
            raise OSError(f"TLS handshake: {exc}") from exc
        return secured

    def _next(self, sock: socket.socket, conn: h11.Connection) -> h11.Event | None:
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                assert isinstance(event, h11.Event)
                return event
            data = self._receive(sock)
            if data is None:
                return None
            conn.receive_data(data)

    def _receive(self, sock: socket.socket) -> bytes | None:
        while not self._stopping.is_set():
            try:
                return sock.recv(RECEIVE)
            except TimeoutError:
                continue
        return None

    def _send_all(self, sock: socket.socket, data: bytes) -> None:
        """sendall() for as long as the peer takes to read (sendall's own timeout is for
        the whole write), until the API is stopped. A TLS write that timed out is retried
        with the same bytes, as OpenSSL wants."""
        view = memoryview(data)
        while view:
            try:
                view = view[sock.send(view):]
            except TimeoutError:
                if self._stopping.is_set():
                    raise OSError("stopping") from None

    def _read_request(self, sock: socket.socket, conn: h11.Connection, request: h11.Request,
                      number: int) -> Seen | None:
        if conn.they_are_waiting_for_100_continue:
            self._send_all(sock, conn.send(h11.InformationalResponse(status_code=100,
                                                                     headers=[])))
        body = bytearray()
        while True:
            event = self._next(sock, conn)
            if isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            else:  # closed in the middle of a body
                with self._lock:
                    self.errors.append(f"connection {number}: {event!r} inside a request")
                return None
        return Seen(request.method.decode(), request.target.decode("latin-1"),
                    list(request.headers.raw_items()), bytes(body), number,
                    sock.version() if isinstance(sock, ssl.SSLSocket) else None)

    def _send(self, sock: socket.socket, conn: h11.Connection, answer: Answer) -> None:
        out = conn.send(h11.Response(status_code=answer.status, headers=answer.headers))
        assert out is not None
        whole = isinstance(answer.body, list | tuple)  # else streamed, piece by piece
        for piece in answer.body:
            data = conn.send(h11.Data(data=piece))
            assert data is not None
            if whole:
                out += data
            else:
                self._send_all(sock, out + data)
                out = b""
        end = conn.send(h11.EndOfMessage())
        assert end is not None
        self._send_all(sock, out + end)

    # -- what it answers --------------------------------------------------------------

    def _answer_for(self, seen: Seen) -> Answer:
        path = seen.target.split("?", 1)[0]
        if path == f"{BASE_PATH}/auth/login" and seen.method == "POST":
            return self._login(seen)
        if path.startswith(f"{BASE_PATH}/auth/refresh/") and seen.method == "POST":
            return self._refresh(seen, path.rsplit("/", 1)[1])
        if not (path == BASE_PATH or path.startswith(BASE_PATH + "/")):
            with self._lock:
                self.elsewhere.append(seen)
            return json_answer({"error": "not found"}, 404)
        with self._lock:
            self.seen.append(seen)
            script = self._script.popleft() if self._script else self.default
        return script(seen) if callable(script) else script

    def _token(self, kind: str, vm: str) -> str:
        now = int(time.time())
        token = jwt({"vm": vm, "typ": kind, "jti": secrets.token_hex(8),
                     "iat": now, "exp": now + self.token_lifetime})
        with self._lock:
            if kind == "access":
                self.issued.append(token)
            else:
                self._refresh_tokens.add(token)
        return token

    def _login(self, seen: Seen) -> Answer:
        with self._lock:
            self.auth.append("login")
        try:
            given = json.loads(seen.body)
        except ValueError:
            given = None
        if not isinstance(given, dict) or given.get("username") not in self.users \
                or self.users[given["username"]] != given.get("password"):
            return json_answer({"message": "bad credentials"}, 401)
        default = str(self.videomanagers[0][0])
        return json_answer({
            "accessToken": self._token("access", default),
            "refreshToken": self._token("refresh", default),
            "videoManagerList": [{"id": i, "name": n} for i, n in self.videomanagers],
            "validForVideoManager": self.videomanagers[0][0],
        })

    def _refresh(self, seen: Seen, vm: str) -> Answer:
        with self._lock:
            self.auth.append(f"refresh/{vm}")
            known = self._refresh_tokens
        try:
            given = json.loads(seen.body).get("refreshToken")
        except (ValueError, AttributeError):
            given = None
        if given not in known:
            return json_answer({"message": "bad refresh token"}, 401)
        return json_answer({"accessToken": self._token("access", vm),
                            "validForVideoManager": int(vm) if vm.isdigit() else vm})


def _shutdown(sock: socket.socket) -> None:
    """End a connection that another thread serves: its recv() sees the end at once. Of
    the socket itself, beneath TLS (ssl's own shutdown() would drop the TLS state under
    the thread that uses it)."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


def wait_for(check: Callable[[], object], seconds: float = 10.0, what: str = "") -> object:
    """Poll `check` until it returns something true; AssertionError after `seconds`."""
    deadline = time.monotonic() + seconds
    for _ in itertools.count():
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what or check}"
        time.sleep(0.02)
    raise AssertionError("unreachable")


def daemon_env(api: FakeApi) -> dict[str, str]:
    """The settings that point vm-tokend at `api`, as conftest does for the stand-in."""
    return {"VM_TOKEN_API_URL": api.url, "VM_TOKEN_USERNAME": api.username,
            "VM_TOKEN_PASSWORD": api.password, "VM_TOKEN_AUTH": "legacy"}


def point_config_at(config: Path, api: FakeApi) -> None:
    """A config file that points vm-tokend at `api` alone (what a reload then reads)."""
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(f'api_url = "{api.url}"\nusername = "{api.username}"\n'
                      f'password = "{api.password}"\nauth = "legacy"\n')
