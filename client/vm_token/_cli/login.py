"""`vm-token login --browser | --no-browser | --device`: a person logs in, no password.

vm-token owns the loopback listener and the browser; the daemon owns the flow's secrets
(state, nonce, PKCE verifier, device code) and does every exchange, so no token or
verifier passes through here. The listener is opened before anything else, so a fast
redirect is never lost (RFC 8252 7.3).

Other users of this machine can list every process's argv and connect to 127.0.0.1, so:

- the browser is started with a one-time address on the listener (a random path), which
  redirects once to the provider; the authorization URL, with its state, is in no argv.
  `--no-browser` prints the provider's URL instead (to the terminal, not into an argv): the
  user opens it on another machine, where our listener cannot be reached;
- on Linux the listener answers only connections of our own uid (`_loopback`); others get
  a 403 page and change nothing;
- a redirect without this login's state is answered 400 and the login goes on (so no one
  can end it with a forged `error=`); its `iss` (RFC 9207) goes to the daemon, which checks it.

Every wait has a deadline (`--timeout`; for a device login, the code's lifetime) and ends
early when the daemon says the flow was cancelled (a newer login). Whatever ends a login
early — Ctrl-C, the deadline, a failure — cancels it in the daemon on a fresh connection:
the first one may be in the middle of a request.
"""

from __future__ import annotations

import hmac
import html
import queue
import secrets
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from .. import _loopback, errors, protocol
from ..client import Client

__all__ = ["browser_login", "device_login"]

CALLBACK_PATH = "/callback"
# How long the browser's request waits for the daemon's exchange before it gets a page.
PAGE_WAIT = 60.0
# Timeouts of the requests around the wait: guesses, generous for a slow provider.
START_TIMEOUT = 30.0  # login_start: WebFinger, discovery, a device authorization
FINISH_TIMEOUT = 60.0  # login_finish: the code exchange, userinfo, the VideoManager list
CANCEL_TIMEOUT = 5.0
# The daemon ends a device flow when its code expires; vm-token, left to its default,
# waits this much longer so that it is the daemon that says so. A guess at a slow answer.
DEVICE_SLACK = 15.0
# The watcher's request outlives the login's deadline by this: the deadline ends it.
WATCH_SLACK = 60.0
# How long the listener waits for the request of a connection it will refuse (another
# user's): long enough to answer 403 to a client that sends at once. A guess.
REFUSED_TIMEOUT = 1.0

Event = tuple[str, Any]  # what ended a wait: (kind, payload); see _next


class LoginAborted(Exception):
    """The login did not succeed; the message is for the user, on one line."""


def _page(title: str, text: str) -> bytes:
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title></head>"
        "<body style='font-family: sans-serif; margin: 3em'>"
        f"<h1>{html.escape(title)}</h1><p>{html.escape(text)}</p></body></html>"
    ).encode()


def _params(query: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(query).items() if v}


def _same(a: str | None, b: str) -> bool:
    return a is not None and hmac.compare_digest(a.encode(), b.encode())


