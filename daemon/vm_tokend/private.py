"""A vm-tokend of its own in a private directory, for `vm-tokend run` and `start`: the
directory (0700, in $XDG_RUNTIME_DIR or the system's temporary directory), the daemon
(and proxy) processes in sessions of their own, the wait for the first login, the stop.

Signals: the supervisors (run, start, _supervise) keep SIGINT, SIGTERM, SIGHUP (and
SIGCHLD) blocked and take them with sigwaitinfo() or sigpending() at points of their
choosing, never as an exception inside a fork or a clean-up. Children start with
nothing blocked.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

import vm_token

__all__ = ["EXIT_FAILED", "EXIT_USAGE", "FORWARDED", "LOG_NAME", "Children", "Stop",
           "block_signals", "child_setup", "fail", "make_directory", "restore_signals",
           "stop_requested",
           "wait_for_file", "wait_for_login"]

EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
# How long the first login may take before it is given up on (a login is a few requests
# of at most 15 s each, see upstream/base.py; a slow provider may need all of them).
LOGIN_TIMEOUT: Final = 90.0
# One wait of the client for the login: between them, a stop signal is looked for.
LOGIN_POLL: Final = 0.5
# How long the daemon and the proxy get to stop on SIGTERM before SIGKILL.
STOP_TIMEOUT: Final = 15.0
FORWARDED: Final = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# The children's log, in the private directory (removed with it): what the daemon said
# when it could not start is in the one line we print.
LOG_NAME: Final = "vm-tokend.log"
_PR_SET_PDEATHSIG: Final = 1


class Stop(Exception):
    """A stop signal came before the command ran: stop everything, run nothing."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def fail(message: str) -> None:
    sys.stderr.write(f"{message}\n")


def block_signals() -> set[int]:
    """Block the stop signals and SIGCHLD in this (single-threaded) process; the mask as
    it was."""
    return signal.pthread_sigmask(signal.SIG_BLOCK, {*FORWARDED, signal.SIGCHLD})


def restore_signals(mask: set[int]) -> None:
    """Unblock as before, with the stop signals that came meanwhile taken first: one of
    them must not kill us once unblocked."""
    while stop_requested() is not None:
        pass
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def stop_requested() -> int | None:
    """A pending stop signal, taken (None: none)."""
    pending = signal.sigpending() & set(FORWARDED)
    if not pending:
        return None
    info = signal.sigtimedwait(pending, 0)
    return info.si_signo if info is not None else None


def child_setup(*, die_with_parent: bool) -> Callable[[], None]:
    """What a child does between fork and exec: nothing blocked (the mask is inherited),
    and, for the daemon and the proxy, SIGTERM when we die, however we die — checked
    against the parent it was forked from, who may already be gone."""
    parent = os.getpid()

    def setup() -> None:
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        if not die_with_parent:
            return
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        except (OSError, AttributeError):
            return  # not Linux: the daemon then outlives a SIGKILLed supervisor
        if os.getppid() != parent:  # died before the request was made: too late for it
            os._exit(1)

    return setup


def make_directory(environ: dict[str, str]) -> Path:
    """A fresh private directory (0700) in $XDG_RUNTIME_DIR, else the temporary one."""
    runtime = environ.get("XDG_RUNTIME_DIR")
    parent = runtime if runtime and Path(runtime).is_dir() else None
    return Path(tempfile.mkdtemp(prefix="vm-token-run-", dir=parent))


class Children:
    """The daemon and the proxy: each in a session of its own (a terminal's Ctrl-C is not
    theirs), stopped at the end with everything they started (the password command's
    children too). Their output goes to `log` (a file), or to our stderr when None."""

    def __init__(self, log: Path | None) -> None:
        self.processes: list[subprocess.Popen[bytes]] = []
        self.log = log

    def start(self, argv: list[str], environment: dict[str, str]) -> subprocess.Popen[bytes]:
        output = self.log.open("ab") if self.log is not None else None
        try:
            process = subprocess.Popen(argv, env=environment, stdin=subprocess.DEVNULL,
                                       stdout=output, stderr=output, start_new_session=True,
                                       preexec_fn=child_setup(die_with_parent=True))
        finally:
            if output is not None:
                output.close()
        self.processes.append(process)
        return process

    def stop(self) -> None:
        for process in reversed(self.processes):  # the proxy first: it is the daemon's client
            _signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for process in self.processes:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            _signal_group(process, signal.SIGKILL)  # what it started and left behind

    def reason(self) -> str:
        """The last line the children wrote, for a one-line error."""
        if self.log is None:
            return ""
        try:
            lines = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return lines[-1].split(" ERROR ", 1)[-1].strip() if lines else ""


def _signal_group(process: subprocess.Popen[bytes], signum: int) -> None:
    try:
        os.killpg(process.pid, signum)  # its session's group: its pid
    except (ProcessLookupError, PermissionError):
        pass


def wait_for_login(socket: Path, daemon: subprocess.Popen[bytes],
                   children: Children) -> str | None:
    """None once the daemon holds a token; else why not (one line). Stop when a stop
    signal is pending."""
    deadline = time.monotonic() + LOGIN_TIMEOUT
    while True:
        signum = stop_requested()
        if signum is not None:
            raise Stop(signum)
        if daemon.poll() is not None:
            said = children.reason()
            return f"vm-tokend exited with {daemon.returncode} before its first login" + \
                (f": {said}" if said else "")
        if time.monotonic() > deadline:
            return f"no login within {LOGIN_TIMEOUT:.0f} s"
        try:
            # our own daemon: not the one $VM_TOKEN_DAEMON_UID may name for CMD
            with vm_token.Client(socket, timeout=LOGIN_POLL,
                                 daemon_uid=os.getuid()) as client:
                client.get_token()  # waits for the login in flight, a while at a time
            return None
        except vm_token.DaemonError as exc:
            return f"{exc.message} ({exc.code})"
        except vm_token.Error:
            time.sleep(0.05)  # not listening yet, or the login goes on


def wait_for_file(path: Path, process: subprocess.Popen[bytes], what: str) -> str | None:
    deadline = time.monotonic() + LOGIN_TIMEOUT
    while not path.exists():
        signum = stop_requested()
        if signum is not None:
            raise Stop(signum)
        if process.poll() is not None:
            return f"{what} exited with {process.returncode} before it listened"
        if time.monotonic() > deadline:
            return f"{what} did not listen within {LOGIN_TIMEOUT:.0f} s"
        time.sleep(0.02)
    return None
