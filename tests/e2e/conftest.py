"""Fixtures of the whole-process proxy tests: an API of our own (tests/h11_api.py) and
`vm-tokend proxy` beside the daemon. tests/e2e/test_proxy.py has a `start_proxy` of its
own (curl helpers on its Proxy), which takes precedence there."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import BIN, Daemon
from tests.h11_api import FakeApi


@pytest.fixture
def make_api() -> Iterator[Callable[..., FakeApi]]:
    started: list[FakeApi] = []

    def make(**options: object) -> FakeApi:
        api = FakeApi(**options).start()  # type: ignore[arg-type]
        started.append(api)
        return api

    yield make
    for api in started:
        api.stop()


@pytest.fixture
def api(make_api: Callable[..., FakeApi]) -> FakeApi:
    return make_api()


@dataclass
class Proxy:
    proc: subprocess.Popen[bytes]
    socket: Path
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text()


@pytest.fixture
def start_proxy(private_dir: Path) -> Iterator[Callable[..., Proxy]]:
    """`vm-tokend proxy` beside the daemon (as tests/e2e/test_proxy.py starts it), in the
    daemon's environment unless given another."""
    proxies: list[Proxy] = []

    def start(daemon: Daemon, *args: str, env: dict[str, str] | None = None) -> Proxy:
        path = private_dir / "vm-token" / "proxy"
        log_path = private_dir / f"proxy-{len(proxies)}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [str(BIN / "vm-tokend"), "proxy", "--log-level", "debug", *args],
                env=daemon.env if env is None else env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT)
        proxy = Proxy(proc, path, log_path)
        proxies.append(proxy)
        deadline = time.monotonic() + 10
        while not path.exists():
            assert proc.poll() is None, proxy.log()
            assert time.monotonic() < deadline, proxy.log()
            time.sleep(0.02)
        return proxy

    yield start
    for proxy in proxies:
        if proxy.proc.poll() is None:
            proxy.proc.terminate()
            proxy.proc.wait(timeout=15)
