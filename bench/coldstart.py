"""Cold start: from starting vm-tokend to the first token served (login included)."""

from __future__ import annotations

import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import vm_token
from bench.harness import BIN, daemon_env
from standin.server import StandIn

RUNS = 5


def _once(standin: StandIn) -> float:
    workdir = Path(tempfile.mkdtemp(prefix="vmt-cold-"))
    env, socket = daemon_env(standin, workdir)
    started = time.perf_counter()
    process = subprocess.Popen([str(BIN / "vm-tokend")], env=env)
    try:
        while True:
            try:
                vm_token.get_token(socket=socket, timeout=5)
                return time.perf_counter() - started
            except (vm_token.DaemonNotRunning, vm_token.ProtocolError):
                if process.poll() is not None or time.perf_counter() - started > 30:
                    raise SystemExit("bench: vm-tokend did not start") from None
                time.sleep(0.002)
    finally:
        process.terminate()
        process.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)


def measure(runs: int = RUNS) -> float:
    """Median seconds from process start to the first token, over `runs` starts."""
    with StandIn() as standin:
        _once(standin)  # warm the bytecode caches, as after an install
        return statistics.median(_once(standin) for _ in range(runs))
