"""Profiles in the configuration: inheritance, sources, names, duplicates, bad profiles."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_settings import isolated, write_config  # noqa: F401 (isolated: autouse fixture)
from vm_tokend.config.settings import ConfigError, load_config, load_settings


def test_a_single_profile_configuration_is_the_default_profile(tmp_path):
    write_config(tmp_path, 'username = "me@example.com"\npassword = "pw"\n')
    settings, profiles = load_config()
    assert list(profiles.valid) == ["default"] and profiles.errors == {}
    assert profiles.valid["default"].username == "me@example.com"
    assert settings.default_profile == "default"


def test_profiles_inherit_what_they_leave_out(tmp_path):
    write_config(tmp_path, '''
username = "me@example.com"
password = "top-secret"
default_videomanager = "Marketing"
idle_timeout = 120

[profiles.customer]
api_url = "https://api.customer.example/v1/vms"
username = "agency@example.com"

[profiles.test]
api_url = "https://api.test.example/v1/vms"
idle_timeout = 30
''')
    _, profiles = load_config()
    customer, test = profiles.valid["customer"], profiles.valid["test"]
    assert customer.api_url == "https://api.customer.example/v1/vms"
    assert customer.username == "agency@example.com"
    # Another user: the top level's password is not theirs to send.
    assert customer.password is None and customer.password_source() is None
    assert customer.default_videomanager == "Marketing" and customer.idle_timeout == 120
    assert test.username == "me@example.com" and test.idle_timeout == 30
    # The same user at another API: the top level's password is not sent there.
    assert test.password is None and test.password_source() is None
    assert profiles.valid["default"].api_url == "https://api.video-cdn.net/v1/vms"
    assert customer.git_hosts() == frozenset({"api.customer.example"})


def test_profiles_from_the_environment_over_the_file(tmp_path, monkeypatch):
    write_config(tmp_path, '[profiles.work]\napi_url = "https://a.example/v1/vms"\n'
                           'username = "file@example.com"\n')
    monkeypatch.setenv("VM_TOKEN_PROFILES__WORK__USERNAME", "env@example.com")
    monkeypatch.setenv("VM_TOKEN_PROFILES__WORK__PASSWORD", "pw")
    monkeypatch.setenv("VM_TOKEN_PROFILES__LAB__API_URL", "https://lab.example/v1/vms")
    _, profiles = load_config()
    assert profiles.valid["work"].username == "env@example.com"
    assert profiles.valid["work"].api_url == "https://a.example/v1/vms"
    assert profiles.valid["lab"].api_url == "https://lab.example/v1/vms"


def test_systemd_credentials_per_profile(tmp_path, monkeypatch):
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "password").write_text("default-secret\n")
    (creds / "password.work").write_text("work-secret\n")
    (creds / "oidc_client_secret.work").write_text("client-secret\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    write_config(tmp_path, 'username = "me@example.com"\n'
                           '[profiles.work]\napi_url = "https://w.example/v1/vms"\n'
                           '[profiles.own]\napi_url = "https://o.example/v1/vms"\n'
                           'password = "in-the-table"\n')
    _, profiles = load_config()
    secret = {name: p.password.get_secret_value() if p.password else None
              for name, p in profiles.valid.items()}
    assert secret == {"default": "default-secret", "work": "work-secret",
                      "own": "in-the-table"}
    work_secret = profiles.valid["work"].oidc_client_secret
    assert work_secret is not None and work_secret.get_secret_value() == "client-secret"


@pytest.mark.parametrize("name", ["Work", "-x", "a b", "ü", "x" * 65, "default"])
def test_profile_names(tmp_path, name):
    write_config(tmp_path, f'[profiles."{name}"]\napi_url = "https://w.example/v1/vms"\n')
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "profile" in str(info.value)
    _, profiles = load_config(strict=False)
    assert list(profiles.errors) == [name] and list(profiles.valid) == ["default"]


def test_good_profile_names_are_taken(tmp_path):
    write_config(tmp_path, '[profiles.a-1_b]\napi_url = "https://w.example/v1/vms"\n'
                           '[profiles.9lives]\napi_url = "https://n.example/v1/vms"\n')
    _, profiles = load_config()
    assert sorted(profiles.valid) == ["9lives", "a-1_b", "default"]


def test_two_profiles_with_the_same_host_and_user_are_an_error(tmp_path):
    write_config(tmp_path, '''
username = "me@example.com"
[profiles.again]
api_url = "https://API.video-cdn.net:443/v1/vms"
username = "ME@example.com"
password = "pw2"
[profiles.other-user]
username = "you@example.com"
password = "pw3"
''')
    with pytest.raises(ConfigError, match="'again' has the same API host and user as profile "
                                          "'default'"):
        load_settings()
    _, profiles = load_config(strict=False)
    assert sorted(profiles.valid) == ["default", "other-user"]


def test_a_bad_profile_names_itself_and_its_field_and_never_the_password(tmp_path):
    write_config(tmp_path, '''
[profiles.work]
api_url = "http://remote.example/v1/vms"
password = "s3cret-value"
colour = "blue"
[profiles.fine]
api_url = "https://fine.example/v1/vms"
''')
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert "profile 'work'" in message and "api_url" in message and "colour" in message
    assert "s3cret-value" not in message
    _, profiles = load_config(strict=False)
    assert "fine" in profiles.valid and "work" in profiles.errors


def test_default_profile_must_name_one(tmp_path):
    write_config(tmp_path, 'default_profile = "nope"\n')
    with pytest.raises(ConfigError, match="default_profile 'nope' names no profile"):
        load_settings()


def test_the_daemon_refuses_a_bad_profile_at_start(tmp_path):
    write_config(tmp_path, '[profiles.work]\napi_url = "ftp://x"\n')
    env = {k: v for k, v in os.environ.items()}
    result = subprocess.run([str(Path(sys.executable).parent / "vm-tokend")], env=env,
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 2
    assert "profile 'work': api_url" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_no_profile_inherits_a_password_source(tmp_path, monkeypatch):
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "password").write_text("DEFAULT-SECRET\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    secret_file = tmp_path / "work.pw"
    secret_file.write_text("bob-secret\n")
    write_config(tmp_path, f'''
username = "alice"
[profiles.work]
api_url = "https://work.example/v1/vms"
username = "bob"
password_file = "{secret_file}"
[profiles.cmd]
username = "carol"
password_command = "echo carolpw"
[profiles.custom-domain]
api_url = "https://api.custom.example/v1/vms"
''')
    _, profiles = load_config()
    work, cmd = profiles.valid["work"], profiles.valid["cmd"]
    assert work.password is None and work.password_file == secret_file
    assert cmd.password is None and cmd.password_command == "echo carolpw"
    # alice at another API: not the top level's password (a systemd credential)
    custom = profiles.valid["custom-domain"]
    assert custom.username == "alice" and custom.password_source() is None
    assert (custom.password, custom.password_file, custom.password_command) == (None,) * 3