class _Listener(ThreadingHTTPServer):
    """The loopback listener: the browser's first stop, and where the provider sends it
    back. Its requests are handled in threads; what arrives goes to `events`."""

    daemon_threads = True

    def __init__(self, port: int, events: queue.Queue[Event]) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        self.events = events
        self.start_path = "/" + secrets.token_urlsafe(32)
        self.authorize_url = ""
        self.state = ""
        self.page: queue.Queue[tuple[int, bytes]] = queue.Queue(maxsize=1)
        self._lock = threading.Lock()
        self._started = False  # the one-time address was used
        self._answered = False  # an answer with this login's state was taken
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    @property
    def redirect_uri(self) -> str:
        return self.origin + CALLBACK_PATH

    @property
    def start_url(self) -> str:
        return self.origin + self.start_path

    def expect(self, authorize_url: str) -> None:
        """The login the daemon started: where to send the browser, and its state."""
        state = _params(urlsplit(authorize_url).query).get("state")
        if not state:
            raise LoginAborted("the daemon's login address carries no state: refusing it")
        self.authorize_url, self.state = authorize_url, state

    def take_start(self) -> str | None:
        """The provider's URL, the first time only."""
        with self._lock:
            if self._started or not self.authorize_url:
                return None
            self._started = True
            return self.authorize_url

    def take_answer(self) -> bool:
        """Whether this is the first answer with the login's state."""
        with self._lock:
            first, self._answered = not self._answered, True
            return first

    def __enter__(self) -> _Listener:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: _Listener
    timeout = 10  # a connection that sends nothing is dropped, not waited for
    refused = False

    def setup(self) -> None:
        super().setup()
        # Who it is, as soon as it connected (the kernel's table lists it while it is
        # connected); another user is not waited for: their connections cannot pile up.
        self.refused = not _loopback.serves_peer(self.connection)
        if self.refused:
            self.connection.settimeout(REFUSED_TIMEOUT)

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        if self.refused:
            # Another user of this machine: nothing they send is looked at.
            # A browser of our own user can look like another one when a relay owned by
            # root or another uid carries it here (WSL2's localhost, a published container
            # port): the page says what to do then.
            self._send(403, _page("Forbidden", "This login belongs to another user of this "
                                  "machine. If it is yours and your browser reaches this "
                                  "machine through a relay (WSL, a container's port), run "
                                  "vm-token login --no-browser instead."))
            return False
        return True

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        parts = urlsplit(self.path)
        server = self.server
        if hmac.compare_digest(parts.path.encode(), server.start_path.encode()):
            url = server.take_start()
            if url is None:
                self._send(410, _page("Already used", "This login address works once. Run "
                                      "`vm-token login` again if you need a new one."))
            else:
                self._send(302, b"", {"Location": url})
            return
        if parts.path != CALLBACK_PATH:
            self._send(404, _page("Not found", "This is vm-token's login listener."))
            return
        params = _params(parts.query)
        if not _same(params.get("state"), server.state):
            self._send(400, _page("Not this login's answer",
                                  "This address does not carry the state of the login "
                                  "vm-token is waiting for; that login goes on."))
            return
        if not server.take_answer():  # a reload of the page: the first answer counts
            self._send(409, _page("Already answered", "vm-token has this login's answer."))
            return
        server.events.put(("redirect", params))
        try:
            status, body = server.page.get(timeout=PAGE_WAIT)
        except queue.Empty:
            status, body = 504, _page("vm-token did not answer",
                                      "See the terminal where you ran vm-token login.")
        self._send(status, body)

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        try:
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("Referrer-Policy", "no-referrer")
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            pass  # the browser went away: the terminal says how it ended

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass  # the query holds the authorization code: never logged


# -- talking to the daemon ---------------------------------------------------------------------


def _ask(client: Client, timeout: float, op: str, **fields: Any) -> dict[str, Any]:
    saved, client.timeout = client.timeout, timeout
    try:
        return client.request(op, **fields)
    finally:
        client.timeout = saved


def _fresh(client: Client, timeout: float) -> Client:
    """Another connection to the same daemon, for the same profile ("": its default)."""
    return Client(client.socket_path, timeout=timeout, profile=client.profile or "")


def _cancelling(client: Client, flow: str, work: Callable[[], dict[str, Any]]
                ) -> dict[str, Any]:
    """`work()`, and the daemon's flow cancelled if it fails or is interrupted — on a
    fresh connection: `client`'s may be in the middle of a request."""
    try:
        return work()
    except BaseException:
        try:
            with _fresh(client, CANCEL_TIMEOUT) as canceller:
                canceller.request(protocol.LOGIN_CANCEL, flow=flow)
        except errors.Error:
            pass  # the daemon is gone: so is the flow
        raise


