"""`vm-tokend proxy`'s wiring (proxy/command.py) in-process: what reaches ProxyServer from
the flags and settings, what it refuses before it starts, what it trusts for an API, and
its client of the daemon.

run() is called as `vm-tokend proxy` calls it, with a ProxyServer that records what it was
given and ends the run; the settings are isolated as in tests/test_settings.py.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from tests.test_settings import isolated, write_config  # noqa: F401 (isolated: autouse fixture)
from vm_tokend.__main__ import ArgumentParser
from vm_tokend.proxy import command
from vm_tokend.proxy.command import run


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
