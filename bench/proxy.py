"""The API proxy (`vm-tokend proxy`), against going straight to the stand-in with the
Authorization header set, in the same run: small GETs from keep-alive clients, and a
gigabyte each way with curl."""

from __future__ import annotations

import http.client
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import vm_token
from bench.harness import BIN, Running, child_env

CLIENTS = 8
SECONDS = 3.0
BULK = 1 << 30
SMALL_FLOOR = 0.6  # the proxy and the stand-in share the two cores
BULK_FLOOR = 0.8
RSS_LIMIT = 80.0


def _wait_for(path: Path, process: subprocess.Popen[bytes], what: str) -> None:
    """Until `process` listens on `path` (15 s at most)."""
    deadline = time.monotonic() + 15
    while not path.exists():
        if time.monotonic() > deadline or process.poll() is not None:
            raise SystemExit(f"bench: {what} did not start")
        time.sleep(0.02)


@contextmanager
def proxy(running: Running) -> Iterator[tuple[Path, subprocess.Popen[bytes]]]:
    path = running.socket.parent / "proxy"
    process = subprocess.Popen([str(BIN / "vm-tokend"), "proxy"], env=running.env)
    try:
        _wait_for(path, process, "vm-tokend proxy")
        yield path, process
    finally:
        process.terminate()
        process.wait(timeout=20)


@contextmanager
def bare_relay(running: Running) -> Iterator[Path]:
    """bench.bare_relay in its own process, relaying to the stand-in; its socket."""
    path = running.socket.parent / "bare-relay"
    path.unlink(missing_ok=True)
    host, port = running.standin.url.split("//")[1].split("/")[0].split(":")
    process = subprocess.Popen([sys.executable, "-m", "bench.bare_relay", str(path), host,
                                port], env=child_env())
    try:
        _wait_for(path, process, "the bare relay")
        yield path
    finally:
        process.terminate()
        process.wait(timeout=10)
        path.unlink(missing_ok=True)


class _Unix(http.client.HTTPConnection):
    def __init__(self, path: Path) -> None:
        super().__init__("localhost")
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(self.path))


def _clients(connect: Callable[[], http.client.HTTPConnection], headers: dict[str, str]
             ) -> tuple[float, float]:
    """(requests/s, median latency) of CLIENTS keep-alive clients for SECONDS."""
    latencies: list[list[float]] = [[] for _ in range(CLIENTS)]
    stop = time.monotonic() + SECONDS

    def work(mine: list[float]) -> None:
        connection = connect()
        while (started := time.monotonic()) < stop:
            connection.request("GET", "/v1/vms/1001/videos", headers=headers)
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                raise SystemExit(f"bench: {response.status} through the proxy")
            mine.append(time.monotonic() - started)
        connection.close()

    threads = [threading.Thread(target=work, args=(mine,)) for mine in latencies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    every = [t for mine in latencies for t in mine]
    return len(every) / SECONDS, statistics.median(every)


def small_gets(running: Running, path: Path) -> dict[str, float]:
    token = vm_token.get_token("1001", socket=running.socket).access_token
    host, port = running.standin.url.split("//")[1].split("/")[0].split(":")
    direct = _clients(lambda: http.client.HTTPConnection(host, int(port)),
                      {"Authorization": f"Bearer {token}"})
    proxied = _clients(lambda: _Unix(path), {})
    return {"proxied": proxied[0], "direct": direct[0],
            "added_p50": proxied[1] - direct[1]}


def _curl(*args: str) -> float:
    started = time.monotonic()
    subprocess.run(["curl", "-sS", "--fail", "-o", os.devnull, *args], check=True,
                   timeout=300)
    return time.monotonic() - started


def bulk(running: Running, path: Path, process: subprocess.Popen[bytes]
         ) -> dict[str, float]:
    token = vm_token.get_token(socket=running.socket).access_token
    base = running.standin.url
    with tempfile.NamedTemporaryFile(prefix="vmt-bulk-") as upload, \
            tempfile.NamedTemporaryFile("w", prefix="vmt-header-") as header:
        # the direct runs' header from a 0600 file (`-H @FILE`): a token never in argv
        header.write(f"Authorization: Bearer {token}\n")
        header.flush()
        bearer = f"@{header.name}"
        upload.truncate(BULK)  # sparse: a gigabyte of zeros, no disk
        times = {
            "up_direct": _curl("-T", upload.name, "-H", bearer, f"{base}/_bulk/upload"),
            "up_proxied": _curl("-T", upload.name, "--unix-socket", str(path),
                                "http://localhost/v1/vms/_bulk/upload"),
        }
        times["down_direct"] = _curl("-H", bearer, f"{base}/_bulk/download?bytes={BULK}")
        times["down_proxied"] = _curl("--unix-socket", str(path),
                                      f"http://localhost/v1/vms/_bulk/download?bytes={BULK}")
        with bare_relay(running) as relay:
            times["down_bare"] = _curl("--unix-socket", str(relay), "-H", bearer,
                                       f"{base}/_bulk/download?bytes={BULK}")
    status = Path(f"/proc/{process.pid}/status").read_text()
    hwm = next(line for line in status.splitlines() if line.startswith("VmHWM:"))
    times["peak_rss"] = int(hwm.split()[1]) / 1024
    return times
