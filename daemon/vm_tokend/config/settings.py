"""Configuration: the one module that reads the environment and configuration files.

Sources, highest priority first:

1. command-line flags (passed in as a dict);
2. environment variables `VM_TOKEN_<FIELD>`, and `VM_TOKEN_PROFILES__<NAME>__<FIELD>`;
3. systemd's credentials directory: `$CREDENTIALS_DIRECTORY/password` (and
   `oidc_client_secret`), `password.<NAME>` for a profile;
4. the TOML file `$VM_TOKEN_CONFIG`, else `$XDG_CONFIG_HOME/vm-token/config.toml`, whose
   `[profiles.NAME]` tables are further accounts on top of the top level (the profile
   `default`).

Errors come out as one `ConfigError` whose message names every bad field and where its
value came from, so `__main__` can print it and exit 2 without a traceback.
"""

from __future__ import annotations

import grp
import json
import math
import os
import pwd
import re
import tomllib
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from vm_token import protocol

from ..text import quote
from .environment import ENV_PREFIX
from .passwords import PasswordSource, PasswordUnavailable
from .profile import (
    DEFAULT_API_URL,
    PROFILE_FIELDS,
    Profile,
    host_is_loopback,
    normalize_host,
)

__all__ = [
    "DEFAULT_API_URL",
    "DEFAULT_PROFILE",
    "ConfigError",
    "PasswordSource",
    "PasswordUnavailable",
    "Profile",
    "Profiles",
    "Settings",
    "config_path",
    "host_is_loopback",
    "load_config",
    "load_settings",
    "normalize_host",
    "overflow_id",
    "resolve_profiles",
]

DEFAULT_PROFILE = "default"
PROFILE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")

LogLevel = Literal["debug", "info", "warning", "error"]
# Secrets systemd may pass in $CREDENTIALS_DIRECTORY (LoadCredential=), by file name.
CREDENTIAL_FILES = ("password", "oidc_client_secret")

# The config file load_settings() was asked to read (the --config flag), for _TomlSource.
_config_flag: ContextVar[Path | None] = ContextVar("_config_flag", default=None)


class ConfigError(Exception):
    """Bad configuration; the message is meant for the user as it is."""


def config_home(environ: Mapping[str, str]) -> Path:
    """$XDG_CONFIG_HOME, else ~/.config."""
    base = environ.get("XDG_CONFIG_HOME") or os.path.join(
        environ.get("HOME") or os.path.expanduser("~"), ".config"
    )
    return Path(base)


def config_path(environ: Mapping[str, str]) -> Path:
    explicit = environ.get("VM_TOKEN_CONFIG")
    if explicit:
        return Path(explicit)
    return config_home(environ) / "vm-token" / "config.toml"


