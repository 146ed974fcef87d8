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
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from types import FrameType

from .config.environment import ENV_PREFIX, process_environment
from .private import (
    EXIT_FAILED,
    FORWARDED,
    Children,
    Stop,
    fail,
    make_directory,
    wait_for_file,
    wait_for_login,
)

__all__ = ["run"]

def run(argv: list[str], daemon_parser: Callable[[], argparse.ArgumentParser]) -> int:
    split = argv.index("--") if "--" in argv else len(argv)
    own, command = argv[:split], argv[split + 1:]
    parser = daemon_parser()
    parser.prog = "vm-tokend run"
    parser.description = (
        "Run CMD under a vm-tokend of its own: a fresh private directory, the daemon (and "
        "with --proxy the API proxy) started there with the options given, CMD started once "
        "the first login succeeded, with VM_TOKEN_SOCKET (and VM_TOKEN_PROXY_SOCKET) set. "
        "Exits with CMD's status; stops the daemon and removes the directory however it ends.")
    parser.epilog = "example:\n  VM_TOKEN_PASSWORD=… vm-tokend run --username ci@example.com " \
                    "-- ./deploy.sh"
    parser.add_argument("--proxy", action="store_true",
                        help="also run `vm-tokend proxy` (VM_TOKEN_PROXY_SOCKET)")
    if "--" not in argv and not {"-h", "--help", "--version"} & set(argv):
        parser.error("give the command to run after `--`")
    args = parser.parse_args(own)
    if not command:
        parser.error("give the command to run after `--`")
    if args.socket is not None:
        parser.error("--socket: `run` makes a private socket of its own")
    daemon_flags = [flag for flag in own if flag != "--proxy"]

    environ = dict(process_environment())
    directory = make_directory(environ)
    socket = directory / "socket"
    proxy_socket = directory / "proxy"
    children = Children(quiet=args.log_level is None
                         and f"{ENV_PREFIX}LOG_LEVEL" not in environ)
    cmd: subprocess.Popen[bytes] | None = None

    def forward(signum: int, frame: FrameType | None) -> None:
        if cmd is None:
            raise Stop(signum)  # out of the wait for the login, into the clean-up
        if cmd.poll() is None:
            cmd.send_signal(signum)

    previous = {signum: signal.signal(signum, forward) for signum in FORWARDED}
    try:
        environment = {**environ, f"{ENV_PREFIX}SOCKET": str(socket)}
        executable = [sys.executable, "-m", "vm_tokend"]
        daemon = children.start([*executable, *daemon_flags, "--socket", str(socket)],
                                environment)
        problem = wait_for_login(socket, daemon)
        if problem is None and args.proxy:
            proxy = children.start([*executable, "proxy", "--socket", str(proxy_socket),
                                    "--daemon-socket", str(socket)], environment)
            problem = wait_for_file(proxy_socket, proxy, "vm-tokend proxy")
        if problem is not None:
            fail(f"vm-tokend run: {problem}")
            return EXIT_FAILED
        cmd_environment = {name: value for name, value in environment.items()
                           if name != f"{ENV_PREFIX}PASSWORD"}
        if args.proxy:
            cmd_environment[f"{ENV_PREFIX}PROXY_SOCKET"] = str(proxy_socket)
        try:
            cmd = subprocess.Popen(command, env=cmd_environment)
        except OSError as exc:
            fail(f"vm-tokend run: cannot run {command[0]}: {exc.strerror or exc}")
            return 127 if isinstance(exc, FileNotFoundError) else 126
        status = cmd.wait()
        return 128 - status if status < 0 else status
    except Stop as stop:  # before CMD ran: it never will
        return 128 + stop.signum
    finally:
        for signum in FORWARDED:  # a signal now must not cut the clean-up short
            signal.signal(signum, signal.SIG_IGN)
        children.stop()
        shutil.rmtree(directory, ignore_errors=True)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
