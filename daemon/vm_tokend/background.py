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
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Final

from .config.environment import ENV_PREFIX, process_environment
from .private import (
    EXIT_FAILED,
    EXIT_USAGE,
    FORWARDED,
    Children,
    Stop,
    fail,
    make_directory,
    wait_for_file,
    wait_for_login,
)

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
    parser.add_argument("--proxy", action="store_true", help="also run `vm-tokend proxy`")
    args = parser.parse_args(argv)
    if args.socket is not None:
        parser.error("--socket: `start` makes a private socket of its own")
    if args.lifetime is not None and not 0 < args.lifetime < 10 ** 7:
        parser.error("--lifetime: a number of seconds above 0")
    daemon_flags = _daemon_flags(argv)
    environ = dict(process_environment())
    quiet = args.log_level is None and f"{ENV_PREFIX}LOG_LEVEL" not in environ
    directory = make_directory(environ)
    supervisor = subprocess.Popen(
        [sys.executable, "-m", "vm_tokend", SUPERVISE, str(directory),
         str(args.lifetime or 0), "proxy" if args.proxy else "-", "--", *daemon_flags],
        env=environ, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,  # not our stdout:
        stderr=subprocess.DEVNULL if quiet else None,  # $(vm-tokend start) would never end
        start_new_session=True)
    problem = wait_for_login(directory / "socket", supervisor)
    if problem is None and args.proxy:
        problem = wait_for_file(directory / "proxy", supervisor, "vm-tokend proxy")
    if problem is not None:
        supervisor.terminate()
        supervisor.wait()
        shutil.rmtree(directory, ignore_errors=True)
        fail(f"vm-tokend start: {problem}")
        return EXIT_FAILED
    sys.stdout.write(_render(_variables(directory, supervisor.pid, args.proxy),
                             args.form or "sh"))
    supervisor.returncode = 0  # it runs on without us: no "still running" warning at exit
    return 0


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
    """`_supervise DIRECTORY LIFETIME proxy|- -- DAEMON_FLAGS…`: run the daemon (and the
    proxy) until SIGTERM, the lifetime, or the daemon's end; then stop and clean up."""
    if len(argv) < 4 or argv[3] != "--":
        fail("vm-tokend _supervise: for `vm-tokend start` only")
        return EXIT_USAGE
    directory, lifetime, proxy = Path(argv[0]), float(argv[1]), argv[2] == "proxy"
    environ = dict(process_environment())
    children = Children(quiet=False)  # our stderr is already what start chose

    def stopping(signum: int, frame: FrameType | None) -> None:
        raise Stop(signum)

    for signum in FORWARDED:
        signal.signal(signum, stopping)
    status = 0
    try:
        executable = [sys.executable, "-m", "vm_tokend"]
        daemon = children.start([*executable, *argv[4:], "--socket",
                                 str(directory / "socket")], environ)
        if proxy:
            children.start([*executable, "proxy", "--socket", str(directory / "proxy"),
                            "--daemon-socket", str(directory / "socket")], environ)
        status = daemon.wait(timeout=lifetime or None)  # it ended by itself: its status
    except (Stop, subprocess.TimeoutExpired):
        pass
    finally:
        for signum in FORWARDED:  # a signal now must not cut the clean-up short
            signal.signal(signum, signal.SIG_IGN)
        children.stop()
        shutil.rmtree(directory, ignore_errors=True)
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