class Settings(Profile, BaseSettings):
    """Every setting of vm-tokend: the profile `default` at the top level, the settings of
    the daemon itself, and the other profiles' tables (read by `profiles()`)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",  # VM_TOKEN_PROFILES__WORK__API_URL
        extra="forbid",
        validate_default=True,
        hide_input_in_errors=True,  # a bad value may be a password
    )

    socket: Path | None = None
    # `vm-tokend proxy`: its socket (default: beside the daemon's); how long the API may
    # take to accept a connection, and be silent within an answer (an upload's
    # processing can be long); how long a client may be idle between requests.
    proxy_socket: Path | None = None
    proxy_connect_timeout: float = Field(default=10.0, gt=0, le=86400)
    proxy_read_timeout: float = Field(default=300.0, gt=0, le=86400)
    proxy_idle_timeout: float = Field(default=60.0, gt=0, le=86400)
    # The token-only socket, off by default: a second socket that serves hello, get,
    # invalidate and list only, to our uid and to the users and groups allowed — other
    # users, containers sharing it through a volume. allow_uids and allow_gids open the
    # proxy's socket to them too. token_socket_group: the group the socket (and the
    # directory, when the daemon makes it) belongs to.
    token_socket: Path | None = None
    token_socket_group: str | None = None
    allow_uids: Annotated[list[int], NoDecode] = Field(default_factory=list)
    allow_gids: Annotated[list[int], NoDecode] = Field(default_factory=list)
    max_backoff: float = Field(default=60.0, gt=0)
    log_level: LogLevel = "info"
    default_profile: str = DEFAULT_PROFILE
    profiles: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_level(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("allow_uids", "allow_gids", mode="before")
    @classmethod
    def _ids(cls, value: Any, info: Any) -> Any:
        # From the environment or a flag: a JSON list or a comma-separated string; names
        # or numbers (a container's users often have no name on the host).
        if isinstance(value, str):
            text = value.strip()
            value = json.loads(text) if text.startswith("[") else \
                [part for part in text.split(",") if part.strip()]
        elif isinstance(value, int):
            value = [value]
        if not isinstance(value, list):
            return value
        lookup = _uid_of if info.field_name == "allow_uids" else _gid_of
        return [lookup(item) for item in value]

    @field_validator("token_socket_group")
    @classmethod
    def _group(cls, value: str | None) -> str | None:
        if value is not None:
            _gid_of(value.strip())
            return value.strip()
        return value

    @model_validator(mode="after")
    def _token_socket_apart(self) -> Settings:
        if self.token_socket is not None and self.token_socket.expanduser() in (
                self.socket_path, self.proxy_socket_path):
            raise ValueError("token_socket must be a path of its own, not the daemon's or "
                             "the proxy's socket")
        return self

    @property
    def token_socket_gid(self) -> int | None:
        return None if self.token_socket_group is None else _gid_of(self.token_socket_group)

    @field_validator("max_backoff")
    @classmethod
    def _finite_backoff(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number of seconds")
        return value

    @property
    def socket_path(self) -> Path:
        if self.socket is not None:
            return self.socket.expanduser()
        # Same rule as the clients', minus VM_TOKEN_SOCKET which pydantic already read.
        environ = {k: v for k, v in os.environ.items() if k != "VM_TOKEN_SOCKET"}
        return Path(protocol.default_socket_path(environ))

    @property
    def proxy_socket_path(self) -> Path:
        if self.proxy_socket is not None:
            return self.proxy_socket.expanduser()
        return self.socket_path.parent / "proxy"

    def profile(self) -> Profile:
        """The top level alone: the profile `default`."""
        return Profile.model_validate({name: getattr(self, name) for name in PROFILE_FIELDS})

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (
            init_settings,
            env_settings,
            _CredentialsDirectorySource(settings_cls),
            _TomlSource(settings_cls),
        )


def overflow_id(kind: str) -> int:
    """The id a user namespace shows for every uid (gid) it does not map: 65534 unless
    the kernel says otherwise."""
    try:
        with open(f"/proc/sys/kernel/overflow{kind}", encoding="ascii") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return 65534


def _an_id(item: Any, kind: str, by_name: Callable[[str], int]) -> int:
    """A uid or gid from a number or a name; ValueError saying what is wrong."""
    noun = "user" if kind == "uid" else "group"
    if isinstance(item, bool) or not isinstance(item, int | str):
        raise ValueError(f"must be {noun} names or {kind} numbers")
    text = str(item).strip()
    if text.isdecimal():
        number = int(text)
    else:
        try:
            number = by_name(text)
        except KeyError:
            raise ValueError(f"there is no {noun} named {quote(text, 40)} "
                             f"(give the {kind} number)") from None
    if not 0 <= number < 2**32 - 1:
        raise ValueError(f"{number} is not a {kind}")
    if number == overflow_id(kind):
        raise ValueError(f"{number} is the overflow {kind}: every {noun} that is not mapped "
                         "into a user namespace shows as it, so allowing it would allow "
                         "them all")
    return number


def _uid_of(item: Any) -> int:
    return _an_id(item, "uid", lambda name: pwd.getpwnam(name).pw_uid)


def _gid_of(item: Any) -> int:
    return _an_id(item, "gid", lambda name: grp.getgrnam(name).gr_gid)


class _CredentialsDirectorySource(PydanticBaseSettingsSource):
    """`$CREDENTIALS_DIRECTORY/password` and `…/oidc_client_secret`, as systemd's
    LoadCredential= provides them."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ does the work

    def __call__(self) -> dict[str, Any]:
        directory = os.environ.get("CREDENTIALS_DIRECTORY")
        if not directory:
            return {}
        found = {}
        for name in CREDENTIAL_FILES:
            value = read_systemd_credential(Path(directory) / name)
            if value is not None:
                found[name] = value
        return found


