"""The soak's clients: `vm-token token`, the library, git's credential helper, and curl and
Node through the proxy, each a thread asking at random until told to stop.

A client picks a profile, one of the VideoManagers in use now (`World.in_use`), and a
`min_ttl`; every token it is handed is tried against the API (a real request), judged by
the ledger, and reported to the daemon the way that kind of client can when the API
refuses it — then it asks once more. A proxied request is judged by its status.
"""

from __future__ import annotations

import base64
import http.client
import json
import random
import re
import select
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import vm_token
from bench.soak.ledger import Ledger

__all__ = ["KINDS", "Pauser", "Target", "run_client"]

# The mix of 30: (kind, how many).
KINDS = (("token", 8), ("library", 8), ("git", 5), ("curl", 5), ("node", 4))
MIN_TTLS = (0, 0, 5, 10, 15)  # all below a third of the soak's token lifetime
THINK = (0.3, 3.0)  # s between two requests of one client
TIMEOUT = 30.0  # s a client waits at most (the daemon answers an outage long before)

NODE_CLIENT = r"""
// One request per line read ("host path"): GET through the proxy's socket on a kept-alive
// connection; prints one line, "status error-header" ("0 reason" if it failed).
const http = require("http");
const readline = require("readline");
const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
const socketPath = process.argv[process.argv.length - 1];
readline.createInterface({ input: process.stdin }).on("line", (line) => {
  const [host, path] = line.split(" ");
  let said = false;
  const say = (text) => { if (!said) { said = true; console.log(text); } };
  const req = http.get({ socketPath, path, agent, headers: { Host: host } }, (res) => {
    res.on("error", (err) => say(`0 ${err.code || "cut"}`));
    res.resume();
    res.on("end", () => say(`${res.statusCode} ${res.headers["x-vm-token-error"] || "-"}`));
  });
  req.setTimeout(30000, () => req.destroy(new Error("timeout")));
  req.on("error", (err) => say(`0 ${err.code || err.message}`));
});
"""


class Target(Protocol):
    """What a client needs of the world."""

    socket: Path
    proxy_socket: Path
    workdir: Path
    env: dict[str, str]

    def profiles(self) -> list[str]: ...
    def in_use(self, profile: str) -> list[str]: ...
    def api_url(self, profile: str) -> str: ...
    def proxy_host(self, profile: str) -> str: ...
    def asked(self, profile: str, vm: str) -> None: ...


class Pauser:
    """Lets the sampler stop every client between two requests, so a sample counts no
    request in flight."""

    def __init__(self, clients: int) -> None:
        self.clients = clients
        self.condition = threading.Condition()
        self.pausing = False
        self.idle = 0

    def gate(self) -> None:
        with self.condition:
            if not self.pausing:
                return
            self.idle += 1
            self.condition.notify_all()
            self.condition.wait_for(lambda: not self.pausing)
            self.idle -= 1

    def leave(self) -> None:
        """A client that stopped counts as idle for good."""
        with self.condition:
            self.clients -= 1
            self.condition.notify_all()

    def pause(self, timeout: float) -> bool:
        with self.condition:
            self.pausing = True
            return self.condition.wait_for(lambda: self.idle >= self.clients, timeout)

    def resume(self) -> None:
        with self.condition:
            self.pausing = False
            self.condition.notify_all()


def claims_of(token: str) -> dict[str, float]:
    """A JWT's `exp` and `iat`, read without checking it (the API checks it)."""
    try:
        payload = token.split(".")[1]
        data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return {k: float(data[k]) for k in ("exp", "iat") if k in data}
    except (IndexError, ValueError, TypeError):
        return {}


def videos_of(api_url: str, vm: str) -> tuple[str, str]:
    """The host[:port] of `api_url`, and the path of `vm`'s videos there."""
    parts = urlsplit(api_url)
    return parts.netloc, f"{parts.path}/{vm}/videos"


def api_accepts(api_url: str, vm: str, token: str) -> int:
    """The status of a real API request with `token` (200: accepted, 401: refused)."""
    host, path = videos_of(api_url, vm)
    connection = http.client.HTTPConnection(host, timeout=TIMEOUT)
    try:
        connection.request("GET", path, headers={"Authorization": f"Bearer {token}"})
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


