"""A vm-tokend of its own in a private directory, for `vm-tokend run` and `start`: the
directory (0700, in $XDG_RUNTIME_DIR or the system's temporary directory), the daemon
(and proxy) processes in a session of their own, the wait for the first login, the stop.
"""

from __future__ import annotations

import ctypes
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Final

import vm_token

__all__ = ["EXIT_FAILED", "EXIT_USAGE", "FORWARDED", "Children", "Stop", "fail", "make_directory",
           "wait_for_file", "wait_for_login"]

EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
# How long the first login may take before CMD is given up on (a login is a few requests
# of at most 15 s each, see upstream/base.py; a slow provider may need all of them).
LOGIN_TIMEOUT: Final = 90.0
# How long the daemon and the proxy get to stop on SIGTERM before SIGKILL.
STOP_TIMEOUT: Final = 15.0
FORWARDED: Final = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_PR_SET_PDEATHSIG: Final = 1


def _die_with_parent() -> None:
    """In a child, before exec: SIGTERM when the supervisor dies, however it dies."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: the daemon then outlives a SIGKILLed supervisor


class Stop(Exception):
    """A signal came before CMD started: stop everything, run nothing."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def fail(message: str) -> None:
    sys.stderr.write(f"{message}\n")


class Children:
    """The daemon and the proxy: started in a session of their own, stopped at the end."""

    def __init__(self, *, quiet: bool) -> None:
        self.processes: list[subprocess.Popen[bytes]] = []
        # their log goes to our stderr only when asked for (--log-level): by default a
        # failure is our one line, with the daemon's reason
        self.stderr = subprocess.DEVNULL if quiet else None

    def start(self, argv: list[str], environment: dict[str, str]) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(argv, env=environment, stdin=subprocess.DEVNULL,
                                   stdout=self.stderr, stderr=self.stderr,
                                   start_new_session=True, preexec_fn=_die_with_parent)
        self.processes.append(process)
        return process

    def stop(self) -> None:
        for process in reversed(self.processes):  # the proxy first: it is the daemon's client
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT
        for process in self.processes:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def wait_for_login(socket: Path, daemon: subprocess.Popen[bytes]) -> str | None:
    """None once the daemon holds a token; else why not (one line)."""
    deadline = time.monotonic() + LOGIN_TIMEOUT
    while True:
        if daemon.poll() is not None:
            return f"vm-tokend exited with {daemon.returncode} before its first login"
        left = deadline - time.monotonic()
        if left <= 0:
            return f"no login within {LOGIN_TIMEOUT:.0f} s"
        try:
            with vm_token.Client(socket, timeout=left) as client:
                client.get_token()  # waits for the login in flight
            return None
        except vm_token.DaemonError as exc:
            return f"{exc.message} ({exc.code})"
        except vm_token.Error:
            time.sleep(0.05)  # not listening yet


def wait_for_file(path: Path, process: subprocess.Popen[bytes], what: str) -> str | None:
    deadline = time.monotonic() + LOGIN_TIMEOUT
    while not path.exists():
        if process.poll() is not None:
            return f"{what} exited with {process.returncode} before it listened"
        if time.monotonic() > deadline:
            return f"{what} did not listen within {LOGIN_TIMEOUT:.0f} s"
        time.sleep(0.02)
    return None


def make_directory(environ: dict[str, str]) -> Path:
    """A fresh private directory (0700) in $XDG_RUNTIME_DIR, else the temporary one."""
    runtime = environ.get("XDG_RUNTIME_DIR")
    parent = runtime if runtime and Path(runtime).is_dir() else None
    return Path(tempfile.mkdtemp(prefix="vm-token-run-", dir=parent))
