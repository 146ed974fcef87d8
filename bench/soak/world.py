"""The soak's world: two stand-in APIs (one per profile), the real `vm-tokend` and
`vm-tokend proxy` processes, and what is sampled of them each minute."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import vm_token
from bench.harness import BIN, child_env
from bench.soak.faults import Api, FaultSwitch
from bench.soak.ledger import Ledger
from standin.server import StandIn

__all__ = ["Sample", "World"]

# Scaled down from the API's 5 minutes and 1 hour, so ten minutes see many refreshes and
# refresh tokens that run out; the same ratio as the real ones, near enough.
ACCESS_LIFETIME = 60
REFRESH_LIFETIME = 600
MAX_BACKOFF = 10.0
IDLE_TIMEOUT = 120.0  # s: a VideoManager not asked for this long is let go
SHIFT = 150.0  # s: the VideoManagers in use change this often (by one of three)
IN_USE = 3
PROXY_MIN_TTL = 10


@dataclass
class Sample:
    minute: float
    rss_kib: dict[str, int] = field(default_factory=dict)
    fds: dict[str, int] = field(default_factory=dict)
    tasks: dict[str, int] = field(default_factory=dict)
    threads: dict[str, int] = field(default_factory=dict)
    # the daemon's open connections (the library's, the proxy's pool), less the sampler's:
    # each is a task and an fd in the daemon
    connections: int = 0
    # sockets held in pools, counted from the kernel's tables (/proc/net), per process:
    # TCP connections to the APIs (the daemon's httpx, the proxy's own pool; an idle one
    # is closed when next wanted, 5 s after its last use) and, for the proxy, its
    # connections to the daemon (unnamed Unix sockets)
    pooled: dict[str, int] = field(default_factory=dict)


@dataclass
class Profile:
    name: str
    standin: StandIn
    vms: list[str]
    password_file: Path
    proxy_host: str


class World:
    def __init__(self, workdir: Path, ledger: Ledger) -> None:
        self.workdir = workdir
        self.socket = workdir / "vm-token" / "socket"
        self.proxy_socket = workdir / "vm-token" / "proxy"
        self.started = time.monotonic()
        self.asks: dict[tuple[str, str], list[float]] = defaultdict(list)
        self._lock = threading.Lock()
        legacy = StandIn(legacy_only=True, rotate_refresh_tokens=True,
                         videomanagers=[(str(1001 + i), f"Legacy {i}") for i in range(6)],
                         access_lifetime=ACCESS_LIFETIME, refresh_lifetime=REFRESH_LIFETIME)
        oidc = StandIn(rotate_refresh_tokens=True,
                       videomanagers=[(str(2001 + i), f"OIDC {i}") for i in range(6)],
                       access_lifetime=ACCESS_LIFETIME, refresh_lifetime=REFRESH_LIFETIME)
        self.by_name = {
            "default": Profile("default", legacy, [i for i, _ in legacy.videomanagers],
                               workdir / "password-default", "localhost"),
            "oidc": Profile("oidc", oidc, [i for i, _ in oidc.videomanagers],
                            workdir / "password-oidc", "oidc"),
        }
        self.switches = {name: FaultSwitch(p.standin, ledger).install()
                         for name, p in self.by_name.items()}
        self.env = child_env(
            PATH=f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            XDG_CONFIG_HOME=str(workdir / "config"),
            XDG_RUNTIME_DIR=str(workdir),
            VM_TOKEN_SOCKET=str(self.socket),
        )
        self.passwords = [p.standin.password for p in self.by_name.values()]  # every one
        self.daemon: subprocess.Popen[bytes] | None = None
        self.proxy: subprocess.Popen[bytes] | None = None

    # -- what clients need (bench.soak.clients.Target) ----------------------------------------

    def profiles(self) -> list[str]:
        return list(self.by_name)

    def in_use(self, profile: str) -> list[str]:
        """The VideoManagers clients ask for now: three of six, one replaced every SHIFT."""
        vms = self.by_name[profile].vms
        step = int((time.monotonic() - self.started) // SHIFT)
        return [vms[(step + i) % len(vms)] for i in range(IN_USE)]

    def api_url(self, profile: str) -> str:
        return self.by_name[profile].standin.url

    def proxy_host(self, profile: str) -> str:
        return self.by_name[profile].proxy_host

    def asked(self, profile: str, vm: str) -> None:
        with self._lock:
            self.asks[profile, vm].append(time.monotonic())

    # -- the processes --------------------------------------------------------------------

    def apis(self) -> list[Api]:
        return [Api(name, self.switches[name], oidc=name == "oidc",
                    set_password=functools.partial(self.set_password, name))
                for name in self.by_name]

    def set_password(self, profile: str, password: str) -> None:
        """What a user does after changing the password: the file, then a reload."""
        self.passwords.append(password)
        path = self.by_name[profile].password_file
        path.write_text(password + "\n")
        assert self.daemon is not None
        self.daemon.send_signal(signal.SIGHUP)

    def start(self) -> None:
        for profile in self.by_name.values():
            profile.standin.start()
            fd = os.open(profile.password_file, os.O_WRONLY | os.O_CREAT, 0o600)
            os.write(fd, profile.standin.password.encode() + b"\n")
            os.close(fd)
        legacy, oidc = self.by_name["default"], self.by_name["oidc"]
        config = self.workdir / "config" / "vm-token" / "config.toml"
        config.parent.mkdir(parents=True)
        config.write_text(
            f'log_level = "info"\nmax_backoff = {MAX_BACKOFF}\nidle_timeout = {IDLE_TIMEOUT}\n'
            f'username = "{legacy.standin.username}"\n'
            f'api_url = "{legacy.standin.url}"\nauth = "legacy"\n'
            f'password_file = "{legacy.password_file}"\n\n'
            f'[profiles.oidc]\napi_url = "{oidc.standin.url}"\nauth = "oidc"\n'
            f'password_file = "{oidc.password_file}"\n')
        (self.workdir / "home").mkdir()
        with (self.workdir / "daemon.log").open("wb") as log:
            self.daemon = subprocess.Popen([str(BIN / "vm-tokend")], env=self.env,
                                           stdin=subprocess.DEVNULL, stdout=log,
                                           stderr=subprocess.STDOUT)
        self._wait(lambda: all(self._logged_in(name) for name in self.by_name),
                   "vm-tokend logged in to both APIs")
        with (self.workdir / "proxy.log").open("wb") as log:
            self.proxy = subprocess.Popen(
                [str(BIN / "vm-tokend"), "proxy", "--socket", str(self.proxy_socket),
                 "--min-ttl", str(PROXY_MIN_TTL), "--log-level", "info"],
                env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        self._wait(lambda: self.proxy_socket.exists(), "the proxy listens")

    def _logged_in(self, profile: str) -> bool:
        try:
            with vm_token.Client(self.socket, profile=profile, timeout=5) as client:
                return client.status().get("state") == "logged_in"
        except vm_token.Error:
            return False

    def _wait(self, done: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + 30
        while not done():
            for process in (self.daemon, self.proxy):
                if process is not None and process.poll() is not None:
                    raise SystemExit(f"soak: {what}: a process exited "
                                     f"({process.returncode}); see {self.workdir}")
            if time.monotonic() > deadline:
                raise SystemExit(f"soak: not within 30 s: {what}")
            time.sleep(0.1)

    def alive(self) -> list[str]:
        """The processes that died (should be none)."""
        return [name for name, process in (("vm-tokend", self.daemon),
                                           ("proxy", self.proxy))
                if process is None or process.poll() is not None]

    def stop(self) -> None:
        for process in (self.proxy, self.daemon):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        for profile in self.by_name.values():
            profile.standin.stop()

    # -- sampling -------------------------------------------------------------------------

    def sample(self) -> Sample:
        sample = Sample(round((time.monotonic() - self.started) / 60, 1))
        for name, process in (("vm-tokend", self.daemon), ("proxy", self.proxy)):
            assert process is not None
            status = _proc_status(process.pid)
            sample.rss_kib[name] = int(status.get("VmRSS", "0 kB").split()[0])
            sample.threads[name] = int(status.get("Threads", "0"))
            sample.fds[name] = len(os.listdir(f"/proc/{process.pid}/fd"))
            sample.pooled[name] = self._pooled(process.pid, unnamed=name == "proxy")
        with vm_token.Client(self.socket, timeout=10) as client:
            status = client.status()  # less the one connection asking:
            sample.tasks["vm-tokend"] = int(status["tasks"]) - 1
            sample.connections = int(status["connections_open"]) - 1
        sample.tasks["proxy"] = self._proxy_tasks()
        return sample

    def _pooled(self, pid: int, *, unnamed: bool) -> int:
        """How many of `pid`'s sockets are TCP connections to the stand-ins, or (with
        `unnamed`) Unix sockets without a name: connections it made to the daemon."""
        inodes = set()
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue  # closed meanwhile
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
        ports = {f"{p.standin.origin.rsplit(':', 1)[1]}" for p in self.by_name.values()}
        count = 0
        with open("/proc/net/tcp") as tcp:
            for line in list(tcp)[1:]:
                fields = line.split()
                # established only: a socket the API closed and we did not is our leak
                if fields[9] in inodes and fields[3] == "01" \
                        and str(int(fields[2].split(":")[1], 16)) in ports:
                    count += 1
        if unnamed:
            with open("/proc/net/unix") as unix:
                for line in list(unix)[1:]:
                    fields = line.split()
                    if len(fields) == 7 and fields[6] in inodes:
                        count += 1
        return count

    def _proxy_tasks(self) -> int:
        done = subprocess.run(
            ["curl", "-sS", "--unix-socket", str(self.proxy_socket), "--max-time", "10",
             "http://localhost/_vm-token/health"],
            capture_output=True, text=True, timeout=20, check=True)
        return int(json.loads(done.stdout)["tasks"]) - 1  # less the one answering


def _proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as status:
        return {name: value.strip() for name, _, value in
                (line.partition(":") for line in status)}
