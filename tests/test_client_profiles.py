"""Profiles in the client library and the shim, without a daemon: what goes on the wire."""

from __future__ import annotations

from typing import Any

import pytest

import vm_token
from vm_token import protocol
from vm_token._cli import git, shared
from vm_token._cli.commands import _parser
from vm_token._git_credential import parse
from vm_token.auth import host_of
from vm_token.client import resolve_profile


def body(frame: bytes) -> dict[str, Any]:
    return protocol.decode_body(frame[protocol.HEADER_SIZE:])


@pytest.fixture(autouse=True)
def no_shell_profile(monkeypatch):
    monkeypatch.delenv("VM_TOKEN_PROFILE", raising=False)


def test_resolve_profile(monkeypatch):
    assert resolve_profile(None) is None
    assert resolve_profile("work") == "work"
    monkeypatch.setenv("VM_TOKEN_PROFILE", "home")
    assert resolve_profile(None) == "home"
    assert resolve_profile("work") == "work"
    assert resolve_profile("") is None  # the daemon's default, whatever the shell says
    monkeypatch.setenv("VM_TOKEN_PROFILE", "")
    assert resolve_profile(None) is None


def sent_by(client: vm_token.Client, monkeypatch) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    def fake_send(frame: bytes) -> dict[str, Any]:
        sent.append(body(frame))
        return {"ok": True, "token": "t", "videomanager_id": "1", "videomanager_name": "n",
                "expires_at": 1.0, "videomanagers": [], "total": 0}

    monkeypatch.setattr(client, "_send", fake_send)
    return sent


def test_every_request_of_a_client_names_its_profile(monkeypatch):
    client = vm_token.Client("/nonexistent", profile="work")
    sent = sent_by(client, monkeypatch)
    client.get_token()
    client.get_token("Sales", min_ttl=5)
    client.list_videomanagers()
    client.status()
    client.invalidate("t")
    client.request(protocol.STATUS, profile="other")
    assert [m.get("profile") for m in sent] == ["work"] * 5 + ["other"]
    assert sent[0] == {"v": 1, "op": "get", "profile": "work"}  # the pre-encoded request
    plain = vm_token.Client("/nonexistent")
    sent = sent_by(plain, monkeypatch)
    plain.get_token()
    plain.status()
    assert sent == [{"v": 1, "op": "get"}, {"v": 1, "op": "status"}]


def test_the_environment_is_read_when_the_client_is_made(monkeypatch):
    monkeypatch.setenv("VM_TOKEN_PROFILE", "work")
    client = vm_token.Client("/nonexistent")
    explicit = vm_token.Client("/nonexistent", profile="")
    monkeypatch.delenv("VM_TOKEN_PROFILE")
    assert client.profile == "work" and explicit.profile is None
    sent = sent_by(client, monkeypatch)
    client.get_token()
    assert sent == [{"v": 1, "op": "get", "profile": "work"}]
    assert vm_token.AsyncClient("/nonexistent", profile="x").profile == "x"


async def test_async_client_names_its_profile(monkeypatch):
    client = vm_token.AsyncClient("/nonexistent", profile="work")
    sent: list[bytes] = []

    async def fake_exchange(stream: object, frame: bytes) -> dict[str, Any]:
        sent.append(frame)
        return {"ok": True, "token": "t", "videomanager_id": "1", "videomanager_name": "n",
                "expires_at": 1.0}

    class Stream:
        def close(self) -> None:
            pass

    async def fake_connect(library: object) -> Stream:
        return Stream()

    monkeypatch.setattr(client, "_exchange", fake_exchange)
    monkeypatch.setattr(client, "_connect", fake_connect)
    await client.get_token("Sales")
    assert [body(f) for f in sent] == [{"v": 1, "op": "get", "vm": "Sales", "profile": "work"}]


@pytest.mark.parametrize(("scheme", "host", "port", "expected"), [
    ("https", "api.video-cdn.net", None, "api.video-cdn.net"),
    ("https", "API.Example", 443, "api.example"),
    ("https", "api.example", 8443, "api.example:8443"),
    ("http", "127.0.0.1", 80, "127.0.0.1"),
    ("http", "127.0.0.1", 8080, "127.0.0.1:8080"),
    ("https", "127.0.0.1", 80, "127.0.0.1:80"),
    ("https", "::1", 8443, "[::1]:8443"),
    ("https", "[::1]", None, "[::1]"),
])
def test_host_of_names_hosts_as_git_does(scheme, host, port, expected):
    assert host_of(scheme, host, port) == expected


def test_the_auth_picks_by_host_unless_given_a_profile():
    auth = vm_token.VideoManagerAuth()
    # git's fields: the daemon picks the profile by host, or refuses the host (issue 15).
    assert auth._which("https", "api.example:8443") == {"host": "api.example:8443",
                                                        "protocol": "https"}
    fixed = vm_token.RequestsAuth(profile="work")
    assert fixed._which("https", "api.example") == {"host": "api.example",
                                                    "protocol": "https", "profile": "work"}


def test_git_fields(monkeypatch):
    described = parse(b"protocol=https\nhost=api.example\nusername=me@example.com\n\n")
    assert git.git_fields(described, {}) == {
        "host": "api.example", "protocol": "https", "user": "me@example.com"}
    assert (git.git_fields(described, {"--profile": "work"}) or {})["profile"] == "work"
    # The shell's profile is not git's: the host chooses.
    monkeypatch.setenv("VM_TOKEN_PROFILE", "work")
    assert "profile" not in (git.git_fields(parse(b"host=api.example\n\n"), {}) or {"profile": 1})
    assert git.git_fields(parse(b"protocol=https\n\n"), {}) is None
    # ... while token and header take it.
    assert shared.profile_field({}, environment=True) == {"profile": "work"}
    assert shared.profile_field({"--profile": ""}, environment=True) == {}
    assert shared.profile_field({"--profile": "x"}, environment=True) == {"profile": "x"}


def test_argparse_takes_profile_before_and_after_the_subcommand():
    parser = _parser()
    for args in (["--profile", "w", "list"], ["list", "--profile=w"],
                 ["--socket", "/s", "--profile", "w", "status", "--json"]):
        assert parser.parse_args(args).profile == "w", args
    options = parser.parse_args(["--socket", "/s", "--timeout", "3", "profiles"])
    assert (options.socket, options.timeout, options.profile) == ("/s", 3.0, None)
    assert parser.parse_args(["--timeout", "9", "token"]).timeout == 9.0
    assert parser.parse_args(["login"]).timeout is None  # interactive: its own default
