"""Where a password may go (issue 15, finding 8): no profile takes the top level's password
sources; a password command runs without the daemon's secrets in its environment."""

from __future__ import annotations

import json
import sys

import pytest

from vm_tokend.config.passwords import PasswordSource
from vm_tokend.config.settings import load_config

from .test_settings import isolated, write_config  # noqa: F401 (isolated: autouse fixture)


@pytest.mark.parametrize("source", ["password", "password_file", "password_command",
                                    "credential"])
def test_a_profile_that_logs_in_elsewhere_takes_no_password_source(tmp_path, monkeypatch,
                                                                   source):
    secret = tmp_path / "pw"
    secret.write_text("top-secret\n")
    top = {"password": 'password = "top-secret"\n',
           "password_file": f'password_file = "{secret}"\n',
           "password_command": 'password_command = "echo top-secret"\n',
           "credential": ""}[source]
    if source == "credential":  # systemd's $CREDENTIALS_DIRECTORY/password
        monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
        (tmp_path / "password").write_text("top-secret\n")
    write_config(tmp_path, f'''username = "me@example.com"
{top}
[profiles.api]
api_url = "https://api.customer.example/v1/vms"
[profiles.issuer]
api_url = "https://api.other.example/v1/vms"
oidc_issuer = "https://login.other.example/auth/realms/x"
auth = "oidc"
[profiles.robot]
login_method = "password"
''')
    _, profiles = load_config(strict=False)
    assert profiles.valid["default"].password_source() is not None
    for name in ("api", "issuer"):
        profile = profiles.valid[name]
        assert profile.username == "me@example.com"  # no secret: taken
        assert (profile.password, profile.password_file, profile.password_command) == \
            (None, None, None), name
        assert profile.password_source() is None, name
    # The same API host and user is the top level over again (whatever its issuer or
    # `auth`): an error, not a second session with the same password.
    assert "same API host and user" in profiles.errors["robot"]


async def test_a_password_command_runs_without_the_daemons_secrets(tmp_path, monkeypatch):
    secrets = {
        "VM_TOKEN_PASSWORD": "top-level-secret",
        "VM_TOKEN_PROFILES__WORK__PASSWORD": "work-secret",
        "VM_TOKEN_OIDC_CLIENT_SECRET": "client-secret",
        "VM_TOKEN_PROFILES__WORK__OIDC_CLIENT_SECRET": "work-client-secret",
        "vm_token_password": "lower-case-secret",
        "CREDENTIALS_DIRECTORY": str(tmp_path / "credentials-of-every-profile"),
    }
    for name, value in {**secrets, "UNRELATED": "kept"}.items():
        monkeypatch.setenv(name, value)
    dumped = tmp_path / "env.json"
    script = tmp_path / "dump.py"
    script.write_text(f"import json, os\njson.dump(dict(os.environ), open({str(dumped)!r}, "
                      "'w'))\n")
    credentials = PasswordSource("me", password_command=f"{sys.executable} {script} && echo pw")
    assert await credentials.read_password() == "pw"
    seen = json.loads(dumped.read_text())
    assert seen["UNRELATED"] == "kept" and seen["PATH"]
    assert sorted(name for name in seen if name.upper().startswith("VM_TOKEN_")) == []
    assert "CREDENTIALS_DIRECTORY" not in seen
    assert not [value for value in secrets.values() if value in dumped.read_text()]
