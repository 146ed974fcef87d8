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
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable

from .config.environment import ENV_PREFIX, process_environment
from .private import (
    EXIT_FAILED,
    FORWARDED,
    LOG_NAME,
    Children,
    Stop,
    block_signals,
    child_setup,
    fail,
    make_directory,
    restore_signals,
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
    parser.allow_abbrev = False  # what is not ours goes to the daemon: no guessing
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
    verbose = args.log_level is not None or f"{ENV_PREFIX}LOG_LEVEL" in environ

    mask = block_signals()  # taken with sigwaitinfo, never as an exception mid-fork
    directory = make_directory(environ)
    socket = directory / "socket"
    proxy_socket = directory / "proxy"
    children = Children(None if verbose else directory / LOG_NAME)
    try:
        environment = {**environ, f"{ENV_PREFIX}SOCKET": str(socket)}
        without_password = {name: value for name, value in environment.items()
                            if name != f"{ENV_PREFIX}PASSWORD"}
        executable = [sys.executable, "-m", "vm_tokend"]
        daemon = children.start([*executable, *daemon_flags, "--socket", str(socket)],
                                environment)
        problem = wait_for_login(socket, daemon, children)
        if problem is None and args.proxy:  # the proxy needs no password: it asks the daemon
            proxy = children.start([*executable, "proxy", "--socket", str(proxy_socket),
                                    "--daemon-socket", str(socket)], without_password)
            problem = wait_for_file(proxy_socket, proxy, "vm-tokend proxy")
        if problem is not None:
            fail(f"vm-tokend run: {problem}")
            return EXIT_FAILED
        if args.proxy:
            without_password[f"{ENV_PREFIX}PROXY_SOCKET"] = str(proxy_socket)
        try:
            cmd = subprocess.Popen(command, env=without_password,
                                   preexec_fn=child_setup(die_with_parent=False))
        except OSError as exc:
            fail(f"vm-tokend run: cannot run {command[0]}: {exc.strerror or exc}")
            return 127 if isinstance(exc, FileNotFoundError) else 126
        return _until_done(cmd)
    except Stop as stop:  # before CMD ran: it never will
        return 128 + stop.signum
    finally:
        children.stop()
        shutil.rmtree(directory, ignore_errors=True)
        restore_signals(mask)


def _until_done(cmd: subprocess.Popen[bytes]) -> int:
    """Pass stop signals on to CMD until it ends; its status (128+N for signal N). A
    signal the terminal sent our whole process group (Ctrl-C: the kernel's, no sender)
    reached CMD too, and is not sent twice."""
    ours = os.getpgrp()
    while True:
        info = signal.sigwaitinfo({*FORWARDED, signal.SIGCHLD})
        if info.si_signo != signal.SIGCHLD:
            try:
                from_terminal = info.si_pid == 0 and os.getpgid(cmd.pid) == ours
            except ProcessLookupError:  # CMD ended meanwhile
                from_terminal = True
            if not from_terminal and cmd.poll() is None:
                cmd.send_signal(info.si_signo)
        status = cmd.poll()
        if status is not None:
            return 128 - status if status < 0 else status
