"""What the interactive-login tests share: headless Chromium, a `$BROWSER` that hands the URL
over, `vm-token login` as a process, and the checks of what a logged-in user gets.

    def test_x(chromium, tmp_path):
        opener = BrowserOpener(tmp_path)
        login = start_login(daemon, "--browser", env=opener.env)
        page = chromium.new_page()
        page.goto(opener.wait_for_url())
        ...

`chromium` is Debian's /usr/bin/chromium driven by Playwright (no browser is downloaded). On
a developer's machine without it the tests skip and say why; on CI (`CI=true`) they fail,
so a missing browser can never pass for a green run. Each test gets its own browser context
(cookies, storage: a fresh profile's worth), so a login of one test is no session of the next.

Playwright's sync API blocks, so these tests are plain (not trio) functions, bounded by the
deadlines they pass to every wait below, Playwright's own timeouts and pytest-timeout.
"""

from __future__ import annotations

import os
import queue
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

import vm_token
from tests.conftest import BIN
from tests.e2e.test_git_and_scripts import attributes, git_credential

CHROMIUM = Path("/usr/bin/chromium")
# The flags: without the background-networking ones Chromium tries to reach the
# internet (and fails, slowly). Playwright adds --headless and a fresh --user-data-dir.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
PAGE_TIMEOUT_MS = 15_000  # any one page action; loopback pages take milliseconds
LOGIN_DEADLINE = 30.0  # s, a whole `vm-token login` in these tests
VMS = ("1001", "1002", "1003")


def _missing(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}: CI must run the real-browser tests (.ci/run installs it)")
    pytest.skip(f"{reason}: the real-browser login tests need it (apt-get install chromium)")


@pytest.fixture(scope="module")
def chromium_browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        _missing(f"{CHROMIUM} is not installed")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("Playwright for Python is not installed")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                             args=CHROMIUM_ARGS, timeout=30_000)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def chromium(chromium_browser: Any) -> Iterator[Any]:
    """A fresh browser context of headless Chromium (new_page() on it); closed afterwards."""
    context = chromium_browser.new_context()
    context.set_default_timeout(PAGE_TIMEOUT_MS)
    try:
        yield context
    finally:
        context.close()


def context_elsewhere(browser: Any, *reachable: str) -> Any:
    """A browser context "on another machine": only the `reachable` host:port origins are
    reached; every other address (vm-token's loopback listener on this one) fails as if
    nothing listened there, through a proxy that does not exist (port 9, discard: closed).
    `<-loopback>` undoes Chromium's implicit loopback bypass."""
    context = browser.new_context(proxy={"server": "http://127.0.0.1:9",
                                         "bypass": ",".join(["<-loopback>", *reachable])})
    context.set_default_timeout(PAGE_TIMEOUT_MS)
    return context


class BrowserOpener:
    """A `$BROWSER` for vm-token: a script that writes the URL it is given to a file (Python's
    webbrowser appends the URL to the command), standing in for the user's desktop handing
    the address to their browser."""

    def __init__(self, directory: Path, name: str = "browser") -> None:
        self.url_file = directory / f"{name}.url"
        self.script = directory / f"{name}.sh"
        self.script.write_text(
            "#!/bin/sh\n"
            f"printf '%s\\n' \"$1\" > '{self.url_file}.tmp' && "
            f"mv '{self.url_file}.tmp' '{self.url_file}'\n")
        self.script.chmod(0o700)

    @property
    def env(self) -> dict[str, str]:
        return {"BROWSER": str(self.script)}

    def wait_for_url(self, login: Login | None = None, timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        while not self.url_file.exists():
            if login is not None and login.proc.poll() is not None:
                raise AssertionError(f"vm-token login exited first:\n{login.finish()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"vm-token did not open a browser in {timeout} s")
            time.sleep(0.02)
        return self.url_file.read_text().strip()


class Login:
    """A running `vm-token login ...`; its stderr read as it comes (the URL is in it)."""

    def __init__(self, daemon: Any, *args: str, env: dict[str, str] | None = None) -> None:
        self.args = args
        self.proc = subprocess.Popen(
            [str(BIN / "vm-token"), "login", *args], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**daemon.env, **(env or {})})
        self._lines: queue.Queue[str | None] = queue.Queue()
        self.stderr_lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.stdout = ""
        self.returncode: int | None = None

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._lines.put(line)
        self._lines.put(None)

    def stderr_line(self, pattern: str, timeout: float = 15.0) -> re.Match[str]:
        """The first (further) stderr line matching `pattern`."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"vm-token printed no line like {pattern!r} in "
                                     f"{timeout} s: {self.stderr_lines}") from None
            if line is None:
                raise AssertionError(f"vm-token exited without a line like {pattern!r}: "
                                     f"{self.stderr_lines}")
            self.stderr_lines.append(line)
            if found := re.search(pattern, line):
                return found

    def write(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text)
        self.proc.stdin.flush()

    def finish(self, timeout: float = LOGIN_DEADLINE) -> str:
        """Wait for the exit (killing it past `timeout`); stdout + stderr, for messages."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"vm-token login {' '.join(self.args)} did not exit within "
                                 f"{timeout} s: {self.stderr_lines}") from None
        assert self.proc.stdout is not None
        stdout = self.proc.stdout.read()  # a line or two: the pipe never filled
        self._reader.join(timeout=5)
        while True:
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                self.stderr_lines.append(line)
        self.stdout, self.returncode = stdout, self.proc.returncode
        return self.output

    @property
    def stderr(self) -> str:
        return "".join(self.stderr_lines)

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def kill(self) -> None:
        """Kill it if it still runs; close its pipes (every test calls this at the end)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(timeout=5)
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


def query(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


# -- the providers' login pages, as a person fills them --------------------------------------


def standin_log_in(page: Any, standin: Any, *, deny: bool = False) -> None:
    """The stand-in's login form (the Keycloak look-alike): username, password, Log in/Deny."""
    page.fill("#username", standin.username)
    page.fill("#password", standin.password)
    page.click("#kc-deny" if deny else "#kc-login")


