"""Configuration sources, their priority, and the errors users see."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vm_tokend.config.settings import ConfigError, PasswordUnavailable, load_settings


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    for name in list(os.environ):
        if name.startswith("VM_TOKEN_") or name == "CREDENTIALS_DIRECTORY":
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    return tmp_path


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config" / "vm-token" / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults(tmp_path):
    settings = load_settings()
    assert settings.api_url == "https://api.video-cdn.net/v1/vms"
    assert settings.idle_timeout == 3600 and settings.default_token_lifetime == 300
    assert settings.socket_path == tmp_path / "run" / "vm-token" / "socket"
    assert settings.password_source() is None


def test_priority_flags_then_env_then_credentials_then_toml(tmp_path, monkeypatch):
    write_config(tmp_path, 'username = "toml-user"\npassword = "toml-pw"\n'
                 'api_url = "https://toml.example/v1/vms"\nlog_level = "warning"\n'
                 'idle_timeout = 10\n')
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "password").write_text("credential-pw\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    monkeypatch.setenv("VM_TOKEN_API_URL", "https://env.example/v1/vms/")
    monkeypatch.setenv("VM_TOKEN_IDLE_TIMEOUT", "20")
    settings = load_settings({"idle_timeout": 30.0})
    assert settings.idle_timeout == 30  # flag
    assert settings.api_url == "https://env.example/v1/vms"  # env, trailing slash gone
    assert settings.password is not None
    assert settings.password.get_secret_value() == "credential-pw"  # credentials dir
    assert settings.username == "toml-user" and settings.log_level == "warning"  # toml
    monkeypatch.setenv("VM_TOKEN_PASSWORD", "env-pw")
    password = load_settings().password
    assert password is not None and password.get_secret_value() == "env-pw"


def test_videomanagers_from_env_as_list_or_commas(monkeypatch):
    monkeypatch.setenv("VM_TOKEN_VIDEOMANAGERS", "Sales, 1003")
    assert load_settings().videomanagers == ["Sales", "1003"]
    monkeypatch.setenv("VM_TOKEN_VIDEOMANAGERS", '["Sales"]')
    assert load_settings().videomanagers == ["Sales"]


def test_allow_lists_take_numbers_names_commas_and_json(monkeypatch, tmp_path):
    monkeypatch.setenv("VM_TOKEN_ALLOW_UIDS", "1000, root,12")
    monkeypatch.setenv("VM_TOKEN_ALLOW_GIDS", "[5, \"root\"]")
    settings = load_settings()
    assert (settings.allow_uids, settings.allow_gids) == ([1000, 0, 12], [5, 0])
    # flags (--allow-uid, repeatable) come as a list of strings
    assert load_settings({"allow_uids": ["7", "8"]}).allow_uids == [7, 8]
    write_config(tmp_path, 'allow_uids = [33, "root"]\ntoken_socket_group = "root"\n')
    monkeypatch.delenv("VM_TOKEN_ALLOW_UIDS")
    settings = load_settings()
    assert settings.allow_uids == [33, 0] and settings.token_socket_gid == 0


@pytest.mark.parametrize(("value", "message"), [
    ("65534", "65534 is the overflow uid"), ("nobody-here-xyz", "no user named"),
    ("-1", "no user named '-1'"), ("4294967295", "is not a uid"), ("[1.5]", "uid numbers"),
])
def test_allow_uids_that_are_no_uid_are_refused_by_name(monkeypatch, value, message):
    monkeypatch.setenv("VM_TOKEN_ALLOW_UIDS", value)
    with pytest.raises(ConfigError, match=message) as caught:
        load_settings()
    assert "VM_TOKEN_ALLOW_UIDS" in str(caught.value)


def test_the_token_socket_is_no_other_socket(tmp_path):
    settings = load_settings()
    for taken in (settings.socket_path, settings.proxy_socket_path):
        with pytest.raises(ConfigError, match="token_socket must be a path of its own"):
            load_settings({"token_socket": str(taken)})
    assert load_settings({"token_socket": str(tmp_path / "t")}).token_socket == tmp_path / "t"


@pytest.mark.parametrize(("url", "ok"), [
    ("http://127.0.0.1:8080/v1/vms", True), ("http://localhost/v1/vms", True),
    ("http://[::1]:9/v1/vms", True), ("http://127.9.9.9/v1/vms", True),
    ("http://api.video-cdn.net/v1/vms", False), ("http://10.0.0.1/v1/vms", False),
    ("ftp://x/y", False), ("https://user:pw@x/y", False), ("api.video-cdn.net", False),
])
def test_api_url_must_be_https_except_loopback(url, ok):
    if ok:
        assert load_settings({"api_url": url}).api_url == url
    else:
        with pytest.raises(ConfigError, match="api_url"):
            load_settings({"api_url": url})


def test_errors_name_the_field_and_its_source(tmp_path, monkeypatch):
    path = write_config(tmp_path, 'idle_timeout = -5\ncolour = "blue"\n')
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert f"idle_timeout (from the config file {path})" in message
    assert "unknown setting 'colour'" in message
    assert "\n" not in message
    monkeypatch.setenv("VM_TOKEN_API_URL", "http://example.com")
    write_config(tmp_path, "")
    with pytest.raises(ConfigError, match="the environment variable VM_TOKEN_API_URL"):
        load_settings()
    with pytest.raises(ConfigError, match="the command-line flag --log-level"):
        load_settings({"log_level": "loud"})


def test_password_never_in_error_messages(monkeypatch):
    monkeypatch.setenv("VM_TOKEN_PASSWORD", "hunter2-secret")
    with pytest.raises(ConfigError) as info:
        load_settings()  # a password but no username
    assert "hunter2-secret" not in str(info.value)
    assert "no username" in str(info.value)


def test_bad_toml_and_missing_explicit_config(tmp_path, monkeypatch):
    write_config(tmp_path, "username = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings()
    monkeypatch.setenv("VM_TOKEN_CONFIG", str(tmp_path / "nope.toml"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings()


async def test_password_file_and_command(tmp_path):
    secret = tmp_path / "pw"
    secret.write_text("from-file\nignored second line\n")
    creds = load_settings({"username": "u", "password_file": str(secret)}).password_source()
    assert creds is not None and await creds.read_password() == "from-file"
    creds = load_settings({"username": "u",
                           "password_command": "printf 'from-command\\nmore'"}).password_source()
    assert creds is not None and await creds.read_password() == "from-command"
    creds = load_settings({"username": "u", "password_command": "echo leaked >&2; exit 3"}
                          ).password_source()
    assert creds is not None
    with pytest.raises(PasswordUnavailable, match="exit code 3") as info:
        await creds.read_password()
    assert "leaked" not in str(info.value)


def test_password_file_must_exist(tmp_path):
    with pytest.raises(ConfigError, match="password_file .*not a readable file"):
        load_settings({"username": "u", "password_file": str(tmp_path / "missing")})


def run_daemon(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(Path(sys.executable).parent / "vm-tokend"), *args],
                          capture_output=True, text=True, env=env, timeout=30, check=False)


def test_daemon_exits_2_with_one_paragraph_on_bad_config(tmp_path):
    env = {**os.environ, "VM_TOKEN_API_URL": "http://example.com/v1/vms"}
    result = run_daemon(env=env)
    assert result.returncode == 2
    assert result.stderr.startswith("vm-tokend: invalid configuration: api_url")
    assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1


def test_daemon_refuses_a_socket_directory_others_can_enter(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    env = {**os.environ, "VM_TOKEN_SOCKET": str(shared / "socket")}
    result = run_daemon(env=env)
    assert result.returncode == 2
    assert "accessible to other users" in result.stderr and "chmod 700" in result.stderr
    assert not (shared / "socket").exists()


def test_daemon_usage_errors_are_one_line():
    result = run_daemon("--idle-timeout", "soon", env=dict(os.environ))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("vm-tokend: argument --idle-timeout")
    assert len(result.stderr.splitlines()) == 1


@pytest.mark.parametrize(("value", "ok"), [("2", True), ("0.5", True), ("0", False),
                                           ("-1", False), ("inf", False), ("soon", False)])
def test_max_backoff(monkeypatch, value, ok):
    monkeypatch.setenv("VM_TOKEN_MAX_BACKOFF", value)
    if ok:
        assert load_settings().max_backoff == float(value)
    else:
        with pytest.raises(ConfigError, match="max_backoff .from the environment variable"):
            load_settings()


# -- how to log in: auth and the OpenID Connect client (issue 10) -----------------------------

def test_login_settings_defaults():
    settings = load_settings()
    assert settings.auth == "auto"
    assert settings.oidc_issuer is None
    assert settings.oidc_client_id == "anonymous"
    assert settings.oidc_client_secret is None
    assert settings.oidc_scope == "openid"


def test_login_settings_from_the_environment(monkeypatch):
    monkeypatch.setenv("VM_TOKEN_AUTH", "OIDC")
    monkeypatch.setenv("VM_TOKEN_OIDC_ISSUER", " https://login.example.com/auth/realms/x/ ")
    monkeypatch.setenv("VM_TOKEN_OIDC_CLIENT_ID", " vm-token ")
    monkeypatch.setenv("VM_TOKEN_OIDC_CLIENT_SECRET", "env-secret")
    monkeypatch.setenv("VM_TOKEN_OIDC_SCOPE", "openid offline_access")
    settings = load_settings()
    assert settings.auth == "oidc"
    assert settings.oidc_issuer == "https://login.example.com/auth/realms/x"
    assert settings.oidc_client_id == "vm-token"
    assert settings.oidc_client_secret is not None
    assert settings.oidc_client_secret.get_secret_value() == "env-secret"
    assert settings.oidc_scope == "openid offline_access"
    assert "env-secret" not in repr(settings) and "env-secret" not in str(settings)
    assert load_settings({"auth": "legacy"}).auth == "legacy"  # a flag beats the environment


def test_login_settings_from_the_config_file(tmp_path):
    write_config(tmp_path, 'auth = "legacy"\noidc_issuer = "http://127.0.0.1:8080/realms/x"\n'
                 'oidc_client_id = "cli"\noidc_client_secret = "toml-secret"\n'
                 'oidc_scope = "openid email"\n')
    settings = load_settings()
    assert settings.auth == "legacy"
    assert settings.oidc_issuer == "http://127.0.0.1:8080/realms/x"  # loopback: http is fine
    assert settings.oidc_client_id == "cli" and settings.oidc_scope == "openid email"
    assert settings.oidc_client_secret is not None
    assert settings.oidc_client_secret.get_secret_value() == "toml-secret"


@pytest.mark.parametrize(("env", "value", "expect"), [
    ("VM_TOKEN_AUTH", "basic", "auth (from the environment variable VM_TOKEN_AUTH): "
                               "Input should be 'auto', 'oidc' or 'legacy'"),
    ("VM_TOKEN_AUTH", "", "auth (from the environment variable VM_TOKEN_AUTH)"),
    ("VM_TOKEN_OIDC_ISSUER", "http://login.example.com/auth/realms/x",
     "oidc_issuer (from the environment variable VM_TOKEN_OIDC_ISSUER): must use https"),
    ("VM_TOKEN_OIDC_ISSUER", "http://10.1.2.3/realms/x",
     "oidc_issuer (from the environment variable VM_TOKEN_OIDC_ISSUER): must use https"),
    ("VM_TOKEN_OIDC_ISSUER", "login.example.com/auth/realms/x",
     "oidc_issuer (from the environment variable VM_TOKEN_OIDC_ISSUER): must be an absolute "
     "https URL"),
    ("VM_TOKEN_OIDC_ISSUER", "https://login.example.com/realms/x?a=b", "oidc_issuer (from the "
                             "environment variable VM_TOKEN_OIDC_ISSUER): must not have"),
    ("VM_TOKEN_OIDC_ISSUER", "https://u:p@login.example.com/realms/x", "oidc_issuer (from the "
                             "environment variable VM_TOKEN_OIDC_ISSUER): must not have"),
    ("VM_TOKEN_OIDC_CLIENT_ID", "  ", "oidc_client_id (from the environment variable "
                                      "VM_TOKEN_OIDC_CLIENT_ID): must be non-empty printable"),
    ("VM_TOKEN_OIDC_CLIENT_ID", "a\tb", "oidc_client_id (from the environment variable "
                                        "VM_TOKEN_OIDC_CLIENT_ID): must be non-empty printable"),
    ("VM_TOKEN_OIDC_SCOPE", "", "oidc_scope (from the environment variable "
                                "VM_TOKEN_OIDC_SCOPE): must be non-empty printable"),
    ("VM_TOKEN_OIDC_SCOPE", "openid\x1b[2J", "oidc_scope (from the environment variable "
                                          "VM_TOKEN_OIDC_SCOPE): must be non-empty printable"),
])
def test_login_settings_errors_name_the_field(monkeypatch, env, value, expect):
    monkeypatch.setenv(env, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert expect in str(info.value)
    assert "\n" not in str(info.value)


def test_login_settings_errors_from_the_config_file_and_flags(tmp_path):
    path = write_config(tmp_path, 'auth = "kerberos"\noidc_scope = 7\n')
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert f"auth (from the config file {path})" in str(info.value)
    assert f"oidc_scope (from the config file {path})" in str(info.value)
    with pytest.raises(ConfigError, match="oidc_issuer .from the command-line flag "
                                          "--oidc-issuer.: must use https"):
        load_settings({"oidc_issuer": "http://example.com/realms/x"})


def test_client_secret_never_in_error_messages(monkeypatch, tmp_path):
    monkeypatch.setenv("VM_TOKEN_OIDC_CLIENT_SECRET", "very-secret-value")
    monkeypatch.setenv("VM_TOKEN_AUTH", "very-secret-value")  # pasted in the wrong place
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "very-secret-value" not in str(info.value)
    assert "auth (from the environment variable VM_TOKEN_AUTH)" in str(info.value)


def test_client_secret_from_the_credentials_directory(monkeypatch, tmp_path):
    write_config(tmp_path, 'oidc_client_secret = "toml-secret"\n')
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "oidc_client_secret").write_text("systemd-secret\nsecond line ignored\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    secret = load_settings().oidc_client_secret
    assert secret is not None and secret.get_secret_value() == "systemd-secret"  # beats TOML
    assert load_settings().password is None  # no password file there: nothing made up
    monkeypatch.setenv("VM_TOKEN_OIDC_CLIENT_SECRET", "env-secret")
    secret = load_settings().oidc_client_secret
    assert secret is not None and secret.get_secret_value() == "env-secret"  # env beats it


def test_empty_credential_file_falls_through(monkeypatch, tmp_path):
    write_config(tmp_path, 'oidc_client_secret = "toml-secret"\n')
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "oidc_client_secret").write_text("")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    secret = load_settings().oidc_client_secret
    assert secret is not None and secret.get_secret_value() == "toml-secret"


def test_unreadable_credential_file_is_a_config_error(monkeypatch, tmp_path):
    creds = tmp_path / "creds"
    (creds / "oidc_client_secret").mkdir(parents=True)  # not a file
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    with pytest.raises(ConfigError, match="cannot read the systemd credential "
                                          f"{creds}/oidc_client_secret"):
        load_settings()


def test_password_and_client_secret_side_by_side_in_the_credentials_directory(monkeypatch,
                                                                             tmp_path):
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "password").write_text("the-password\n")
    (creds / "oidc_client_secret").write_text("the-secret\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    settings = load_settings({"username": "someone"})
    assert settings.password is not None and settings.oidc_client_secret is not None
    assert settings.password.get_secret_value() == "the-password"
    assert settings.oidc_client_secret.get_secret_value() == "the-secret"