def _next(events: queue.Queue[Event], deadline: float, late: str) -> Event:
    """The next event before `deadline` (time.monotonic()); LoginAborted(`late`) after it.
    Events: ("redirect", params) from the listener, ("paste", line) and ("eof", None) from
    stdin, ("cancelled", why) from the watcher, ("done", reply) and ("failed", error) from
    a device login's wait."""
    remaining = deadline - time.monotonic()
    try:
        if remaining > 0:
            return events.get(timeout=remaining)
    except queue.Empty:
        pass
    raise LoginAborted(late)


def _printable(text: str, limit: int = 300) -> str:
    """Text from a redirect or a paste, safe for a terminal: no control characters (an
    escape sequence could retitle or clear it), bounded."""
    return "".join(ch for ch in text if ch.isprintable())[:limit]


def _finish(client: Client, flow: str, params: dict[str, str]) -> dict[str, Any]:
    """The redirect's answer (its state checked): an error ends the login, a code goes to
    the daemon with the redirect's issuer, if it named one (RFC 9207)."""
    error = params.get("error")
    if error:
        error = _printable(error, 60)
        text = _printable(params.get("error_description") or "")
        raise LoginAborted(f"the identity provider said: {error}"
                           + (f" ({text})" if text else ""))
    code = params.get("code")
    if not code:
        raise LoginAborted("the redirect carried no code: copy the whole address")
    fields = {"flow": flow, "code": code, "state": params["state"]}
    if params.get("iss") is not None:
        fields["iss"] = params["iss"]
    return _ask(client, FINISH_TIMEOUT, protocol.LOGIN_FINISH, **fields)


# -- the browser login ---------------------------------------------------------------------------


def browser_login(client: Client, *, port: int, open_browser: bool, timeout: float) -> str:
    """Log in through a browser; the username. LoginAborted or errors.Error on failure."""
    events: queue.Queue[Event] = queue.Queue()
    with _Listener(port, events) as listener:
        reply = _ask(client, START_TIMEOUT, protocol.LOGIN_START, method="code",
                     redirect_uri=listener.redirect_uri)
        flow = str(reply["flow"])

        def run() -> dict[str, Any]:
            listener.expect(str(reply["url"]))
            threading.Thread(target=_watch, args=(client, flow, timeout, events),
                             daemon=True).start()
            if open_browser:
                sys.stderr.write(f"Opening a browser to log in. If none opens, visit:\n"
                                 f"  {listener.start_url}\n")
                # In a thread: a $BROWSER that runs in the terminal (lynx, w3m) returns only
                # when it is closed, and the page it waits for needs us to answer.
                threading.Thread(target=_open_browser, args=(listener.start_url,),
                                 daemon=True).start()
            else:
                sys.stderr.write(
                    f"Open this address in a browser on any machine and log in:\n"
                    f"  {listener.authorize_url}\n"
                    "The browser then goes to a 127.0.0.1 address that will not load there: "
                    "that is expected. Copy that whole address from the address bar and "
                    "paste it here:\n")
                threading.Thread(target=_read_pastes, args=(events,), daemon=True).start()
            params, from_browser = _answer(events, listener, time.monotonic() + timeout,
                                           f"no login within {timeout:g} s")
            try:
                result = _finish(client, flow, params)
            except (LoginAborted, errors.Error) as exc:
                if from_browser:
                    message = exc.message if isinstance(exc, errors.DaemonError) else str(exc)
                    listener.page.put((400, _page("Login failed", message)))
                raise
            if from_browser:
                listener.page.put((200, _page(
                    "Logged in", f"Logged in to VideoManager Pro as {result.get('username')} "
                    "— you can close this tab.")))
            return result

        return str(_cancelling(client, flow, run).get("username"))


