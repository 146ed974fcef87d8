from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest

import vm_token
from vm_token import errors


def test_token_repr_and_str_hide_the_token():
    token = vm_token.Token.from_reply({
        "token": "secret-access-token", "videomanager_id": "1001",
        "videomanager_name": "Marketing", "expires_at": 1_900_000_000,
    })
    assert "secret-access-token" not in repr(token)
    assert "secret-access-token" not in str(token)
    assert "Marketing" in repr(token)
    assert token.expires_at == datetime.fromtimestamp(1_900_000_000, UTC)
    assert token.expires_at.tzinfo is UTC
    assert token.authorization == "Bearer secret-access-token"


def test_token_is_read_only_and_compares_by_value():
    import pickle

    reply = {"token": "t-1", "videomanager_id": "1001", "videomanager_name": "Marketing",
             "expires_at": 1_900_000_000.25}
    token = vm_token.Token.from_reply(reply)
    for name in ("access_token", "videomanager_id", "videomanager_name", "expires_at"):
        with pytest.raises(AttributeError):
            setattr(token, name, "x")
    with pytest.raises(AttributeError):
        token.extra = 1  # type: ignore[attr-defined]
    assert token == vm_token.Token.from_reply(dict(reply))
    assert token != vm_token.Token.from_reply({**reply, "token": "t-2"})
    assert len({token, vm_token.Token.from_reply(dict(reply))}) == 1
    made = vm_token.Token("t-1", "1001", "Marketing", token.expires_at)
    assert made == token and made.expires_at == token.expires_at
    assert made.expires_at.timestamp() == 1_900_000_000.25
    assert pickle.loads(pickle.dumps(token)) == token  # noqa: S301 - our own bytes
    assert 1_900_000_000 - time.time() - 1 < token.expires_in < 1_900_000_000 - time.time() + 1
    with pytest.raises(TypeError):
        vm_token.Token.from_reply({**reply, "expires_at": "soon"})


def test_every_error_code_has_its_exception():
    from vm_token import protocol

    for code in protocol.ERROR_CODES:
        error = errors.error_for_code(code, "message")
        assert type(error) is not errors.DaemonError
        assert error.code == code and isinstance(error, vm_token.Error)
    assert errors.error_for_code("from_the_future", "m").code == protocol.INTERNAL


def test_daemon_not_running_says_how_to_start_it():
    message = str(vm_token.DaemonNotRunning("/run/user/1/vm-token/socket"))
    assert "vm-tokend" in message and "systemctl --user start" in message


def test_importing_the_client_pulls_in_no_heavy_library():
    import subprocess
    import sys

    code = ("import sys, vm_token, vm_token.cli; "
            "print(sorted(m for m in ('trio', 'httpx', 'pydantic', 'anyio') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("expires_at", [float("nan"), float("inf"), -1.0, 1e20])
def test_an_expiry_no_datetime_can_hold_is_refused_at_once(expires_at):
    reply = {"token": "t", "videomanager_id": "1", "videomanager_name": "M",
             "expires_at": expires_at}
    with pytest.raises(ValueError, match="out of range"):
        vm_token.Token.from_reply(reply)