class Client:
    """One client thread's state and its way of asking."""

    def __init__(self, kind: str, target: Target, ledger: Ledger, rng: random.Random) -> None:
        self.kind, self.target, self.ledger, self.rng = kind, target, ledger, rng
        self.library: dict[str, vm_token.Client] = {}
        self.node: subprocess.Popen[str] | None = None
        self.served = 0

    # -- one request, judged ---------------------------------------------------------------

    def once(self) -> None:
        profile = self.rng.choice(self.target.profiles())
        vm = self.rng.choice(self.target.in_use(profile))
        self.target.asked(profile, vm)
        if self.kind in ("curl", "node"):
            self.proxied(profile, vm)
            return
        min_ttl = 0.0 if self.kind == "git" else float(self.rng.choice(MIN_TTLS))
        for _attempt in range(2):  # a refused token is reported, then asked for again
            started = time.monotonic()
            try:
                token, expires_at = self.ask(profile, vm, min_ttl)
            except _Failed as failed:
                self.ledger.judge_error(self.kind, profile, failed.code, started)
                return
            received = time.monotonic()
            try:
                status = api_accepts(self.target.api_url(profile), vm, token)
            except (OSError, http.client.HTTPException) as exc:
                self.ledger.outcome(self.kind, f"could not try it: {type(exc).__name__}")
                return  # the stand-in's trouble (our own), not the daemon's
            if status == 403:
                self.ledger.violate("right-videomanager",
                                    f"{self.kind} {profile}/{vm}: the API answered 403")
            if self.ledger.check_token(self.kind, profile, vm, min_ttl, token,
                                       claims_of(token), status == 200, started, received,
                                       expires_at, exit_time=self.kind != "library"):
                self.ledger.judge_served(self.kind, profile, started, received)
                self.served += 1
                return
            self.ledger.outcome(self.kind, "refused by the API (revoked)")
            if self.report(profile, vm, token):
                self.ledger.report(token)  # the daemon knows: it must not hand it out again

    def ask(self, profile: str, vm: str, min_ttl: float) -> tuple[str, float | None]:
        try:
            return {"token": self._shim, "library": self._library,
                    "git": self._git}[self.kind](profile, vm, min_ttl)
        except subprocess.TimeoutExpired:
            raise _Failed("timeout") from None

    def report(self, profile: str, vm: str, token: str) -> bool:
        """Tell the daemon, as this kind of client can; whether it was told."""
        if self.kind == "library":
            try:
                self.library[profile].invalidate(token, vm)
            except vm_token.Error:
                return False
            return True
        if self.kind == "git":
            # git's reject exits 0 whatever the helper did; the helper says on stderr
            # when it could not tell the daemon
            try:
                done = self._git_run("reject", profile, vm, f"username=x\npassword={token}\n")
            except subprocess.TimeoutExpired:
                return False
            return done.returncode == 0 and not done.stderr.strip()
        return False  # `vm-token token` has no way to report: a script just asks again

    # -- the kinds --------------------------------------------------------------------------

    def _shim(self, profile: str, vm: str, min_ttl: float) -> tuple[str, float | None]:
        done = subprocess.run(
            ["vm-token", "token", "--profile", profile, "--vm", vm, "--min-ttl", f"{min_ttl:g}",
             "--timeout", f"{TIMEOUT:g}"],
            capture_output=True, text=True, env=self.target.env, timeout=TIMEOUT + 10,
            check=False)
        if done.returncode != 0:
            raise _Failed(_code(done.stderr) or f"exit {done.returncode}")
        return done.stdout.strip(), None

    def _library(self, profile: str, vm: str, min_ttl: float) -> tuple[str, float | None]:
        client = self.library.get(profile)
        if client is None:
            client = self.library[profile] = vm_token.Client(
                self.target.socket, profile=profile, timeout=TIMEOUT)
        try:
            token = client.get_token(vm, min_ttl=min_ttl)
        except vm_token.DaemonError as exc:
            raise _Failed(exc.code) from None
        except vm_token.Error as exc:
            raise _Failed(type(exc).__name__) from None
        return token.access_token, token.expires_at.timestamp()

    def _git(self, profile: str, vm: str, min_ttl: float) -> tuple[str, float | None]:
        done = self._git_run("fill", profile, vm)
        fields = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
        if done.returncode != 0 or "password" not in fields:
            # the helper said why on stderr, which git passes on
            raise _Failed(_code(done.stderr) or "git: no credential")
        expiry = fields.get("password_expiry_utc")
        return fields["password"], float(expiry) if expiry else None

    def _git_run(self, action: str, profile: str, vm: str,
                 extra: str = "") -> subprocess.CompletedProcess[str]:
        host, path = videos_of(self.target.api_url(profile), vm)
        text = f"protocol=http\nhost={host}\npath={path.lstrip('/')}\n{extra}\n"
        env = {**self.target.env, "HOME": str(self.target.workdir / "home"),
               "GIT_CONFIG_NOSYSTEM": "1", "GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "",
               "SSH_ASKPASS": ""}
        return subprocess.run(
            ["git", "-c", "credential.helper=", "-c",
             f"credential.helper=vm-token --timeout={TIMEOUT:g}",
             "-c", "credential.useHttpPath=true", "credential", action],
            input=text, capture_output=True, text=True, env=env, timeout=TIMEOUT + 10,
            check=False)

    def proxied(self, profile: str, vm: str) -> None:
        host, path = self.target.proxy_host(profile), f"/v1/vms/{vm}/videos"
        started = time.monotonic()
        if self.kind == "curl":
            try:
                done = subprocess.run(
                    ["curl", "-sS", "--unix-socket", str(self.target.proxy_socket),
                     "--max-time", f"{TIMEOUT:g}", "-o", "/dev/null",
                     "-w", "%{http_code} %header{x-vm-token-error}", f"http://{host}{path}"],
                    capture_output=True, text=True, timeout=TIMEOUT + 10, check=False)
                status, _, error = done.stdout.partition(" ")
            except subprocess.TimeoutExpired:
                status, error = "0", "timeout"
        else:
            status, _, error = self._node(f"{host} {path}").partition(" ")
        ended = time.monotonic()
        if status == "200":
            self.ledger.judge_served(self.kind, profile, started, ended)
            self.served += 1
            return
        error = error.strip()
        if error and error != "-":  # the proxy's own answer, with its code
            self.ledger.judge_error(self.kind, profile, error, started)
            return
        # The API's own answer. A 401 comes back when the token was revoked and the daemon
        # could get no other (its API failing too); a 403 never should.
        self.ledger.judge_error(
            self.kind, profile, f"HTTP {status or 0} from the API", started,
            excusable=status == "401" and self.ledger.killed_since(profile, started - 60))

    def _node(self, line: str) -> str:
        """One request through this client's Node process (restarted if it died: a bug
        in the proxy that kills a client's connection shows as that client's error)."""
        if self.node is None or self.node.poll() is not None:
            self._close_node()
            self.node = subprocess.Popen(
                ["node", "-e", NODE_CLIENT, str(self.target.proxy_socket)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.node.stdin is not None and self.node.stdout is not None
        try:
            self.node.stdin.write(line + "\n")
            self.node.stdin.flush()
        except BrokenPipeError:
            return "0 node-exited"
        ready, _, _ = select.select([self.node.stdout], [], [], TIMEOUT + 15)
        if not ready:  # Node's own timeout covers a silent socket, not everything
            self.node.kill()
            return "0 node-no-answer"
        return self.node.stdout.readline().strip() or "0 node-exited"

    def _close_node(self) -> None:
        node, self.node = self.node, None
        if node is None:
            return
        try:
            if node.stdin is not None:
                node.stdin.close()
        except BrokenPipeError:
            pass
        try:
            node.wait(timeout=10)
        except subprocess.TimeoutExpired:
            node.kill()
            node.wait()
        if node.stdout is not None:
            node.stdout.close()

    def close(self) -> None:
        for client in self.library.values():
            client.close()
        self._close_node()


_CODE = re.compile(r"\(([a-z_]+)\)\s*$", re.MULTILINE)


def _code(stderr: str) -> str | None:
    """The daemon's error code that `vm-token` ends its message with: `… (code)`."""
    found = _CODE.findall(stderr)
    return found[-1] if found else None


class _Failed(Exception):
    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


def run_client(kind: str, target: Target, ledger: Ledger, seed: int, pauser: Pauser,
               stop: threading.Event, on_crash: Callable[[str, BaseException], Any]) -> None:
    """A client's thread: ask, think, until `stop`."""
    client = Client(kind, target, ledger, random.Random(seed))
    try:
        while not stop.is_set():
            pauser.gate()
            if stop.is_set():
                break
            client.once()
            stop.wait(client.rng.uniform(*THINK))
    except BaseException as exc:  # noqa: BLE001 - a soak client's bug must show, not hang
        on_crash(kind, exc)
    finally:
        pauser.leave()
        client.close()