def dot_log_in(page: Any, peer: Any) -> None:
    """django-oauth-toolkit's (Django's) login page."""
    page.wait_for_selector("#id_username")
    page.fill("#id_username", peer.username)
    page.fill("#id_password", peer.password)
    page.click("#submit")


def wait_for_text(page: Any, selector: str, text: str) -> str:
    """The text of `selector` once it contains `text` (the page is loaded by then)."""
    page.wait_for_function(
        "([sel, text]) => document.querySelector(sel)?.innerText.includes(text)",
        arg=[selector, text])
    return str(page.inner_text(selector))


# -- what a logged-in user gets ---------------------------------------------------------------


def assert_tokens_served(daemon: Any, api_url: str, username: str,
                         accepted: Any) -> list[str]:
    """`vm-token token` for two VideoManagers, git through the helper and VideoManagerAuth
    with httpx all get tokens the API accepts; returns the tokens seen.
    `accepted(token, vm)` asks the API."""
    seen = []
    for vm in VMS[:2]:
        done = daemon.cli("token", "--vm", vm)
        assert done.returncode == 0, done.stderr
        token = done.stdout.strip()
        assert accepted(token, vm), f"the API refuses the token for {vm}"
        seen.append(token)
    url = urlsplit(api_url)
    fill = git_credential(daemon, "fill", f"protocol={url.scheme}\nhost={url.netloc}\n\n")
    assert fill.returncode == 0, fill.stderr
    given = attributes(fill.stdout)
    assert accepted(given["password"], VMS[0])
    seen.append(given["password"])
    with httpx.Client(auth=vm_token.VideoManagerAuth(VMS[1], socket=daemon.socket),
                      timeout=10) as http:
        answer = http.get(f"{api_url}/{VMS[1]}/videos")
    assert answer.status_code == 200, answer.text
    seen.append(answer.request.headers["Authorization"].removeprefix("Bearer "))
    return seen


def assert_not_in(text: str, secrets: list[str], where: str) -> None:
    for secret in secrets:
        assert secret, "an empty secret proves nothing"
        assert secret not in text, f"a secret ({len(secret)} characters) is in {where}"
        parts = secret.split(".")
        if len(parts) == 3:
            assert parts[1] not in text, f"a JWT's claims are in {where}"


def stopped_log(daemon: Any) -> str:
    """The daemon's whole log (at debug level, the most it ever says), after it stopped."""
    assert daemon.env["VM_TOKEN_LOG_LEVEL"] == "debug"
    assert daemon.stop() == 0
    log = daemon.log()
    assert "vm-tokend" in log
    return log


# Any run of 43+ URL-safe base64 characters: an authorization code, a PKCE verifier (86),
# a state or nonce (43), a token or a part of one. The daemon's log has no business with any.
LONG_SECRET_LOOKING = re.compile(r"[A-Za-z0-9_\-]{43,}")