def _answer(events: queue.Queue[Event], listener: _Listener, deadline: float, late: str
            ) -> tuple[dict[str, str], bool]:
    """The redirect's parameters, with this login's state (from the browser, or pasted),
    and whether the browser waits for a page."""
    while True:
        kind, payload = _next(events, deadline, late)
        if kind == "cancelled":
            raise LoginAborted(payload)
        if kind == "eof":
            raise LoginAborted("no address was pasted (standard input ended)")
        if kind == "redirect":
            return payload, True
        params = _pasted(payload)
        if params is None:
            continue  # an empty line
        if not _same(params.get("state"), listener.state):
            sys.stderr.write("vm-token: that is not the answer to this login (its state "
                             "differs): paste the address this login's browser ended at\n")
            continue
        if listener.take_answer():
            return params, False
        # else the browser brought it too, first: its event is next in the queue


def _watch(client: Client, flow: str, timeout: float, events: queue.Queue[Event]) -> None:
    """Wait with the daemon for the flow to end; if it was cancelled (a newer login), wake
    the main thread, which is waiting for a redirect that will not come."""
    try:
        with _fresh(client, timeout + WATCH_SLACK) as watcher:
            watcher.request(protocol.LOGIN_WAIT, flow=flow, method="code")
    except errors.LoginFailed as exc:
        events.put(("cancelled", exc.message))
    except errors.Error:
        pass  # the main thread's own requests will say what is wrong


def _open_browser(url: str) -> None:
    import webbrowser  # honours $BROWSER

    try:
        webbrowser.open(url)
    except Exception:  # noqa: BLE001, S110 - the address is printed: the user can open it
        pass


def _read_pastes(events: queue.Queue[Event]) -> None:
    """Standard input, a line at a time, into `events` (in a thread: the main one waits
    with a deadline, and for the watcher)."""
    try:
        for line in sys.stdin:
            events.put(("paste", line))
    except (OSError, ValueError):
        pass
    events.put(("eof", None))


def _pasted(line: str) -> dict[str, str] | None:
    """The parameters of a pasted address (or of its query alone); None for an empty line."""
    line = line.strip()
    if not line:
        return None
    query = urlsplit(line).query if "://" in line else line.lstrip("?")
    return _params(query)


# -- the device login ---------------------------------------------------------------------------


def device_login(client: Client, *, timeout: float | None) -> str:
    """Log in with a device code entered elsewhere; the username. Waits `timeout` seconds,
    or (None) as long as the code is valid."""
    reply = _ask(client, START_TIMEOUT, protocol.LOGIN_START, method="device")
    flow = str(reply["flow"])
    uri, code = _printable(str(reply["verification_uri"])), _printable(str(reply["user_code"]))
    sys.stderr.write(f"To log in, visit {uri} and enter the code\n  {code}\n")
    if reply.get("verification_uri_complete"):
        sys.stderr.write(f"or open {_printable(str(reply['verification_uri_complete']))}\n")
    sys.stderr.write("Waiting for the login to be approved…\n")
    lifetime = reply.get("expires_in")
    if timeout is not None:
        wait, late = timeout, f"no login within {timeout:g} s"
    else:
        wait = (float(lifetime) if isinstance(lifetime, int | float) else 0.0) + DEVICE_SLACK
        late = "the device code expired before the login was approved: start again"
    events: queue.Queue[Event] = queue.Queue()

    def run() -> dict[str, Any]:
        threading.Thread(target=_wait_device, args=(client, flow, wait + WATCH_SLACK, events),
                         daemon=True).start()
        kind, payload = _next(events, time.monotonic() + wait, late)
        if kind == "failed":
            raise payload
        return dict(payload)

    return str(_cancelling(client, flow, run).get("username"))


def _wait_device(client: Client, flow: str, timeout: float, events: queue.Queue[Event]) -> None:
    """login_wait on a connection of its own (in a thread: the main one keeps the deadline
    and hears Ctrl-C)."""
    try:
        with _fresh(client, timeout) as waiter:
            events.put(("done", waiter.request(protocol.LOGIN_WAIT, flow=flow)))
    except errors.Error as exc:
        events.put(("failed", exc))
