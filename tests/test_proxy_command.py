"""`vm-tokend proxy`'s wiring (proxy/command.py) in-process: what reaches ProxyServer from
the flags and settings, what it refuses before it starts, what it trusts for an API, and
its client of the daemon.

run() is called as `vm-tokend proxy` calls it, with a ProxyServer that records what it was
given and ends the run; the settings are isolated as in tests/test_settings.py.
"""

from __future__ import annotations

import functools
import os
import socket
import ssl
from collections.abc import Iterator
from typing import Any

import pytest
import trio
import trio.testing

from tests.conftest import make_tls
from tests.test_server import on_a_socket
from tests.test_settings import isolated, write_config  # noqa: F401 (isolated: autouse fixture)
from vm_tokend.__main__ import ArgumentParser
from vm_tokend.proxy import command
from vm_tokend.proxy.command import run
from vm_tokend.proxy.daemon_client import DAEMON_CONNECTIONS, DAEMON_TIMEOUT, ProfileClients
from vm_tokend.proxy.routes import Refusal
from vm_tokend.proxy.trust import tls_context


class Started(Exception):
    """Raised by the recording ProxyServer: the run got as far as making the server."""


@pytest.fixture
def proxy_server(monkeypatch, tmp_path) -> Iterator[list[dict[str, Any]]]:
    """What ProxyServer was given, each time run() got that far."""
    (tmp_path / "run").mkdir()  # $XDG_RUNTIME_DIR: the proxy's socket goes in vm-token/
    made: list[dict[str, Any]] = []

    def recording(listeners: list[Any], daemon: Any, **options: Any) -> None:
        made.append({"listeners": listeners, "daemon": daemon, **options})
        raise Started

    monkeypatch.setattr(command, "ProxyServer", recording)
    yield made
    for server in made:
        for listener, _ in server["listeners"]:  # trio's close() wants its run: the fd
            os.close(listener.socket.detach())


def start(*argv: str) -> None:
    with pytest.raises(Started):
        run(list(argv), ArgumentParser)


# -- settings and flags -------------------------------------------------------------------

def test_the_timeouts_are_settings_and_min_ttl_a_flag(proxy_server, monkeypatch, tmp_path):
    start()
    [made] = proxy_server
    assert {name: made[name] for name in ("connect_timeout", "read_timeout", "idle_timeout",
                                          "min_ttl")} == {
        "connect_timeout": 10.0, "read_timeout": 300.0, "idle_timeout": 60.0, "min_ttl": 30.0}

    monkeypatch.setenv("VM_TOKEN_PROXY_CONNECT_TIMEOUT", "3.5")
    write_config(tmp_path, "proxy_idle_timeout = 7\nproxy_read_timeout = 90\n")
    start("--min-ttl", "45")
    made = proxy_server[-1]
    assert {name: made[name] for name in ("connect_timeout", "read_timeout", "idle_timeout",
                                          "min_ttl")} == {
        "connect_timeout": 3.5, "read_timeout": 90.0, "idle_timeout": 7.0, "min_ttl": 45.0}
    start("--min-ttl", "0")
    assert proxy_server[-1]["min_ttl"] == 0.0


@pytest.mark.parametrize("value", ["-1", "300", "1e9", "nan", "inf", "thirty", ""])
def test_a_min_ttl_out_of_range_is_one_line_and_exit_2(value, proxy_server, capsys):
    with pytest.raises(SystemExit) as exited:
        run(["--min-ttl", value], ArgumentParser)
    assert exited.value.code == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("vm-tokend proxy: argument --min-ttl: ") and "300" in line, line
    assert proxy_server == []


@pytest.mark.parametrize(("name", "value"), [
    ("PROXY_IDLE_TIMEOUT", "0"), ("PROXY_IDLE_TIMEOUT", "-5"), ("PROXY_IDLE_TIMEOUT", "nan"),
    ("PROXY_CONNECT_TIMEOUT", "0"), ("PROXY_CONNECT_TIMEOUT", "1e6"),
    ("PROXY_CONNECT_TIMEOUT", "soon"),
])
def test_a_bad_timeout_setting_is_one_line_and_exit_2(name, value, proxy_server, monkeypatch,
                                                       capsys):
    monkeypatch.setenv(f"VM_TOKEN_{name}", value)
    assert run([], ArgumentParser) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("vm-tokend proxy: invalid configuration: ") and \
        name.lower() in line, line
    assert proxy_server == []


