"""`vm-tokend run [--proxy] [daemon options] -- CMD [ARGS...]`: CMD under a daemon of its
own, as `ssh-agent CMD` runs a command under an agent that dies with it.

A fresh private directory (0700, in $XDG_RUNTIME_DIR or the system's temporary directory)
holds the daemon's socket (and the proxy's). The daemon starts there with the options
given; CMD starts only once the first login has succeeded (a failure: one line, the
daemon's reason, exit 1, CMD never run), with VM_TOKEN_SOCKET (and VM_TOKEN_PROXY_SOCKET)
in its environment and VM_TOKEN_PASSWORD not: CMD asks the daemon, it needs no password.
SIGINT, SIGTERM and SIGHUP are passed on to CMD; its exit status is ours (128+N when a
signal N ended it). However it ends, the daemon and the proxy are stopped and the
directory is removed. They run in a session of their own, so that a terminal's Ctrl-C
reaches CMD and not them, and die with us (PR_SET_PDEATHSIG) should we be killed.

A supervisor with blocking calls and signal handlers: no event loop is needed to wait for
three children.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Final

import vm_token

from .config.environment import ENV_PREFIX, process_environment

__all__ = ["run"]

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


class _Stop(Exception):
    """A signal came before CMD started: stop everything, run nothing."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _fail(message: str) -> None:
    sys.stderr.write(f"vm-tokend run: {message}\n")


class _Children:
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


def _wait_for_login(socket: Path, daemon: subprocess.Popen[bytes]) -> str | None:
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


def _wait_for_file(path: Path, process: subprocess.Popen[bytes], what: str) -> str | None:
    deadline = time.monotonic() + LOGIN_TIMEOUT
    while not path.exists():
        if process.poll() is not None:
            return f"{what} exited with {process.returncode} before it listened"
        if time.monotonic() > deadline:
            return f"{what} did not listen within {LOGIN_TIMEOUT:.0f} s"
        time.sleep(0.02)
    return None


def _runtime_parent(environ: dict[str, str]) -> str | None:
    runtime = environ.get("XDG_RUNTIME_DIR")
    return runtime if runtime and os.path.isdir(runtime) else None


def run(argv: list[str], daemon_parser: Callable[[], argparse.ArgumentParser]) -> int:
    if "--" not in argv:
        _fail("give the command to run after `--` (see vm-tokend run --help)")
        return EXIT_USAGE
    split = argv.index("--")
    own, command = argv[:split], argv[split + 1:]
    parser = daemon_parser()
    parser.prog = "vm-tokend run"
    parser.description = (
        "Run CMD under a vm-tokend of its own: a fresh private directory, the daemon (and "
        "with --proxy the API proxy) started there with the options given, CMD started once "
        "the first login succeeded, with VM_TOKEN_SOCKET (and VM_TOKEN_PROXY_SOCKET) set. "
        "Exits with CMD's status; stops the daemon and removes the directory however it ends.")
    parser.epilog = "example: VM_TOKEN_PASSWORD=… vm-tokend run --username ci@example.com " \
                    "-- ./deploy.sh"
    parser.add_argument("--proxy", action="store_true",
                        help="also run `vm-tokend proxy` (VM_TOKEN_PROXY_SOCKET)")
    args = parser.parse_args(own)
    if not command:
        parser.error("no command after `--`")
    if args.socket is not None:
        parser.error("--socket: `run` makes a private socket of its own")
    daemon_flags = [flag for flag in own if flag != "--proxy"]

    environ = dict(process_environment())
    directory = Path(tempfile.mkdtemp(prefix="vm-token-run-", dir=_runtime_parent(environ)))
    socket = directory / "socket"
    proxy_socket = directory / "proxy"
    children = _Children(quiet=args.log_level is None
                         and f"{ENV_PREFIX}LOG_LEVEL" not in environ)
    cmd: subprocess.Popen[bytes] | None = None

    def forward(signum: int, frame: FrameType | None) -> None:
        if cmd is None:
            raise _Stop(signum)  # out of the wait for the login, into the clean-up
        if cmd.poll() is None:
            cmd.send_signal(signum)

    previous = {signum: signal.signal(signum, forward) for signum in FORWARDED}
    try:
        environment = {**environ, f"{ENV_PREFIX}SOCKET": str(socket)}
        executable = [sys.executable, "-m", "vm_tokend"]
        daemon = children.start([*executable, *daemon_flags, "--socket", str(socket)],
                                environment)
        problem = _wait_for_login(socket, daemon)
        if problem is None and args.proxy:
            proxy = children.start([*executable, "proxy", "--socket", str(proxy_socket),
                                    "--daemon-socket", str(socket)], environment)
            problem = _wait_for_file(proxy_socket, proxy, "vm-tokend proxy")
        if problem is not None:
            _fail(problem)
            return EXIT_FAILED
        cmd_environment = {name: value for name, value in environment.items()
                           if name != f"{ENV_PREFIX}PASSWORD"}
        if args.proxy:
            cmd_environment[f"{ENV_PREFIX}PROXY_SOCKET"] = str(proxy_socket)
        try:
            cmd = subprocess.Popen(command, env=cmd_environment)
        except OSError as exc:
            _fail(f"cannot run {command[0]}: {exc.strerror or exc}")
            return 127 if isinstance(exc, FileNotFoundError) else 126
        status = cmd.wait()
        return 128 - status if status < 0 else status
    except _Stop as stop:  # before CMD ran: it never will
        return 128 + stop.signum
    finally:
        for signum in FORWARDED:  # a signal now must not cut the clean-up short
            signal.signal(signum, signal.SIG_IGN)
        children.stop()
        shutil.rmtree(directory, ignore_errors=True)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
