"""pytest fixtures that run the OIDC peer (django-oauth-toolkit) as a real server on loopback.

    def test_x(oidc_peer): ...                      # defaults: 300 s access tokens
    def test_y(oidc_peer_factory):
        peer = oidc_peer_factory(access_lifetime=4)  # any number of peers, stopped at teardown

    @pytest.mark.parametrize("oidc_peer", [{"access_lifetime": 4}], indirect=True)
    def test_z(oidc_peer): ...

The server is another process (`tests.oidc_peer.runner`); its RSA key is made once per test
run and handed over in the environment, never written to disk. Startup is bounded by
`STARTUP_TIMEOUT`; the process is killed at teardown.
"""

from __future__ import annotations

import functools
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.oidc_peer.runner import (
    CODE_CLIENT_ID,
    DEFAULT_REDIRECT_URIS,
    DEVICE_CLIENT_ID,
    PASSWORD_CLIENT_ID,
)

ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT = 20.0
USERNAME = "alice@example.com"
PASSWORD = "correct horse battery staple"  # a test constant, not a secret
DB_NAME = "peer.sqlite3"


@functools.cache
def rsa_private_key_pem() -> str:
    """A fresh 2048-bit RSA key for this test run (signs the peer's ID tokens)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def _base_env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OIDC_PEER_", "DJANGO_"))}
    env.update({
        "DJANGO_SETTINGS_MODULE": "tests.oidc_peer.settings",
        "PYTHONPATH": str(ROOT),
        "OIDC_PEER_DIR": str(data_dir),
        "OIDC_PEER_RSA_KEY": rsa_private_key_pem(),
    })
    return env


def _runner(*args: str) -> list[str]:
    return [sys.executable, "-m", "tests.oidc_peer.runner", *args]


class OidcPeer:
    """A running django-oauth-toolkit server and what a test needs to know about it."""

    client_id = PASSWORD_CLIENT_ID
    code_client_id = CODE_CLIENT_ID
    device_client_id = DEVICE_CLIENT_ID

    def __init__(self, url: str, proc: subprocess.Popen[bytes], data_dir: Path, log_path: Path,
                 env: dict[str, str], *, username: str, password: str, access_lifetime: int,
                 refresh_lifetime: int, redirect_uris: list[str]) -> None:
        self.url = url
        self.api_url = f"{url}/v1/vms"
        self.webfinger_url = f"{url}/.well-known/webfinger"
        self.webfinger_resource = f"{url}/v1/"
        # DOT serves it with and without a trailing slash; this is the form it reverses to
        self.discovery_url = f"{url}/o/.well-known/openid-configuration"
        self.username = username
        self.password = password
        self.access_lifetime = access_lifetime
        self.refresh_lifetime = refresh_lifetime
        self.redirect_uris = redirect_uris
        self.proc = proc
        self.data_dir = data_dir
        self.log_path = log_path
        self.env = env
        discovery = self._get(self.discovery_url).json()
        self.discovery: dict[str, Any] = discovery
        self.issuer: str = discovery["issuer"]
        self.token_endpoint: str = discovery["token_endpoint"]
        self.authorization_endpoint: str = discovery["authorization_endpoint"]
        self.device_authorization_endpoint = f"{url}/o/device-authorization/"
        self.login_url = f"{url}/accounts/login/"
        self.reset_counts()  # the fixture's own requests are not the test's

    def _get(self, url: str, **kwargs: Any) -> httpx.Response:
        response = httpx.get(url, timeout=10, **kwargs)
        response.raise_for_status()
        return response

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def counts(self) -> dict[str, Any]:
        """``{"token": {"requests", "grant_type": {..}, "error": {..}, "grant_type_error":
        {"refresh_token invalid_grant": n}}, "paths": {"api 200": n, "/o/token/ 400": n}}``."""
        result: dict[str, Any] = self._get(f"{self.url}/_peer/counts").json()
        return result

    def grants(self, grant_type: str) -> int:
        """How many token requests had this grant_type (e.g. "password", "refresh_token")."""
        return int(self.counts()["token"]["grant_type"].get(grant_type, 0))

    def errors(self, error: str) -> int:
        """How many token requests were refused with this OAuth error (e.g. "invalid_grant")."""
        return int(self.counts()["token"]["error"].get(error, 0))

    def reset_counts(self) -> None:
        httpx.delete(f"{self.url}/_peer/counts", timeout=10).raise_for_status()

    def password_grant(self, **fields: str) -> httpx.Response:
        """A password grant as the vendor's client sends it; `fields` override or add."""
        data = {"grant_type": "password", "client_id": self.client_id,
                "username": self.username, "password": self.password, "scope": "openid"}
        data.update(fields)
        return httpx.post(self.token_endpoint, data=data, timeout=10)

    def refresh_grant(self, refresh_token: str, **fields: str) -> httpx.Response:
        data = {"grant_type": "refresh_token", "client_id": self.client_id,
                "refresh_token": refresh_token}
        data.update(fields)
        return httpx.post(self.token_endpoint, data=data, timeout=10)

    def token_valid(self, access_token: str) -> bool:
        """Whether the API's stand-in (``GET /v1/vms``) accepts this access token."""
        response = httpx.get(self.api_url, headers={"Authorization": f"Bearer {access_token}"},
                             timeout=10)
        return response.status_code == 200

    def revoke_refresh_tokens(self) -> int:
        """Delete every refresh token (between two token requests, never inside one); returns
        how many. Access tokens stay valid until they expire."""
        response = httpx.post(f"{self.url}/_peer/revoke-refresh-tokens", timeout=10)
        response.raise_for_status()
        return int(response.json()["deleted"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


def _make_template(directory: Path) -> Path:
    """A migrated database to copy for each peer: a start then costs ~0.5 s less."""
    done = subprocess.run(_runner("migrate"), env=_base_env(directory), cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise AssertionError(f"migrating the OIDC peer's database failed:\n{done.stderr}")
    return directory / DB_NAME


def _copy_db(template: Path, target: Path) -> None:
    # the backup API, not a file copy: the template is in WAL mode
    with closing(sqlite3.connect(template)) as src, closing(sqlite3.connect(target)) as dst:
        src.backup(dst)


def start_peer(data_dir: Path, template: Path | None = None, *, access_lifetime: int = 300,
               refresh_lifetime: int = 3600, webfinger_max_age: int = 300,
               advertise_device: bool = True, device_interval: int = 1,
               redirect_uris: list[str] | None = None, username: str = USERNAME,
               password: str = PASSWORD) -> OidcPeer:
    """Start one peer whose files live in `data_dir`; fail with its log if it does not serve
    within `STARTUP_TIMEOUT`."""
    if template is not None:
        _copy_db(template, data_dir / DB_NAME)
    uris = list(redirect_uris or DEFAULT_REDIRECT_URIS)
    env = _base_env(data_dir)
    env.update({
        "OIDC_PEER_ACCESS_LIFETIME": str(access_lifetime),
        "OIDC_PEER_REFRESH_LIFETIME": str(refresh_lifetime),
        "OIDC_PEER_WEBFINGER_MAX_AGE": str(webfinger_max_age),
        "OIDC_PEER_ADVERTISE_DEVICE": "1" if advertise_device else "0",
        "OIDC_PEER_DEVICE_INTERVAL": str(device_interval),
        "OIDC_PEER_PASSWORD": password,
    })
    ready = data_dir / "ready"
    log_path = data_dir / "server.log"
    args = ["serve", "--user", username, "--password-env", "OIDC_PEER_PASSWORD",
            "--ready-file", str(ready)]
    for uri in uris:
        args += ["--redirect-uri", uri]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(_runner(*args), env=env, cwd=ROOT, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not ready.exists():
            if proc.poll() is not None:
                raise AssertionError(f"the OIDC peer exited with {proc.returncode}:\n"
                                     + log_path.read_text(errors="replace"))
            if time.monotonic() > deadline:
                raise AssertionError(f"the OIDC peer did not serve within {STARTUP_TIMEOUT} s:\n"
                                     + log_path.read_text(errors="replace"))
            time.sleep(0.02)
        return OidcPeer(ready.read_text().strip(), proc, data_dir, log_path, env,
                        username=username, password=password, access_lifetime=access_lifetime,
                        refresh_lifetime=refresh_lifetime, redirect_uris=uris)
    except BaseException:
        proc.kill()
        proc.wait()
        raise


@pytest.fixture(scope="session")
def oidc_peer_template() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="oidc-peer-template-"))
    try:
        yield _make_template(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def oidc_peer_factory(oidc_peer_template: Path) -> Iterator[Callable[..., OidcPeer]]:
    """Start peers with options (`access_lifetime=4`, ...); all are killed at teardown."""
    started: list[tuple[OidcPeer | None, Path]] = []

    def start(**options: Any) -> OidcPeer:
        data_dir = Path(tempfile.mkdtemp(prefix="oidc-peer-"))
        started.append((None, data_dir))
        peer = start_peer(data_dir, oidc_peer_template, **options)
        started[-1] = (peer, data_dir)
        return peer

    yield start
    for peer, data_dir in started:
        if peer is not None:
            peer.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture
def oidc_peer(request: pytest.FixtureRequest,
              oidc_peer_factory: Callable[..., OidcPeer]) -> OidcPeer:
    """One peer; options by indirect parametrization with a dict."""
    options: dict[str, Any] = getattr(request, "param", None) or {}
    return oidc_peer_factory(**options)