def read_systemd_credential(path: Path) -> str | None:
    """The first line of a systemd credential file; None if there is none (the user keeps
    that secret elsewhere) or it is empty."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the systemd credential {path}: "
                          f"{getattr(exc, 'strerror', None) or type(exc).__name__}") from None
    lines = text.splitlines()
    return lines[0] if lines and lines[0] else None


class _TomlSource(PydanticBaseSettingsSource):
    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ does the work

    def __call__(self) -> dict[str, Any]:
        return read_toml(_config_file())


def _config_file() -> tuple[Path, str | None]:
    """The config file to read, and what named it explicitly (None for the default path)."""
    flag = _config_flag.get()
    if flag is not None:
        return flag, "--config"
    return config_path(os.environ), "VM_TOKEN_CONFIG" if os.environ.get("VM_TOKEN_CONFIG") else None


def read_toml(file: tuple[Path, str | None]) -> dict[str, Any]:
    path, named_by = file
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        if named_by:
            raise ConfigError(f"the config file {path} (from {named_by}) does not exist") from None
        return {}
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"the config file {path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read the config file {path}: {exc.strerror}") from None


def _origin(field: str, flags: Mapping[str, Any]) -> str:
    """Where the winning value of `field` came from, in the user's words."""
    if field in flags:
        return f"the command-line flag --{field.replace('_', '-')}"
    env_name = ENV_PREFIX + field.upper()
    if any(name.upper() == env_name for name in os.environ):
        return f"the environment variable {env_name}"
    if field in CREDENTIAL_FILES and os.environ.get("CREDENTIALS_DIRECTORY"):
        return f"$CREDENTIALS_DIRECTORY/{field}"
    path, _ = _config_file()
    if path.is_file():
        return f"the config file {path}"
    return "the default"


@dataclass(frozen=True)
class Profiles:
    """Every profile's settings, by name (`default` first), and what is wrong with those
    that are not valid, by name."""

    valid: dict[str, Profile]
    errors: dict[str, str]


def _problems(exc: ValidationError, origin: Callable[[str], str]) -> str:
    """pydantic's errors in the user's words: each bad field, and `origin(field)`, where
    its value came from (may be empty). Never the value: it may be a password."""
    problems = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else ""
        message = error["msg"].removeprefix("Value error, ")
        where = origin(field) if field else ""
        if error["type"] == "extra_forbidden":
            problems.append(f"unknown setting {field!r}" + (f" in {where}" if where else ""))
        elif field:
            problems.append(f"{field}" + (f" (from {where})" if where else "") + f": {message}")
        else:
            problems.append(message)
    return "; ".join(problems)


def _profile_errors(name: str, exc: ValidationError) -> str:
    return f"profile {quote(name)}: " + _problems(exc, lambda field: "")


PASSWORD_FIELDS = ("password", "password_file", "password_command")


