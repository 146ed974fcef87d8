"""The daemon's memory: resident set at idle, and after many requests — it must not grow."""

from __future__ import annotations

from pathlib import Path

import vm_token

REQUESTS = 100_000
MiB = 1024 * 1024


def _status(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) * 1024
    return fields


def idle_rss(pid: int) -> float:
    """The resident set (MiB) now: call it right after the daemon started."""
    return _status(pid)["VmRSS"] / MiB


def measure(pid: int, socket: Path, requests: int = REQUESTS) -> dict[str, float]:
    """RSS (MiB) half-way through and after `requests` requests, and the peak so far."""
    with vm_token.Client(socket) as client:
        names = ["Marketing", "Sales", "Support"]
        for i in range(requests // 2):
            client.get_token(names[i % 3])
        half = _status(pid)
        for i in range(requests - requests // 2):
            client.get_token(names[i % 3])
    end = _status(pid)
    return {
        "half_rss": half["VmRSS"] / MiB,
        "end_rss": end["VmRSS"] / MiB,
        "peak_rss": end["VmHWM"] / MiB,
    }
