"""Running as a systemd user service: units, socket activation, sd_notify, the journal."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import vm_token
from tests.conftest import BIN, clean_env, wait_until_serving
from vm_token import protocol

pytestmark = pytest.mark.timeout(60)


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is needed for this test (Debian package: systemd)")
    return path


def install_units(private_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**clean_env(private_dir), "PATH": os.environ["PATH"]}
    return subprocess.run([str(BIN / "vm-tokend"), "install-units", *args], env=env,
                          capture_output=True, text=True, timeout=30, check=False)


def test_installed_units_verify_and_score_at_most_3(private_dir):
    need("systemd-analyze")
    result = install_units(private_dir)
    assert result.returncode == 0, result.stderr
    assert "systemctl --user enable --now vm-tokend.socket" in result.stdout
    unit_dir = private_dir / "config" / "systemd" / "user"
    service = (unit_dir / "vm-tokend.service").read_text()
    assert f"ExecStart={BIN / 'vm-tokend'}\n" in service
    env = {**os.environ, "XDG_RUNTIME_DIR": str(private_dir),
           "XDG_CONFIG_HOME": str(private_dir / "config")}
    assert "systemctl --user enable --now vm-token-proxy.socket" in result.stdout
    proxy = (unit_dir / "vm-token-proxy.service").read_text()
    assert f"ExecStart={BIN / 'vm-tokend'} proxy\n" in proxy
    for unit in ("vm-tokend", "vm-token-proxy"):
        verify = subprocess.run(
            ["systemd-analyze", "verify", "--user", str(unit_dir / f"{unit}.socket"),
             str(unit_dir / f"{unit}.service")],
            env=env, capture_output=True, text=True, timeout=60, check=False)
        assert verify.returncode == 0, verify.stderr
        assert verify.stderr == "" and verify.stdout == ""  # no warnings at all
        security = subprocess.run(
            ["systemd-analyze", "security", "--user", "--offline=yes",
             str(unit_dir / f"{unit}.service")],
            env=env, capture_output=True, text=True, timeout=60, check=False)
        match = re.search(rf"Overall exposure level for {unit}\.service: (\d+\.\d)",
                          security.stdout)
        assert match, security.stdout + security.stderr
        assert float(match.group(1)) <= 3.0, (unit, match.group(1))
        assert "Invalid" not in security.stderr and "ignoring" not in security.stderr


def test_the_shipped_units_are_the_installed_ones_but_for_exec_start(private_dir):
    assert install_units(private_dir).returncode == 0
    repo = Path(__file__).parent.parent.parent / "systemd"
    unit_dir = private_dir / "config" / "systemd" / "user"
    for name in ("vm-tokend.socket", "vm-tokend.service", "vm-token-proxy.socket",
                 "vm-token-proxy.service"):
        shipped = (repo / name).read_text().splitlines()
        installed = (unit_dir / name).read_text().splitlines()
        assert len(shipped) == len(installed)
        different = [(a, b) for a, b in zip(shipped, installed, strict=True) if a != b]
        assert all(a.startswith("ExecStart=") for a, _ in different)
    socket_unit = (repo / "vm-tokend.socket").read_text()
    for line in ("ListenStream=%t/vm-token/socket", "SocketMode=0600", "DirectoryMode=0700",
                 "FileDescriptorName=vm-tokend", "WantedBy=sockets.target"):
        assert line in socket_unit


def test_install_units_enable_runs_systemctl(private_dir, tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    record = tmp_path / "calls"
    (fake / "systemctl").write_text(f"#!/bin/sh\necho \"$@\" >> {record}\n")
    (fake / "systemctl").chmod(0o755)
    env = {**clean_env(private_dir), "PATH": f"{fake}:{os.environ['PATH']}"}
    result = subprocess.run([str(BIN / "vm-tokend"), "install-units", "--enable"], env=env,
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    assert record.read_text().splitlines() == [
        "--user daemon-reload", "--user enable --now vm-tokend.socket"]


def start_activated(standin, private_dir: Path, socket_path: Path, **env: str):
    need("systemd-socket-activate")
    full_env = {**clean_env(private_dir), "VM_TOKEN_API_URL": standin.url,
                "VM_TOKEN_USERNAME": standin.username, "VM_TOKEN_PASSWORD": standin.password,
                "VM_TOKEN_LOG_LEVEL": "debug", **env}
    passed = [arg for name in full_env for arg in ("-E", name)]
    log_path = private_dir / "activated.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            ["systemd-socket-activate", "-l", str(socket_path), "--fdname=vm-tokend",
             *passed, str(BIN / "vm-tokend")],
            env=full_env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while not socket_path.exists():
        assert time.monotonic() < deadline, log_path.read_text()
        time.sleep(0.02)
    return proc, log_path


def test_socket_activation_starts_the_daemon_on_first_connection(standin, private_dir):
    socket_path = private_dir / "activated.sock"
    proc, log_path = start_activated(standin, private_dir, socket_path)
    try:
        assert "Execing" not in log_path.read_text()  # nothing started yet
        token = vm_token.get_token(socket=socket_path, timeout=10)
        assert standin.token_valid(token.access_token, token.videomanager_id)
        log = log_path.read_text()
        assert "serving on the socket systemd passed" in log
        assert "LISTEN_FDS" not in log
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
    assert socket_path.exists()  # systemd's socket: the daemon did not remove it


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another uid needs root")
def test_other_uid_refused_even_on_a_world_writable_socket(standin, private_dir):
    shared = Path(private_dir) / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    private_dir.chmod(0o755)
    socket_path = shared / "sock"
    proc, log_path = start_activated(standin, private_dir, socket_path)
    try:
        vm_token.get_token(socket=socket_path, timeout=10)  # the daemon is up
        socket_path.chmod(0o666)
        frame = protocol.encode_frame({"v": 1, "op": "get"})
        child = (
            "import socket, sys\n"
            "s = socket.socket(socket.AF_UNIX)\n"
            f"s.connect({str(socket_path)!r})\n"
            "s.settimeout(5)\n"
            "try:\n"
            f"    s.sendall(bytes.fromhex({frame.hex()!r}))\n"
            "    data = s.recv(4096)\n"
            "except (ConnectionResetError, BrokenPipeError):\n"
            "    data = b''\n"
            "print(len(data))\n"
        )
        # The system's python: the test's own may live where uid 65534 cannot go.
        python = shutil.which("python3", path="/usr/bin:/bin") or sys.executable
        result = subprocess.run([python, "-I", "-c", child], user=65534, group=65534,
                                cwd="/", capture_output=True, text=True, timeout=30,
                                check=False)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "0"  # closed without a reply
        assert "refused a connection from uid 65534" in log_path.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)


class NotifyListener:
    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(("\0" + address[1:]) if address.startswith("@") else address)
        self.sock.settimeout(0.2)
        self.messages: list[str] = []

    def wait_for(self, predicate, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        seen = len(self.messages)
        while time.monotonic() < deadline:
            for message in self.messages[seen:]:
                if predicate(message):
                    return message
            seen = len(self.messages)
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                pass
        raise AssertionError(f"no such notification; got {self.messages}")


@pytest.mark.parametrize("abstract", [False, True])
def test_sd_notify_messages(standin, start_daemon, private_dir, abstract):
    address = f"@vmt-notify-{os.getpid()}" if abstract else str(private_dir / "notify")
    listener = NotifyListener(address)
    try:
        daemon = start_daemon(standin, env={"NOTIFY_SOCKET": address,
                                            "WATCHDOG_USEC": "400000"})
        listener.wait_for(lambda m: m == "READY=1")
        status = listener.wait_for(lambda m: m.startswith("STATUS=logged in as"))
        assert "3 VideoManagers" in status
        started = time.monotonic()
        listener.wait_for(lambda m: m == "WATCHDOG=1")
        listener.wait_for(lambda m: m == "WATCHDOG=1")
        assert time.monotonic() - started < 2  # every 0.2 s
        daemon.signal(signal.SIGHUP)
        reloading = listener.wait_for(lambda m: m.startswith("RELOADING=1"))
        assert re.fullmatch(r"RELOADING=1\nMONOTONIC_USEC=\d+", reloading)
        listener.wait_for(lambda m: m == "READY=1")
        daemon.signal(signal.SIGTERM)
        listener.wait_for(lambda m: m == "STOPPING=1")
        assert daemon.proc.wait(timeout=10) == 0
        for message in listener.messages:
            for secret in (*standin.issued, standin.password):
                assert secret not in message
    finally:
        listener.sock.close()


def test_status_follows_the_state(standin, start_daemon, private_dir):
    listener = NotifyListener(str(private_dir / "notify"))
    try:
        start_daemon(standin, password="wrong", env={"NOTIFY_SOCKET": str(private_dir /
                                                                           "notify")})
        listener.wait_for(lambda m: m.startswith("STATUS=credentials for demo rejected"))
    finally:
        listener.sock.close()


def test_password_from_the_credentials_directory(standin, start_daemon, private_dir):
    credentials = private_dir / "credentials"
    credentials.mkdir()
    (credentials / "password").write_text(standin.password + "\n")
    daemon = start_daemon(standin, password="",
                          env={"CREDENTIALS_DIRECTORY": str(credentials)})
    token = vm_token.get_token(socket=daemon.socket)
    assert standin.token_valid(token.access_token)
    assert "logging in as 'demo' with a password" in daemon.log()


def test_empty_credential_fallback_means_wait_for_login(standin, start_daemon, private_dir):
    credentials = private_dir / "credentials"
    credentials.mkdir()
    (credentials / "password").write_text("\n")  # what SetCredential=password:\n gives
    daemon = start_daemon(standin, password="",
                          env={"CREDENTIALS_DIRECTORY": str(credentials)})
    with pytest.raises(vm_token.NotLoggedIn):
        vm_token.get_token(socket=daemon.socket)


def test_journal_lines_carry_a_priority_and_no_timestamp(standin, private_dir):
    log_path = private_dir / "journal.log"
    socket_path = private_dir / "vm-token" / "socket"
    env = {**clean_env(private_dir), "VM_TOKEN_SOCKET": str(socket_path),
           "VM_TOKEN_API_URL": standin.url, "VM_TOKEN_USERNAME": standin.username,
           "VM_TOKEN_PASSWORD": "wrong"}
    with log_path.open("wb") as log:
        info = os.fstat(log.fileno())
        env["JOURNAL_STREAM"] = f"{info.st_dev}:{info.st_ino}"
        proc = subprocess.Popen([str(BIN / "vm-tokend")], env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        wait_until_serving(socket_path, proc, log_path)
        with pytest.raises(vm_token.CredentialsRejected):
            vm_token.get_token(socket=socket_path)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
    lines = log_path.read_text().splitlines()
    assert lines and all(re.match(r"<[0-7]>", line) for line in lines), lines
    assert any(line.startswith("<6>") for line in lines)  # info
    assert any(line.startswith("<3>") for line in lines)  # error: rejected
    assert not any(re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d", line) for line in lines)


def test_the_daemon_makes_no_core_files_and_is_not_dumpable(standin, start_daemon):
    daemon = start_daemon(standin)
    limits = Path(f"/proc/{daemon.proc.pid}/limits").read_text()
    core = next(line for line in limits.splitlines() if line.startswith("Max core file size"))
    assert core.split()[4:6] == ["0", "0"]
    code = (
        "import ctypes\n"
        "from vm_tokend.systemd import harden_process\n"
        "harden_process()\n"
        "print(ctypes.CDLL(None).prctl(3, 0, 0, 0, 0))\n"  # PR_GET_DUMPABLE
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=30, check=True)
    assert result.stdout.strip() == "0"


def test_install_units_loads_each_profiles_credentials(private_dir):
    need("systemd-analyze")
    config = private_dir / "config" / "vm-token" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text('[profiles.customer]\napi_url = "https://api.customer.example/v1/vms"\n'
                      '[profiles.test]\napi_url = "https://api.test.example/v1/vms"\n')
    result = install_units(private_dir)
    assert result.returncode == 0, result.stderr
    unit_dir = private_dir / "config" / "systemd" / "user"
    drop_in = unit_dir / "vm-tokend.service.d" / "profiles.conf"
    text = drop_in.read_text()
    for name in ("customer", "test"):
        assert f"LoadCredential=password.{name}:%E/vm-token/password.{name}\n" in text
        assert f"SetCredential=password.{name}:\\n\n" in text
        assert f"LoadCredential=oidc_client_secret.{name}:" in text
    env = {**os.environ, "XDG_RUNTIME_DIR": str(private_dir),
           "XDG_CONFIG_HOME": str(private_dir / "config")}
    verify = subprocess.run(
        ["systemd-analyze", "verify", "--user", str(unit_dir / "vm-tokend.service")],
        env=env, capture_output=True, text=True, timeout=60, check=False)
    assert verify.returncode == 0 and verify.stderr == "", verify.stderr
    # Without profiles again, the drop-in goes.
    config.write_text("")
    assert install_units(private_dir).returncode == 0
    assert not drop_in.exists()


def test_socket_activation_starts_the_proxy_on_first_connection(standin, start_daemon,
                                                                private_dir):
    need("systemd-socket-activate")
    daemon = start_daemon(standin)
    socket_path = private_dir / "vm-token" / "activated-proxy"
    passed = [arg for name in daemon.env for arg in ("-E", name)]
    log_path = private_dir / "activated-proxy.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            ["systemd-socket-activate", "-l", str(socket_path), "--fdname=vm-token-proxy",
             *passed, str(BIN / "vm-tokend"), "proxy"],
            env=daemon.env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while not socket_path.exists():
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.02)
        done = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}",
                               "--unix-socket", str(socket_path), "http://localhost/v1/vms"],
                              capture_output=True, text=True, timeout=30, check=False)
        assert done.stdout == "200", (done.stderr, log_path.read_text())
        assert "serving on the socket systemd passed" in log_path.read_text()
    finally:
        proc.terminate()
        proc.wait(timeout=15)
