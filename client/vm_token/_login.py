"""`vm-token login --browser | --no-browser | --device`: a person logs in, no password.

vm-token owns the loopback listener and the browser; the daemon owns the flow's secrets
(state, nonce, PKCE verifier, device code) and does every exchange, so no token or
verifier passes through here. The listener is opened before anything else, so a fast
redirect is never lost (RFC 8252 7.3).
"""

from __future__ import annotations

import html
import queue
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from . import errors, protocol
from .client import Client

__all__ = ["browser_login", "device_login"]

CALLBACK_PATH = "/callback"
# How long the browser's request waits for the daemon's exchange before it gets a page.
PAGE_WAIT = 60.0


class LoginAborted(Exception):
    """The login did not succeed; the message is for the user, on one line."""


def _page(title: str, text: str) -> bytes:
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title></head>"
        "<body style='font-family: sans-serif; margin: 3em'>"
        f"<h1>{html.escape(title)}</h1><p>{html.escape(text)}</p></body></html>"
    ).encode()


class _Listener(ThreadingHTTPServer):
    """The loopback listener the identity provider redirects the browser to."""

    def __init__(self, port: int) -> None:
        super().__init__(("127.0.0.1", port), _Callback)
        self.arrived: queue.Queue[dict[str, str]] = queue.Queue(maxsize=1)
        self.page: queue.Queue[tuple[int, bytes]] = queue.Queue(maxsize=1)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def redirect_uri(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{CALLBACK_PATH}"

    def __enter__(self) -> _Listener:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()


class _Callback(BaseHTTPRequestHandler):
    server: _Listener
    timeout = 10  # a connection that sends nothing is dropped, not waited for

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        parts = urlsplit(self.path)
        if parts.path != CALLBACK_PATH:
            self._send(404, _page("Not found", "This is vm-token's login listener."))
            return
        params = {k: v[0] for k, v in parse_qs(parts.query).items() if v}
        try:
            self.server.arrived.put_nowait(params)
        except queue.Full:  # a second redirect (a reload of the page): the first counts
            self._send(409, _page("Already answered", "vm-token has this login's answer."))
            return
        try:
            status, body = self.server.page.get(timeout=PAGE_WAIT)
        except queue.Empty:
            status, body = 504, _page("vm-token did not answer",
                                      "See the terminal where you ran vm-token login.")
        self._send(status, body)

    def _send(self, status: int, body: bytes) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            pass  # the browser went away: the terminal says how it ended

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass  # the query holds the authorization code: never logged


def _ask(client: Client, timeout: float, op: str, **fields: Any) -> dict[str, Any]:
    saved, client.timeout = client.timeout, timeout
    try:
        return client.request(op, **fields)
    finally:
        client.timeout = saved


def _cancelling(client: Client, flow: str, work: Callable[[], dict[str, Any]]
                ) -> dict[str, Any]:
    """`work()`, and the daemon's flow cancelled if it fails or is interrupted."""
    try:
        return work()
    except BaseException:
        try:
            _ask(client, 5.0, protocol.LOGIN_CANCEL, flow=flow)
        except errors.Error:
            pass
        raise


def _printable(text: str, limit: int = 300) -> str:
    """Text from a redirect or a paste, safe for a terminal: no control characters (an
    escape sequence could retitle or clear it), bounded."""
    return "".join(ch for ch in text if ch.isprintable())[:limit]


def _finish(client: Client, flow: str, params: dict[str, str]) -> dict[str, Any]:
    error = params.get("error")
    if error:
        error = _printable(error, 60)
        text = _printable(params.get("error_description") or "")
        raise LoginAborted(f"the identity provider said: {error}"
                           + (f" ({text})" if text else ""))
    code, state = params.get("code"), params.get("state")
    if not code or not state:
        raise LoginAborted("the redirect carried no code and state: copy the whole address")
    return _ask(client, 60.0, protocol.LOGIN_FINISH, flow=flow, code=code, state=state)


def browser_login(client: Client, *, port: int, open_browser: bool, timeout: float) -> str:
    """Log in through a browser; the username. LoginAborted or errors.Error on failure."""
    with _Listener(port) as listener:
        reply = _ask(client, 30.0, protocol.LOGIN_START, method="code",
                     redirect_uri=listener.redirect_uri)
        flow, url = str(reply["flow"]), str(reply["url"])
        threading.Thread(target=_watch, args=(client.socket_path, flow, timeout, listener),
                         daemon=True).start()

        def run() -> dict[str, Any]:
            if open_browser:
                sys.stderr.write(f"Opening a browser to log in. If none opens, visit:\n"
                                 f"  {url}\n")
                # In a thread: a $BROWSER that runs in the terminal (lynx, w3m) returns only
                # when it is closed, and the page it waits for needs us to answer.
                threading.Thread(target=_open_browser, args=(url,), daemon=True).start()
                try:
                    params = listener.arrived.get(timeout=timeout)
                except queue.Empty:
                    raise LoginAborted(f"no login within {timeout:g} s") from None
                if CANCELLED in params:
                    raise LoginAborted(params[CANCELLED])
            else:
                sys.stderr.write(
                    f"Open this address in a browser on any machine and log in:\n  {url}\n"
                    "The browser then goes to a 127.0.0.1 address that will not load there: "
                    "that is expected. Copy that whole address from the address bar and "
                    "paste it here:\n")
                params = _pasted(sys.stdin.readline())
            try:
                result = _finish(client, flow, params)
            except (LoginAborted, errors.Error) as exc:
                message = exc.message if isinstance(exc, errors.DaemonError) else str(exc)
                listener.page.put((400, _page("Login failed", message)))
                raise
            listener.page.put((200, _page(
                "Logged in", f"Logged in to VideoManager Pro as {result.get('username')} — "
                "you can close this tab.")))
            return result

        return str(_cancelling(client, flow, run).get("username"))


# Put in the listener's queue by _watch when the daemon cancelled the flow: not a redirect.
CANCELLED = "vm-token-cancelled"


def _watch(socket_path: str, flow: str, timeout: float, listener: _Listener) -> None:
    """Wait with the daemon for the flow to end; if it was cancelled (a newer login), wake
    the main thread, which is waiting for a redirect that will not come."""
    try:
        with Client(socket_path, timeout=timeout + 60.0) as watcher:
            watcher.request(protocol.LOGIN_WAIT, flow=flow, method="code")
    except errors.LoginFailed as exc:
        try:
            listener.arrived.put_nowait({CANCELLED: exc.message})
        except queue.Full:
            pass  # the redirect came first: the main thread goes on with it
    except errors.Error:
        pass  # the main thread's own requests will say what is wrong


def _open_browser(url: str) -> None:
    import webbrowser  # honours $BROWSER

    try:
        webbrowser.open(url)
    except Exception:  # noqa: BLE001, S110 - the address is printed: the user can open it
        pass


def _pasted(line: str) -> dict[str, str]:
    line = line.strip()
    if not line:
        raise LoginAborted("nothing was pasted")
    query = urlsplit(line).query if "://" in line else line.lstrip("?")
    params = {k: v[0] for k, v in parse_qs(query).items() if v}
    if not params:
        raise LoginAborted("that is not the address the browser was sent to")
    return params


def device_login(client: Client, *, timeout: float) -> str:
    """Log in with a device code entered elsewhere; the username."""
    reply = _ask(client, 30.0, protocol.LOGIN_START, method="device")
    flow = str(reply["flow"])
    uri, code = _printable(str(reply["verification_uri"])), _printable(str(reply["user_code"]))
    sys.stderr.write(f"To log in, visit {uri} and enter the code\n  {code}\n")
    if reply.get("verification_uri_complete"):
        sys.stderr.write(f"or open {_printable(str(reply['verification_uri_complete']))}\n")
    sys.stderr.write("Waiting for the login to be approved…\n")
    expires_in = float(reply.get("expires_in") or timeout)
    result = _cancelling(client, flow, lambda: _ask(
        client, min(timeout, expires_in + 30.0), protocol.LOGIN_WAIT, flow=flow))
    return str(result.get("username"))
