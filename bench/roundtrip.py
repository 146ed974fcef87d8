"""Requests per second through vm_token.Client, against vm-tokend and against the floor.

The floor is bench.bare: a trio server that decodes each framed msgpack request and sends
a canned reply of the same size as vm-tokend's. The client code is the same for both, so
the ratio is what vm-tokend's own work costs.

`against_raw_client` turns it around: the same daemon, two clients — vm_token.Client and
the least a client can do (a blocking `socket` and C msgpack, no timeout, no checks) — so
the ratio is what the client library's own work costs.
"""

from __future__ import annotations

import json
import socket as stdlib_socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import msgpack

import vm_token
from bench.harness import child_env
from vm_token import protocol

ROUNDS = 5
SECONDS = 1.0
WORKERS = 4


def canned_reply(socket: Path) -> bytes:
    """A real `get` reply of the daemon's, framed: what the bare server sends back."""
    with vm_token.Client(socket) as client:
        return protocol.encode_frame(client.request(protocol.GET))


def _rate(socket: Path, seconds: float) -> float:
    with vm_token.Client(socket) as client:
        for _ in range(200):
            client.get_token()
        calls = 0
        started = time.perf_counter()
        deadline = started + seconds
        while time.perf_counter() < deadline:
            for _ in range(100):
                client.get_token()
            calls += 100
        return calls / (time.perf_counter() - started)


def single_process(daemon: Path, bare: Path) -> tuple[float, float]:
    """Median calls/s of one client in one process: (vm-tokend, floor); rounds alternate."""
    ours, floor = [], []
    for _ in range(ROUNDS):
        ours.append(_rate(daemon, SECONDS))
        floor.append(_rate(bare, SECONDS))
    return statistics.median(ours), statistics.median(floor)


def _workers(socket: Path, seconds: float) -> tuple[float, list[float]]:
    """WORKERS client processes at once: total calls/s and every call's latency (s)."""
    start_at = time.time() + 0.5
    processes = [
        subprocess.Popen([sys.executable, "-m", "bench.worker", str(socket), str(start_at),
                          str(seconds)], stdout=subprocess.PIPE, text=True, env=child_env())
        for _ in range(WORKERS)
    ]
    total = 0.0
    latencies: list[float] = []
    for process in processes:
        out, _ = process.communicate(timeout=60)
        result = json.loads(out)
        total += result["rate"]
        latencies.extend(result["latencies"])
    return total, latencies


def multi_process(daemon: Path, bare: Path) -> dict[str, float]:
    ours, floor, latencies = [], [], []
    for _ in range(3):
        rate, lat = _workers(daemon, 2.0)
        ours.append(rate)
        latencies.extend(lat)
        floor.append(_workers(bare, 2.0)[0])
    latencies.sort()
    return {
        "ours": statistics.median(ours),
        "floor": statistics.median(floor),
        "p50": latencies[len(latencies) // 2],
        "p99": latencies[int(len(latencies) * 0.99)],
    }


RAW_ROUNDS = 40
RAW_FLOOR = 0.85  # issue 9: the library costs at most ~15 % of the least possible client
RAW_BURST = 500


class _RawClient:
    """The minimal client: one blocking socket, C msgpack, `get` for the default."""

    def __init__(self, path: Path) -> None:
        self.sock = stdlib_socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
        self.sock.connect(str(path))
        body = msgpack.packb({"v": protocol.PROTOCOL_VERSION, "op": protocol.GET})
        self.frame = len(body).to_bytes(4, "big") + body

    def get(self) -> str:
        self.sock.sendall(self.frame)
        header = self.sock.recv(4)
        size = int.from_bytes(header, "big")
        body = b""
        while len(body) < size:
            body += self.sock.recv(size - len(body))
        token: str = msgpack.unpackb(body)["token"]
        return token


def _burst_rate(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    for _ in range(RAW_BURST):
        call()
    return RAW_BURST / (time.perf_counter() - started)


def against_raw_client(socket: Path) -> tuple[float, float, float]:
    """Calls/s of Client.get_token() and of the raw client, against the same daemon, and
    the median of their ratios: short bursts, alternating, so that both see the same
    moments of a noisy machine."""
    raw = _RawClient(socket)
    try:
        with vm_token.Client(socket) as client:
            for _ in range(RAW_BURST):
                raw.get()
                client.get_token()
            ours, theirs, ratios = [], [], []
            for _ in range(RAW_ROUNDS):
                a = _burst_rate(client.get_token)
                b = _burst_rate(raw.get)
                ours.append(a)
                theirs.append(b)
                ratios.append(a / b)
    finally:
        raw.sock.close()
    return statistics.median(ours), statistics.median(theirs), statistics.median(ratios)
