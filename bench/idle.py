"""Wake-ups at rest: how often an idle, logged-in vm-tokend runs at all, next to ssh-agent.

A process that sleeps in epoll_wait until something happens costs a laptop nothing; one
that wakes on a timer keeps the CPU from its deep sleep states. Counted as the kernel
counts them: each time a thread wakes and goes back to sleep, its
`voluntary_ctxt_switches` grows by one. Three processes over the same minute: vm-tokend
without a watchdog, vm-tokend with systemd's (WATCHDOG_USEC=30 s: a ping every 15 s), and
`ssh-agent -D` holding no key. The stand-in's tokens live a day, so no refresh falls in
the window, and nothing talks to any of them meanwhile.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from bench import harness

WINDOW = 60.0
# After the first token: the login's connection to the stand-in, the client's to the
# daemon, settling. A guess, generous.
SETTLE = 2.0
WATCHDOG_USEC = "30000000"
DAY = 86400


def wakeups(pid: int) -> int:
    """Voluntary context switches of every thread of `pid` so far."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
        except FileNotFoundError:
            continue
        for line in status.splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                total += int(line.split()[1])
    return total


def _ssh_agent(workdir: Path) -> subprocess.Popen[bytes] | None:
    agent = shutil.which("ssh-agent")
    if agent is None:
        return None
    return subprocess.Popen([agent, "-D", "-a", str(workdir / "agent")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=harness.child_env())


@dataclass
class Idle:
    """Per minute: wake-ups of vm-tokend without a watchdog and with one, the latter's
    pings and other messages to systemd, wake-ups of ssh-agent (None: not installed)."""

    quiet: float
    watchdog: float
    pings: float
    other_messages: float
    ssh_agent: float | None


def measure() -> Idle:
    workdir = Path(tempfile.mkdtemp(prefix="vmt-idle-"))
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(workdir / "notify"))
    notify.setblocking(False)
    try:
        with ExitStack() as stack:
            quiet = stack.enter_context(harness.daemon(
                access_lifetime=DAY, refresh_lifetime=2 * DAY))
            watched = stack.enter_context(harness.daemon(
                {"NOTIFY_SOCKET": str(workdir / "notify"), "WATCHDOG_USEC": WATCHDOG_USEC},
                access_lifetime=DAY, refresh_lifetime=2 * DAY))
            agent = _ssh_agent(workdir)
            if agent is not None:
                stack.callback(agent.wait, 10)
                stack.callback(agent.terminate)
            time.sleep(SETTLE)
            while True:  # what the daemon said so far
                try:
                    notify.recv(4096)
                except BlockingIOError:
                    break
            pids = {"quiet": quiet.process.pid, "watchdog": watched.process.pid}
            if agent is not None:
                pids["ssh_agent"] = agent.pid
            before = {name: wakeups(pid) for name, pid in pids.items()}
            time.sleep(WINDOW)
            after = {name: wakeups(pid) for name, pid in pids.items()}
            pings = others = 0
            while True:
                try:
                    message = notify.recv(4096)
                except BlockingIOError:
                    break
                pings += message == b"WATCHDOG=1"
                others += message != b"WATCHDOG=1"
    finally:
        notify.close()
        shutil.rmtree(workdir, ignore_errors=True)
    per_minute = 60.0 / WINDOW
    woke = {name: (after[name] - before[name]) * per_minute for name in pids}
    return Idle(woke["quiet"], woke["watchdog"], pings * per_minute, others * per_minute,
                woke.get("ssh_agent"))


if __name__ == "__main__":
    print(measure())
