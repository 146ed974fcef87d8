"""Start-up: `vm-token token` against a running daemon, next to what it cannot beat.

Every command runs many times, interleaved (A B C A B C ...) so that a noisy neighbour
hurts all of them alike; we report medians and the ratios between them, measured in the
same run. Target: `vm-token token` at most 1.5 x `python -I -c pass` with the same
interpreter.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.harness import BIN, Running

RUNS = 60
WARMUP = 3
TARGET = 1.5


def _time(args: list[str], env: dict[str, str], stdin: bytes | None) -> float:
    started = time.perf_counter()
    subprocess.run(args, input=stdin, stdout=subprocess.DEVNULL, env=env, check=True)
    return time.perf_counter() - started


def measure(running: Running, runs: int = RUNS) -> dict[str, float]:
    """Median wall time in seconds of each command, by name."""
    cache_dir = Path(tempfile.mkdtemp(prefix="vmt-cache-"))
    commands: dict[str, tuple[list[str], bytes | None]] = {
        "python -I -c pass": ([sys.executable, "-I", "-c", "pass"], None),
        "vm-token token": ([str(BIN / "vm-token"), "token"], None),
    }
    git = shutil.which("git")
    if git:
        cache = ["git", "credential-cache", f"--socket={cache_dir / 'socket'}"]
        credential = b"protocol=https\nhost=example.com\nusername=u\npassword=p\n\n"
        subprocess.run([*cache, "store"], input=credential, env=running.env, check=True)
        commands["git credential-cache get"] = ([*cache, "get"], credential)
    samples: dict[str, list[float]] = {name: [] for name in commands}
    try:
        for i in range(WARMUP + runs):
            for name, (args, stdin) in commands.items():
                elapsed = _time(args, running.env, stdin)
                if i >= WARMUP:
                    samples[name].append(elapsed)
    finally:
        if git:
            subprocess.run([*cache, "exit"], env=running.env, check=False)
        shutil.rmtree(cache_dir, ignore_errors=True)
    return {name: statistics.median(values) for name, values in samples.items()}


def report(medians: dict[str, float]) -> tuple[list[str], bool]:
    base = medians["python -I -c pass"]
    ours = medians["vm-token token"]
    lines = [f"{name:<28} {value * 1000:7.1f} ms" for name, value in medians.items()]
    ratio = ours / base
    met = ratio <= TARGET
    lines.append(f"vm-token token / python -I -c pass = {ratio:.2f}  "
                 f"(target <= {TARGET}: {'met' if met else 'MISSED'})")
    if "git credential-cache get" in medians:
        lines.append(f"vm-token token / git credential-cache get = "
                     f"{ours / medians['git credential-cache get']:.2f}")
    return lines, met
