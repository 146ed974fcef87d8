"""Fixtures for tests against stand-ins, kept fast. `StandIn.stop()` waits up to its 0.1 s
poll interval, which over a hundred small tests is most of their time: each test's
stand-ins are stopped on a thread of their own and the module waits for all of them at its
end. One RSA key and one TLS context serve every test.

Import the fixtures by their function names (`*_fixture`); tests name them without the
suffix."""

from __future__ import annotations

import ssl
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from standin.jose import RsaKey
from standin.server import StandIn

# Every httpx client of these tests shares one TLS context: making one per client reads
# the CA bundle each time (~30 ms), and the stand-ins speak plain http on loopback anyway.
TLS = ssl.create_default_context()

_KEY: list[RsaKey] = []
_REAL_GENERATE = RsaKey.generate


@pytest.fixture(autouse=True, name="one_key")
def one_key_fixture(monkeypatch: pytest.MonkeyPatch) -> None:
    """One RSA key for every stand-in of the module (a fresh one costs ~0.2 s)."""
    def cached(cls: Any = None, bits: int = 2048) -> RsaKey:
        if not _KEY:
            _KEY.append(_REAL_GENERATE())
        return _KEY[0]
    monkeypatch.setattr(RsaKey, "generate", classmethod(cached))


@pytest.fixture(scope="module", name="stopping_standins")
def stopping_standins_fixture() -> Iterator[list[threading.Thread]]:
    threads: list[threading.Thread] = []
    yield threads
    for thread in threads:
        thread.join()


@pytest.fixture(name="make_standin")
def make_standin_fixture(
    stopping_standins: list[threading.Thread],
) -> Iterator[Callable[..., StandIn]]:
    """The stand-in as the real service is: both logins, unless legacy_only=True."""
    started: list[StandIn] = []

    def make(**options: Any) -> StandIn:
        options.setdefault("legacy_only", False)
        standin = StandIn(**options).start()
        started.append(standin)
        return standin

    yield make
    for standin in started:
        thread = threading.Thread(target=standin.stop, daemon=True)
        thread.start()
        stopping_standins.append(thread)


@pytest.fixture(name="standin")
def standin_fixture(make_standin: Callable[..., StandIn]) -> StandIn:
    return make_standin()
