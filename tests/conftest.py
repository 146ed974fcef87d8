"""Shared fixtures: the stand-in API, and the real vm-tokend process started against it."""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

import vm_token
from standin.server import StandIn
from tests.oidc_peer.fixture import (  # noqa: F401  (fixtures: the real OIDC provider)
    oidc_peer,
    oidc_peer_factory,
    oidc_peer_template,
)

BIN = Path(sys.executable).parent
STARTUP_TIMEOUT = 15.0


@pytest.fixture
def private_dir() -> Iterator[Path]:
    """A short private directory (Unix socket paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="vmt-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def make_standin() -> Iterator[Callable[..., StandIn]]:
    started: list[StandIn] = []

    def make(**options: Any) -> StandIn:
        # The legacy API unless asked: most tests are about the keeper, and name the legacy
        # endpoints' counters and faults. OIDC tests pass legacy_only=False.
        options.setdefault("legacy_only", True)
        standin = StandIn(**options).start()
        started.append(standin)
        return standin

    yield make
    for standin in started:
        standin.stop()


@pytest.fixture
def standin(make_standin: Callable[..., StandIn]) -> StandIn:
    return make_standin()


@dataclass
class Tls:
    server: ssl.SSLContext  # serves the certificate
    ca_file: str  # the CA that signed it, to trust


def make_tls(directory: Path, host: str = "127.0.0.2",
             ca_name: str = "vm-token test CA") -> Tls:
    """A CA of its own, in `directory`, and a server certificate for the IP `host` it
    signed. Each call makes a new CA: a second one plays a CA nobody trusts."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.now(UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    issuer = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ca_name)])
    usage = {name: False for name in ("digital_signature", "content_commitment",
                                      "key_encipherment", "data_encipherment", "key_agreement",
                                      "key_cert_sign", "crl_sign", "encipher_only",
                                      "decipher_only")}

    def builder(subject: x509.Name, public: Any) -> x509.CertificateBuilder:
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
                .public_key(public).serial_number(x509.random_serial_number())
                .not_valid_before(now - timedelta(minutes=5))
                .not_valid_after(now + timedelta(hours=1))
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), False))

    ca = (builder(issuer, ca_key.public_key())
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
          .add_extension(x509.KeyUsage(**{**usage, "key_cert_sign": True, "crl_sign": True}),
                         True)
          .sign(ca_key, hashes.SHA256()))
    leaf = (builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]),
                    key.public_key())
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(host))]), False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), False)
            .add_extension(x509.KeyUsage(**{**usage, "digital_signature": True}), True)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    (directory / "ca.pem").write_bytes(ca.public_bytes(pem))
    (directory / "server.pem").write_bytes(leaf.public_bytes(pem) + key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(directory / "server.pem")
    return Tls(server, str(directory / "ca.pem"))


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    """A CA of this test module, and a server certificate for 127.0.0.2 it signed."""
    return make_tls(tmp_path_factory.mktemp("tls"))


def clean_env(private_dir: Path) -> dict[str, str]:
    """The test's environment without any VM_TOKEN_ setting or user config."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("VM_TOKEN_") and k not in ("CREDENTIALS_DIRECTORY",)}
    env["XDG_CONFIG_HOME"] = str(private_dir / "config")
    env["XDG_RUNTIME_DIR"] = str(private_dir)
    return env


class Daemon:
    """A running `vm-tokend` process."""

    def __init__(self, proc: subprocess.Popen[bytes], socket: Path, log_path: Path,
                 env: dict[str, str]) -> None:
        self.proc = proc
        self.socket = socket
        self.log_path = log_path
        self.env = env

    def client(self, timeout: float = 5.0) -> vm_token.Client:
        return vm_token.Client(self.socket, timeout=timeout)

    def log(self) -> str:
        return self.log_path.read_text()

    def cli(self, *args: str, input: str | None = None,
            timeout: float = 15.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "vm-token"), *args], input=input, capture_output=True, text=True,
            env=self.env, timeout=timeout, check=False,
        )

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=10)


def wait_until_serving(socket: Path, proc: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"vm-tokend exited with {proc.returncode}:\n"
                                 + log_path.read_text())
        try:
            with vm_token.Client(socket, timeout=1) as client:
                client.hello()
                return
        except vm_token.Error:
            time.sleep(0.02)
    raise AssertionError("vm-tokend did not start serving in time:\n" + log_path.read_text())


@pytest.fixture
def start_daemon(private_dir: Path) -> Iterator[Callable[..., Daemon]]:
    daemons: list[Daemon] = []

    def start(standin: StandIn | None, *, password: str | None = None,
              username: str | None = None, env: dict[str, str] | None = None,
              args: list[str] | None = None, wait: bool = True) -> Daemon:
        full_env = clean_env(private_dir)
        socket = private_dir / "vm-token" / "socket"
        full_env["VM_TOKEN_SOCKET"] = str(socket)
        full_env["VM_TOKEN_LOG_LEVEL"] = "debug"
        if standin is not None:
            full_env["VM_TOKEN_API_URL"] = standin.url
            full_env["VM_TOKEN_USERNAME"] = username or standin.username
            if password != "":  # "": no password in the environment
                full_env["VM_TOKEN_PASSWORD"] = password or standin.password
        full_env.update(env or {})
        log_path = private_dir / f"vm-tokend-{len(daemons)}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [str(BIN / "vm-tokend"), *(args or [])],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=full_env,
            )
        daemon = Daemon(proc, socket, log_path, full_env)
        daemons.append(daemon)
        if wait:
            wait_until_serving(socket, proc, log_path)
        return daemon

    yield start
    for daemon in daemons:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait()
