"""`vm-tokend start` and `vm-tokend stop`: a private daemon for CI runners whose steps are
separate shells (`eval "$(ssh-agent -s)"` and `ssh-agent -k`, for tokens).

`start` makes a private directory, starts a supervisor there in a session of its own, and
returns once the first login succeeded, printing what the next steps need
(VM_TOKEN_SOCKET, VM_TOKEN_PID, and with --proxy VM_TOKEN_PROXY_SOCKET) as sh, csh,
`NAME=value` lines (GitHub's $GITHUB_ENV, `docker --env-file`) or JSON. A failed login
is one line and exit 1, with nothing left running. The supervisor (`vm-tokend _supervise`,
not for people) runs the daemon (and the proxy), and on SIGTERM, or when --lifetime runs
out, or when the daemon ends, stops them and removes the directory. `stop` sends it
SIGTERM — only once the process VM_TOKEN_PID names is that supervisor, of that socket's
directory — and waits until it is gone.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from .config.environment import ENV_PREFIX, process_environment
from .private import (
    EXIT_FAILED,
    EXIT_USAGE,
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
from .systemd import harden_process

__all__ = ["start", "stop", "supervise"]

SUPERVISE: Final = "_supervise"
# How long `stop` waits for the supervisor to stop the daemon and remove its directory.
STOP_WAIT: Final = 30.0
FORMATS: Final = ("sh", "csh", "env", "json")


def _variables(directory: Path, pid: int, proxy: bool) -> dict[str, str]:
    names = {f"{ENV_PREFIX}SOCKET": str(directory / "socket"), f"{ENV_PREFIX}PID": str(pid)}
    if proxy:
        names[f"{ENV_PREFIX}PROXY_SOCKET"] = str(directory / "proxy")
    return names


def _render(variables: dict[str, str], form: str) -> str:
    if form == "json":
        return json.dumps(variables) + "\n"
    if form == "env":
        return "".join(f"{name}={value}\n" for name, value in variables.items())
    if form == "csh":
        return "".join(f"setenv {name} {shlex.quote(value)};\n"
                       for name, value in variables.items())
    return "".join(f"{name}={shlex.quote(value)}; export {name};\n"
                   for name, value in variables.items())


def start(argv: list[str], daemon_parser: Callable[[], argparse.ArgumentParser]) -> int:
    parser = daemon_parser()
    parser.prog = "vm-tokend start"
    parser.description = (
        "Start a vm-tokend of its own in the background, in a fresh private directory, and "
        "print, once its first login succeeded, what later steps need: VM_TOKEN_SOCKET and "
        "VM_TOKEN_PID (and VM_TOKEN_PROXY_SOCKET with --proxy). `vm-tokend stop` ends it.")
    parser.epilog = ('examples:\n  eval "$(vm-tokend start --sh)"\n'
                     '  vm-tokend start --env --lifetime 3600 >> "$GITHUB_ENV"')
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    shape = parser.add_mutually_exclusive_group()
    for form in FORMATS:
        shape.add_argument(f"--{form}", dest="form", action="store_const", const=form,
                           help={"sh": "sh/bash/zsh commands to eval (the default)",
                                 "csh": "csh/tcsh commands to eval",
                                 "env": "NAME=value lines ($GITHUB_ENV, docker --env-file)",
                                 "json": "one JSON object"}[form])
    parser.add_argument("--lifetime", type=float, metavar="S",
                        help="stop by itself after S seconds (as ssh-agent -t)")
    parser.allow_abbrev = False  # what is not ours goes to the daemon: no guessing
    parser.add_argument("--proxy", action="store_true", help="also run `vm-tokend proxy`")
    args = parser.parse_args(argv)
    if args.socket is not None:
        parser.error("--socket: `start` makes a private socket of its own")
    if args.lifetime is not None and not 0 < args.lifetime < 10 ** 7:
        parser.error("--lifetime: a number of seconds above 0")
    daemon_flags = _daemon_flags(argv)
    environ = dict(process_environment())
    # the password goes to the supervisor on its stdin, not in an environment a later
    # step could read from /proc/$VM_TOKEN_PID/environ
    password = environ.pop(f"{ENV_PREFIX}PASSWORD", None)
    mask = block_signals()  # taken at points of our choosing, never mid-fork
    directory = make_directory(environ)
    supervisor: subprocess.Popen[bytes] | None = None
    try:
        supervisor = subprocess.Popen(
            [sys.executable, "-m", "vm_tokend", SUPERVISE, str(directory),
             str(args.lifetime or 0), "proxy" if args.proxy else "-", "--", *daemon_flags],
            env=environ, stdin=subprocess.PIPE,
            # never our stdout or stderr: a capture of them would not end while it runs;
            # a pipe of its own says why it ended, if it ends before the login
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True, preexec_fn=child_setup(die_with_parent=False))
        assert supervisor.stdin is not None
        try:
            with supervisor.stdin:
                supervisor.stdin.write(f"{password or ''}\n".encode())
        except BrokenPipeError:
            pass  # it is gone already: the wait below says so
        log = Children(directory / LOG_NAME)  # what the supervisor's children wrote
        problem = wait_for_login(directory / "socket", supervisor, log)
        if problem is None and args.proxy:
            problem = wait_for_file(directory / "proxy", supervisor, "vm-tokend proxy")
        if problem is None:
            try:
                sys.stdout.write(_render(_variables(directory, supervisor.pid, args.proxy),
                                         args.form or "sh"))
                sys.stdout.flush()
            except OSError as exc:
                problem = f"cannot write what it started: {exc.strerror or exc}"
        if problem is not None:
            assert supervisor.stderr is not None
            if supervisor.poll() is not None:  # it ended: what it said is all there
                said = supervisor.stderr.read().decode(errors="replace").strip()
                problem += f": {said}" if said and said not in problem else ""
            fail(f"vm-tokend start: {problem}")
            return EXIT_FAILED
        assert supervisor.stderr is not None
        supervisor.stderr.close()  # it writes there no more once logged in
        supervisor.returncode = 0  # it runs on without us: no "still running" at exit
        supervisor = None
        return 0
    except Stop as stop:
        return 128 + stop.signum
    finally:
        if supervisor is not None:  # it did not start, or we stop: it cleans up
            supervisor.terminate()
            supervisor.wait()
            if supervisor.stderr is not None:
                supervisor.stderr.close()
            shutil.rmtree(directory, ignore_errors=True)
        restore_signals(mask)


def _daemon_flags(argv: list[str]) -> list[str]:
    """The daemon's options of `start`'s: without start's own."""
    flags: list[str] = []
    skip = False
    for flag in argv:
        if skip:
            skip = False
            continue
        if flag in {f"--{form}" for form in FORMATS} | {"--proxy"}:
            continue
        if flag == "--lifetime":
            skip = True
            continue
        if flag.startswith("--lifetime="):
            continue
        flags.append(flag)
    return flags