def test_a_port_in_use_is_one_line_and_exit_2_and_leaves_no_socket(proxy_server, tmp_path,
                                                                   capsys):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert run(["--listen", f"127.0.0.1:{port}"], ArgumentParser) == 2
    assert capsys.readouterr().err == (
        f"vm-tokend proxy: cannot listen on 127.0.0.1:{port}: Address already in use\n")
    assert proxy_server == []
    assert not (tmp_path / "run" / "vm-token" / "proxy").exists()


def test_the_listen_port_reaches_the_proxy_bound(proxy_server):
    start("--listen", "127.0.0.1:0", "--profile", "customer")
    [_, (tcp, gate)] = proxy_server[0]["listeners"]
    port = tcp.socket.getsockname()[1]
    assert port != 0 and gate.hosts == {f"127.0.0.1:{port}", f"localhost:{port}"}


# -- the daemon's client: a profile whose API hangs holds its own connections only ----

async def test_requests_hung_on_one_profile_leave_the_others_their_connections(tmp_path):
    """The daemon holds every `get` for the profile `down` (its API does not answer) and
    answers `slow` after 6 s, past the client library's default 5 s: three times the
    connections a profile has are taken by `down`, yet the default profile and `up` are
    answered at once, and `slow` gets the daemon's answer."""
    async def handle(request: dict[str, Any]) -> dict[str, Any]:
        if request.get("profile") == "down":
            await trio.sleep_forever()
        if request.get("profile") == "slow":
            await trio.sleep(6)
        return {"ok": True, "profile": request.get("profile")}

    assert DAEMON_TIMEOUT > 4 * 15  # the daemon's own upstream deadlines, and then some
    async with on_a_socket(tmp_path, handle, max_connections=1024) as (_, path), \
            ProfileClients(path) as daemon, trio.open_nursery() as nursery:
        for _ in range(3 * DAEMON_CONNECTIONS):
            nursery.start_soon(functools.partial(daemon.request, "get", profile="down"))
        slow: list[dict[str, Any]] = []
        answered = trio.Event()

        async def ask_slow() -> None:
            slow.append(await daemon.request("get", profile="slow"))
            answered.set()
        nursery.start_soon(ask_slow)
        await trio.testing.wait_all_tasks_blocked(cushion=0.1)
        with trio.fail_after(2):
            assert await daemon.request("get", profile="up") == {"ok": True,
                                                                  "profile": "up"}
            assert await daemon.request("get") == {"ok": True, "profile": None}
        with trio.fail_after(10):
            await answered.wait()
        assert slow == [{"ok": True, "profile": "slow"}]
        nursery.cancel_scope.cancel()


# -- what the proxy trusts for an API: the daemon's bundle, failing closed -------------

API = "https://127.0.0.2:8443"


def test_the_bundle_the_daemon_names_is_what_is_trusted(tmp_path):
    context = tls_context(API, make_tls(tmp_path).ca_file)
    assert isinstance(context, ssl.SSLContext)
    assert [ca["subject"] for ca in context.get_ca_certs()] == [
        ((("commonName", "vm-token test CA"),),)]  # that CA alone, not the system's
    system = tls_context(API, None)  # no bundle: the system's CAs, verified
    assert isinstance(system, ssl.SSLContext) and system.verify_mode == ssl.CERT_REQUIRED
    assert tls_context("http://127.0.0.1:8080", None) is None  # plain http: nothing to trust


def test_a_bundle_that_is_gone_trusts_nothing(tmp_path):
    gone = tmp_path / "gone.pem"
    with pytest.raises(Refusal) as refused:
        tls_context(API, str(gone))
    assert (refused.value.status, refused.value.code) == (502, "upstream_unavailable")
    assert str(gone) in refused.value.message, refused.value.message


def test_a_bundle_that_is_not_pem_trusts_nothing(tmp_path):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(Refusal) as refused:
        tls_context(API, str(garbage))
    assert refused.value.code == "upstream_unavailable"
    assert f"cannot read the CA bundle {garbage}" in refused.value.message
    assert "system's CAs are not trusted" in refused.value.message