def _inherited(top: Profile, table: dict[str, Any]) -> dict[str, Any]:
    """What a profile takes from the top level: everything it leaves out but the password
    sources, which belong to the top level's user at the top level's server. A profile
    naming another user has another password; one with another API, issuer or `auth`
    would send it to another server; one with neither is the top level over again (an
    error: the same API host and user). The username it does take: it is no secret, and
    often the same on a customer's domain. Nor does it take the client secret when it
    names its own client, issuer or API."""
    inherited = {name: getattr(top, name) for name in PROFILE_FIELDS}
    for field in PASSWORD_FIELDS:
        inherited[field] = None
    if any(field in table for field in ("oidc_client_id", "oidc_issuer", "api_url")):
        inherited["oidc_client_secret"] = None
    return inherited


def resolve_profiles(settings: Settings) -> Profiles:
    """The profiles of `settings`: what a profile leaves out, it inherits from the top
    level; its password may come from `$CREDENTIALS_DIRECTORY/password.NAME`."""
    top = settings.profile()
    valid = {DEFAULT_PROFILE: top}
    errors: dict[str, str] = {}
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    for name, table in sorted(settings.profiles.items()):
        if name == DEFAULT_PROFILE:
            errors[name] = ("the top-level settings are the profile 'default': put them at "
                            "the top, not in [profiles.default]")
            continue
        if not PROFILE_NAME.fullmatch(name) or len(name) > 64:
            errors[name] = (f"{quote(name)} is not a profile name: lower-case letters, "
                            "digits, '-' and '_', from a letter or digit")
            continue
        if not isinstance(table, dict):
            errors[name] = f"profile {quote(name)}: must be a table of settings"
            continue
        secrets: dict[str, str] = {}
        for field in CREDENTIAL_FILES if directory else ():
            value = read_systemd_credential(Path(directory or "") / f"{field}.{name}")
            if value is not None and field not in table:
                secrets[field] = value
        try:
            valid[name] = Profile.model_validate({**_inherited(top, table), **secrets,
                                                  **table})
        except ValidationError as exc:
            errors[name] = _profile_errors(name, exc)
    seen: dict[tuple[str, str], str] = {}
    for name, profile in list(valid.items()):
        if profile.username is None or profile.login_method == "browser":
            continue  # a person logs in, as whoever they are
        key = (profile.api_host(), profile.username.casefold())
        if key in seen:
            errors[name] = (f"profile {quote(name)} has the same API host and user as "
                            f"profile {quote(seen[key])}: one of them is enough")
            del valid[name]
        else:
            seen[key] = name
    return Profiles(valid, errors)


def load_settings(flags: Mapping[str, Any] | None = None) -> Settings:
    """Settings from every source, every profile valid; ConfigError with a user-facing
    paragraph when bad."""
    return load_config(flags)[0]


def load_config(flags: Mapping[str, Any] | None = None, *,
                strict: bool = True) -> tuple[Settings, Profiles]:
    """Settings and profiles from every source; ConfigError with a user-facing paragraph
    when bad. `strict`: a bad profile is an error too (at start; a reload keeps the good
    profiles and reports the bad ones in Profiles.errors)."""
    settings = _load(flags)
    profiles = resolve_profiles(settings)
    if settings.default_profile not in profiles.valid \
            and settings.default_profile not in profiles.errors:
        raise ConfigError(f"invalid configuration: default_profile "
                          f"{quote(settings.default_profile)} names no profile")
    if strict and profiles.errors:
        raise ConfigError("invalid configuration: " + "; ".join(profiles.errors.values()))
    return settings, profiles


def _load(flags: Mapping[str, Any] | None = None) -> Settings:
    """Settings from every source; ConfigError with a user-facing paragraph when bad."""
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    config = flags.pop("config", None)
    token = _config_flag.set(Path(config) if config is not None else None)
    try:
        return Settings(**flags)
    except ValidationError as exc:
        problems = _problems(exc, lambda field: _origin(field, flags))
        raise ConfigError("invalid configuration: " + problems) from None
    finally:
        _config_flag.reset(token)
