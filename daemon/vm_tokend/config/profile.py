"""One account's settings: the profile, and the host rules git's helper needs. `settings`
builds profiles from the configuration's sources.
"""

from __future__ import annotations

import ipaddress
import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import NoDecode

from .passwords import PasswordSource

__all__ = [
    "DEFAULT_API_URL",
    "PROFILE_FIELDS",
    "Profile",
    "host_is_loopback",
    "normalize_host",
]

DEFAULT_API_URL = "https://api.video-cdn.net/v1/vms"

AuthMethod = Literal["auto", "oidc", "legacy"]


def normalize_host(host: str, scheme: str) -> str:
    """`host[:port]` as git names it: lower case, without the scheme's default port."""
    host = host.strip().lower()
    for default_scheme, port in (("https", ":443"), ("http", ":80")):
        if scheme == default_scheme and host.endswith(port):
            host = host[: -len(port)]
    return host.rstrip(".")


def host_is_loopback(host: str) -> bool:
    """Whether `host[:port]` names this machine."""
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 or host.startswith("[") else host
    return _is_loopback(name.strip("[]"))


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Profile(BaseModel):
    """The settings of one account: the top level of the configuration (the profile
    `default`), or a `[profiles.NAME]` table on top of it."""

    model_config = ConfigDict(
        extra="forbid",
        validate_default=True,
        hide_input_in_errors=True,  # a bad value may be a password
    )

    api_url: str = DEFAULT_API_URL
    auth: AuthMethod = "auto"
    oidc_issuer: str | None = None
    oidc_client_id: str = "anonymous"
    oidc_client_secret: SecretStr | None = None
    oidc_scope: str = "openid"
    oidc_redirect_port: int | None = Field(default=None, ge=1, le=65535)
    login_method: Literal["password", "browser"] = "password"
    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = None
    password_command: str | None = None
    default_videomanager: str | None = None
    videomanagers: Annotated[list[str], NoDecode] = Field(default_factory=list)
    credential_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    idle_timeout: float = Field(default=3600.0, gt=0)
    default_token_lifetime: float = Field(default=300.0, gt=0)
    ca_bundle: Path | None = None

    @field_validator("api_url")
    @classmethod
    def _check_api_url(cls, value: str) -> str:
        parts = urlsplit(value.strip())
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise ValueError("must be an absolute http(s) URL, like " + DEFAULT_API_URL)
        if parts.scheme == "http" and not _is_loopback(parts.hostname):
            raise ValueError(
                "must use https (plain http is allowed only for loopback hosts, "
                "127.0.0.0/8, ::1 and localhost)"
            )
        if parts.username or parts.password:
            raise ValueError("must not contain credentials; use username and password")
        if parts.query or parts.fragment:
            raise ValueError("must not have a query or fragment")
        return urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))

    @field_validator("oidc_issuer")
    @classmethod
    def _check_issuer(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value.strip())
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise ValueError("must be an absolute https URL, like "
                             "https://login.movingimage.com/auth/realms/platform")
        if parts.scheme == "http" and not _is_loopback(parts.hostname):
            raise ValueError("must use https (plain http is allowed only for loopback hosts)")
        if parts.query or parts.fragment or parts.username:
            raise ValueError("must not have credentials, a query or a fragment")
        return value.strip().rstrip("/")

    @field_validator("oidc_client_id", "oidc_scope")
    @classmethod
    def _printable(cls, value: str) -> str:
        value = value.strip()
        if not value or not value.isprintable():
            raise ValueError("must be non-empty printable text")
        return value

    @field_validator("auth", "login_method", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("username", "default_videomanager", "password_command")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be empty")
        return value.strip() if value is not None else None

    @field_validator("videomanagers", "credential_hosts", mode="before")
    @classmethod
    def _split_list(cls, value: Any) -> Any:
        # From the environment: a JSON list or a comma-separated string.
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [item.strip() for item in text.split(",") if item.strip()]
        return value

    @field_validator("credential_hosts")
    @classmethod
    def _hosts(cls, value: list[str]) -> list[str]:
        for host in value:
            if not host or any(c in host for c in "/@ \t") or host.count(":") > 1 \
                    and not host.startswith("["):
                raise ValueError(f"{host!r} is not a host or host:port")
        return value

    def api_host(self) -> str:
        """The API's `host[:port]`, as git names it."""
        parts = urlsplit(self.api_url)
        return normalize_host(parts.netloc, parts.scheme)

    def git_hosts(self) -> frozenset[str]:
        """The hosts git may have tokens for: the API's own and `credential_hosts`."""
        parts = urlsplit(self.api_url)
        hosts = {normalize_host(parts.netloc, parts.scheme)}
        hosts.update(normalize_host(h, "https") for h in self.credential_hosts)
        return frozenset(hosts)

    @field_validator("password_file", "ca_bundle")
    @classmethod
    def _readable_file(cls, value: Path | None) -> Path | None:
        if value is not None:
            value = value.expanduser()
            if not value.is_file():
                raise ValueError(f"{value} is not a readable file")
        return value

    @field_validator("idle_timeout", "default_token_lifetime")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number of seconds")
        return value

    @model_validator(mode="after")
    def _password_needs_user(self) -> Profile:
        if self.username is None and self.has_password_source:
            raise ValueError("a password is configured but no username")
        return self

    def destination(self) -> tuple[str, str | None, str]:
        """Where the profile's password goes: the API, the issuer it names, and the way of
        logging in (`auth`). A password given for one destination is not sent to another."""
        return self.api_url, self.oidc_issuer, self.auth

    @property
    def has_password_source(self) -> bool:
        return any(
            x is not None for x in (self.password, self.password_file, self.password_command)
        )

    def password_source(self) -> PasswordSource | None:
        """The configured username and password source, or None if the daemon should wait
        for a `login` (always with login_method = "browser": a person logs in, no password
        is used)."""
        if self.username is None or not self.has_password_source \
                or self.login_method == "browser":
            return None
        return PasswordSource(
            username=self.username,
            password=self.password,
            password_file=self.password_file,
            password_command=self.password_command,
        )


PROFILE_FIELDS = tuple(Profile.model_fields)
