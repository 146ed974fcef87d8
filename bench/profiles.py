"""Rows 1 and 2 again, with three profiles configured: a daemon with one profile and one
with three (each extra profile its own stand-in API), measured interleaved in the same
run. A plain request goes to the default profile; the others must not make it slower.
"""

from __future__ import annotations

import statistics
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from bench import roundtrip, startup
from bench.harness import BIN, Running, daemon
from standin.server import StandIn

ROUNDS = 9
# Same-run ratios of two identical measurements vary by a few per cent on these shared
# machines: "no slower" means within this.
NOISE = 0.10


@contextmanager
def three_profiles() -> Iterator[Running]:
    """A daemon whose configuration has the profiles default, customer and test."""
    with ExitStack() as stack:
        extra = [stack.enter_context(StandIn(username=f"user{i}", password=f"pw{i}"))
                 for i in (1, 2)]
        env: dict[str, str] = {}
        for name, api in zip(("customer", "test"), extra, strict=True):
            prefix = f"VM_TOKEN_PROFILES__{name.upper()}__"
            env.update({prefix + "API_URL": api.url, prefix + "USERNAME": api.username,
                        prefix + "PASSWORD": api.password, prefix + "AUTH": "legacy"})
        yield stack.enter_context(daemon(extra_env=env))


def _token_time(running: Running) -> float:
    started = time.perf_counter()
    subprocess.run([str(BIN / "vm-token"), "token"], stdout=subprocess.DEVNULL,
                   env=running.env, check=True)
    return time.perf_counter() - started


def compare(one: Running) -> dict[str, float]:
    """Median `vm-token token` time and Client.get_token() rate: one profile vs three."""
    with three_profiles() as three:
        for running in (one, three):  # warm up both
            for _ in range(startup.WARMUP):
                _token_time(running)
        times: dict[str, list[float]] = {"one": [], "three": []}
        for _ in range(startup.RUNS // 2):
            times["one"].append(_token_time(one))
            times["three"].append(_token_time(three))
        rates: dict[str, list[float]] = {"one": [], "three": []}
        for _ in range(ROUNDS):
            rates["one"].append(roundtrip._rate(one.socket, 0.5))
            rates["three"].append(roundtrip._rate(three.socket, 0.5))
    return {f"{what}_{n}": statistics.median(values)
            for what, data in (("time", times), ("rate", rates))
            for n, values in data.items()}