def supervise(argv: list[str]) -> int:
    """`_supervise DIRECTORY LIFETIME proxy|- -- DAEMON_FLAGS…` (the password, if any, on
    stdin): run the daemon (and the proxy) until SIGTERM, the lifetime, or the daemon's
    end; then stop them and remove the directory."""
    if len(argv) < 4 or argv[3] != "--":
        fail("vm-tokend _supervise: for `vm-tokend start` only")
        return EXIT_USAGE
    directory, lifetime, proxy = Path(argv[0]), float(argv[1]), argv[2] == "proxy"
    mask = block_signals()
    harden_process()  # it holds the password: no ptrace, no core file
    password = sys.stdin.readline().rstrip("\n")
    environ = dict(process_environment())
    daemon_environ = {**environ, f"{ENV_PREFIX}PASSWORD": password} if password else environ
    children = Children(directory / LOG_NAME)
    status = 0
    try:
        executable = [sys.executable, "-m", "vm_tokend"]
        daemon = children.start([*executable, *argv[4:], "--socket",
                                 str(directory / "socket")], daemon_environ)
        if proxy:  # it asks the daemon: no password
            children.start([*executable, "proxy", "--socket", str(directory / "proxy"),
                            "--daemon-socket", str(directory / "socket")], environ)
        deadline = time.monotonic() + lifetime if lifetime else math.inf
        while True:
            left = min(deadline - time.monotonic(), 3600.0)
            if left <= 0:
                break  # --lifetime
            info = signal.sigtimedwait({*FORWARDED, signal.SIGCHLD}, left)
            if info is not None and info.si_signo in FORWARDED:
                break  # vm-tokend stop
            if daemon.poll() is not None:
                status = daemon.returncode  # it ended by itself: its status, and why
                try:
                    sys.stderr.write(children.reason() + "\n")
                    sys.stderr.flush()
                except OSError:
                    pass  # start is gone: nobody to tell
                break
    finally:
        children.stop()
        shutil.rmtree(directory, ignore_errors=True)
        restore_signals(mask)
    return status


def _supervisor_of(pid: int, directory: Path) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        owner = Path(f"/proc/{pid}").stat().st_uid
    except OSError:
        return False  # gone
    return SUPERVISE.encode() in cmdline and str(directory).encode() in cmdline \
        and owner == os.getuid()


def stop(argv: list[str], parser_class: type[argparse.ArgumentParser]) -> int:
    parser = parser_class(
        prog="vm-tokend stop",
        description="Stop the vm-tokend that `vm-tokend start` started, named by "
                    "VM_TOKEN_PID and VM_TOKEN_SOCKET, and remove its directory.")
    parser.parse_args(argv)
    environ = process_environment()
    pid_text, socket = environ.get(f"{ENV_PREFIX}PID"), environ.get(f"{ENV_PREFIX}SOCKET")
    if not pid_text or not pid_text.isdigit() or not socket:
        fail("vm-tokend stop: VM_TOKEN_PID and VM_TOKEN_SOCKET name no vm-tokend start'ed "
             "here (set them as `vm-tokend start` printed)")
        return EXIT_FAILED
    pid, directory = int(pid_text), Path(socket).parent
    if not _supervisor_of(pid, directory):
        if not directory.exists():
            return 0  # stopped already (--lifetime, or an earlier stop)
        fail(f"vm-tokend stop: process {pid} is not the vm-tokend started for {directory}")
        return EXIT_FAILED
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_WAIT
    while _supervisor_of(pid, directory) or directory.exists():
        if time.monotonic() > deadline:
            fail(f"vm-tokend stop: process {pid} did not stop within {STOP_WAIT:.0f} s")
            return EXIT_FAILED
        time.sleep(0.05)
    return 0
