"""`make soak`: the real daemon and proxy, 30 clients, random faults, SOAK_MINUTES (10).

    SOAK_MINUTES=60 SOAK_SEED=7 make soak

Prints a summary table (the README's reliability section shows one) and exits 1 if an
invariant broke, a process died or memory, file descriptors or tasks grew. The working
directory (logs, config) is kept when it fails, and named.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from bench import harness
from bench.soak import report
from bench.soak.checks import check_after
from bench.soak.clients import KINDS, Pauser, run_client
from bench.soak.faults import run_faults
from bench.soak.ledger import Ledger
from bench.soak.world import MAX_BACKOFF, Sample, World

WARM_UP = 60.0  # s before the first sample, and before calm stretches are counted
EVERY = 60.0  # s between samples
PAUSE_WAIT = 60.0  # s the sampler waits for clients to finish the request they are in


def main() -> int:
    minutes = float(os.environ.get("SOAK_MINUTES") or 10)
    seed = int(os.environ.get("SOAK_SEED") or random.SystemRandom().randrange(1_000_000))
    if minutes < 2:
        print("soak: SOAK_MINUTES must be at least 2 (a minute of warm-up, then samples)",
              file=sys.stderr)
        return 2
    missing = [tool for tool in ("git", "curl", "node") if shutil.which(tool) is None]
    if missing:
        print(f"soak: its clients need {', '.join(missing)} (Debian: apt-get install git "
              "curl nodejs)", file=sys.stderr)
        return 2
    rng = random.Random(seed)
    harness.raise_fd_limit()
    workdir = Path(tempfile.mkdtemp(prefix="vmt-soak-"))
    ledger = Ledger(MAX_BACKOFF)
    world = World(workdir, ledger)
    stop = threading.Event()
    clients = sum(count for _, count in KINDS)
    pauser = Pauser(clients)
    crashes: list[str] = []
    injected: Counter[str] = Counter()
    samples: list[Sample] = []
    print(f"soak: {minutes:g} min, seed {seed}, {clients} clients; logs in {workdir}",
          file=sys.stderr)
    faults_log = (workdir / "faults.log").open("w")
    # SIGTERM (a CI job cancelled) ends the run as Ctrl-C does: the processes are stopped
    signal.signal(signal.SIGTERM, lambda *_: _interrupt())
    try:
        world.start()
        # daemon threads: an interrupted run must not wait on a client
        threads = [threading.Thread(
            target=run_client, name=f"{kind}-{n}", daemon=True,
            args=(kind, world, ledger, rng.randrange(2**32), pauser, stop,
                  lambda kind, exc: crashes.append(f"{kind}: {exc!r}")))
            for kind, count in KINDS for n in range(count)]
        threads.append(threading.Thread(
            target=_guarded, name="faults", daemon=True,
            args=(crashes, run_faults, world.apis(), ledger,
                  random.Random(rng.randrange(2**32)), stop, injected, faults_log)))
        started = time.monotonic()
        for thread in threads:
            thread.start()
        deadline = started + minutes * 60
        next_sample = started + WARM_UP
        while next_sample <= deadline + 1:
            time.sleep(max(0.0, next_sample - time.monotonic()))
            if world.alive():
                break
            try:
                complete = pauser.pause(PAUSE_WAIT)
                samples.append(world.sample())
            except Exception as exc:  # noqa: BLE001 - a daemon that cannot say is a finding
                ledger.violate("sampled", f"minute {(time.monotonic() - started) / 60:.1f}: "
                               f"{exc!r}")
            else:
                if not complete:
                    print("soak: sampled with requests still in flight", file=sys.stderr)
                print(report.progress(samples[-1], minutes, ledger, injected),
                      file=sys.stderr)
            finally:
                pauser.resume()
            next_sample += EVERY
        stop.set()
        stop_by = time.monotonic() + 90  # the longest a client's request may take, and more
        for thread in threads:
            thread.join(timeout=max(1.0, stop_by - time.monotonic()))
            if thread.is_alive():
                ledger.violate("soak-client", f"{thread.name} still busy after the run")
        ended = time.monotonic()
        for switch in world.switches.values():
            switch.mode = None
        died = world.alive()
        for name in died:
            ledger.violate("alive", f"{name} exited")
        calls = report.upstream_calls(world)
        check_after(world, ledger, started + WARM_UP, ended)
        report.check_flat(samples, ledger)
        for crash in crashes:
            ledger.violate("soak-client", crash)
    finally:
        # a second Ctrl-C or SIGTERM must not leave the daemon and proxy running
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stop.set()
        pauser.resume()
        world.stop()
        faults_log.close()
    print(report.table(minutes, seed, world, ledger, injected, samples, calls))
    if ledger.broken:
        print(f"soak: FAILED (seed {seed}); logs kept in {workdir}", file=sys.stderr)
        return 1
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


def _guarded(crashes: list[str], run: Callable[..., None], *args: object) -> None:
    """The fault thread: a bug in it ends the run's faults, so it must show."""
    try:
        run(*args)
    except Exception as exc:  # noqa: BLE001
        crashes.append(f"faults: {exc!r}")


def _interrupt() -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
