"""The stand-in API and a real vm-tokend process, for benchmarks."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import vm_token
from standin.server import StandIn

BIN = Path(sys.executable).parent


def child_env(**extra: str) -> dict[str, str]:
    """The environment for measured processes.

    Without PYTHONDONTWRITEBYTECODE, which some shells here set: a pip-installed vm-token
    has its bytecode compiled at install time, and a benchmark that recompiled every module
    on every run would measure the compiler, not vm-token.
    """
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("VM_TOKEN_") and k != "PYTHONDONTWRITEBYTECODE"}
    env.update(extra)
    return env


@contextmanager
def bare_server(reply: bytes) -> Iterator[Path]:
    """bench.bare in its own process, answering every request with `reply`; its socket."""
    workdir = Path(tempfile.mkdtemp(prefix="vmt-bare-"))
    path = workdir / "socket"
    process = subprocess.Popen([sys.executable, "-m", "bench.bare", str(path), reply.hex()],
                               stdout=subprocess.PIPE, text=True, env=child_env())
    try:
        assert process.stdout is not None
        if process.stdout.readline().strip() != "ready":
            raise SystemExit("bench: the bare server did not start")
        yield path
    finally:
        process.terminate()
        process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()
        shutil.rmtree(workdir, ignore_errors=True)


def raise_fd_limit(wanted: int = 8192) -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))


@dataclass
class Running:
    standin: StandIn
    socket: Path
    env: dict[str, str]
    process: subprocess.Popen[bytes]


def daemon_env(standin: StandIn, workdir: Path) -> tuple[dict[str, str], Path]:
    """The environment for a vm-tokend against `standin`, and its socket in `workdir`."""
    socket = workdir / "vm-token" / "socket"
    env = child_env(
        XDG_CONFIG_HOME=str(workdir / "config"),
        VM_TOKEN_SOCKET=str(socket),
        VM_TOKEN_API_URL=standin.url,
        VM_TOKEN_USERNAME=standin.username,
        VM_TOKEN_PASSWORD=standin.password,
        VM_TOKEN_LOG_LEVEL="warning",  # noqa: S106 - a log level, not a secret
    )
    return env, socket


@contextmanager
def daemon(extra_env: dict[str, str] | None = None,
           **standin_options: object) -> Iterator[Running]:
    workdir = Path(tempfile.mkdtemp(prefix="vmt-bench-"))
    standin = StandIn(**standin_options).start()  # type: ignore[arg-type]
    env, socket = daemon_env(standin, workdir)
    env.update(extra_env or {})
    process = subprocess.Popen([str(BIN / "vm-tokend")], env=env)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                vm_token.get_token(socket=socket, timeout=1)
                break
            except vm_token.Error:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise SystemExit("bench: vm-tokend did not start") from None
                time.sleep(0.02)
        yield Running(standin, socket, env, process)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=10)
        standin.stop()
        shutil.rmtree(workdir, ignore_errors=True)
