"""A VideoManager API whose answers a test scripts and which records exactly what it got.

For black-box tests of what `vm-tokend proxy` sends upstream and passes back: h11 as the
server (no hand-written parser), plain threads and blocking sockets on 127.0.0.1, port 0.
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
raised in a thread.
"""

from __future__ import annotations

import base64
import itertools
import json
import secrets
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import h11

__all__ = ["Answer", "FakeApi", "Seen"]

BASE_PATH = "/v1/vms"
RECEIVE = 65536
# How often a blocked accept() or recv() looks whether the API is being stopped.
POLL = 0.1


@dataclass(frozen=True)
class Seen:
    """One request the API got, as it came on the wire (h11's view of it)."""

    method: str
    target: str
    headers: list[tuple[bytes, bytes]]  # raw names (their case as sent), in order
    body: bytes
    connection: int  # which upstream connection (1, 2, …) it came on

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
    each: with `Transfer-Encoding: chunked` among the headers, one chunk each). `raw`, if
    given, is written to the socket as it is instead (for lies h11 will not tell); the
    connection then goes on with whatever comes next."""

    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: list[bytes] = field(default_factory=list)
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
                 token_lifetime: int = 300) -> None:
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
        self.default: Script = json_answer({"ok": True})
        self._script: deque[Script] = deque()
        self._refresh_tokens: set[str] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._open: set[socket.socket] = set()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(POLL)
        self.port: int = self._listener.getsockname()[1]
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}{BASE_PATH}"
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
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self._listener.close()

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
        sock.settimeout(POLL)
        conn = h11.Connection(h11.SERVER)
        try:
            while not self._stopping.is_set():
                event = self._next(sock, conn)
                if not isinstance(event, h11.Request):
                    return  # closed (or stopping)
                seen = self._read_request(sock, conn, event, number)
                if seen is None:
                    return
                answer = self._answer_for(seen)
                if answer.raw is not None:
                    sock.sendall(answer.raw)
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
                self.errors.append(f"connection {number}: {type(exc).__name__}: {exc}")
        finally:
            with self._lock:
                self._open.discard(sock)
            sock.close()

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

    def _read_request(self, sock: socket.socket, conn: h11.Connection, request: h11.Request,
                      number: int) -> Seen | None:
        if conn.they_are_waiting_for_100_continue:
            sock.sendall(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
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
                    list(request.headers.raw_items()), bytes(body), number)

    def _send(self, sock: socket.socket, conn: h11.Connection, answer: Answer) -> None:
        out = conn.send(h11.Response(status_code=answer.status, headers=answer.headers))
        for piece in answer.body:
            out += conn.send(h11.Data(data=piece))
        out += conn.send(h11.EndOfMessage())
        sock.sendall(out)

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
