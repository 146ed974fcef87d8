"""The token-only socket for other users and containers, with real other uids (setpriv;
we run as root in CI): an allowed uid, gid or supplementary group gets tokens and nothing
else; anyone else is closed unanswered, there and on the main socket; a daemon of another
uid is trusted only when named; a client in a user namespace that sees the daemon as the
overflow uid is told why and what to do. The proxy's socket takes the same allow lists."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

import vm_token
from tests.conftest import BIN, clean_env
from vm_token import protocol

ALLOWED_UID = 12345
BY_GROUP_UID = 12346  # primary group ALLOWED_GID
BY_SUPPLEMENTARY_UID = 12347  # supplementary group ALLOWED_GID
ALLOWED_GID = 7771
OTHER_UID = 65534  # nobody: allowed nowhere
DAEMON_UID = 23456  # the daemon of another user

pytestmark = [pytest.mark.timeout(60)]
if os.getuid() != 0 or shutil.which("setpriv") is None:
    if os.environ.get("CI"):
        raise RuntimeError("CI must run the other-uid tests (root and setpriv)")
    pytestmark.append(pytest.mark.skip(reason="needs root and setpriv to be other users"))


def as_user(uid: int, command: list[str], env: dict[str, str], *, gid: int | None = None,
            groups: list[int] | None = None, input: str | None = None,
            ) -> subprocess.CompletedProcess[str]:
    """`command` run as `uid` (primary group `gid`, else its own; only `groups` besides)."""
    group_flag = f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups"
    return subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={gid if gid is not None else uid}", group_flag,
         *command], env=env, input=input, capture_output=True, text=True, timeout=20,
        check=False)


# Connects, sends a `hello`, and prints what comes back: the reply's first bytes, or EOF.
RAW_HELLO = r"""
import socket, sys
sock = socket.socket(socket.AF_UNIX)
sock.settimeout(10)
sock.connect(sys.argv[1])
try:
    sock.sendall(bytes.fromhex(sys.argv[2]))
    data = sock.recv(100)
except (BrokenPipeError, ConnectionResetError):  # closed before it was all sent
    data = b""
print("EOF" if not data else "REPLY")
"""
HELLO_FRAME = protocol.encode_frame({"v": 1, "op": "hello"}).hex()


def raw_hello(uid: int, path: Path, env: dict[str, str]) -> str:
    done = as_user(uid, [str(BIN / "python"), "-I", "-c", RAW_HELLO, str(path), HELLO_FRAME],
                   env)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.fixture
def shared(private_dir: Path) -> Path:
    """Where the token socket goes: a directory the daemon makes, in one others may pass
    through (the test's own private directory, opened to traversal only)."""
    private_dir.chmod(0o711)
    return private_dir / "shared" / "token"


def client_env(daemon_env: dict[str, str], socket: Path, **more: str) -> dict[str, str]:
    env = {k: v for k, v in daemon_env.items() if not k.startswith("VM_TOKEN_")}
    env["VM_TOKEN_SOCKET"] = str(socket)
    env.update(more)
    return env


def test_an_allowed_uid_or_group_gets_tokens_and_nothing_else(
        make_standin, start_daemon, shared):
    standin = make_standin()
    daemon = start_daemon(standin, env={"VM_TOKEN_TOKEN_SOCKET": str(shared),
                                        "VM_TOKEN_ALLOW_UIDS": str(ALLOWED_UID),
                                        "VM_TOKEN_ALLOW_GIDS": str(ALLOWED_GID)})
    env = client_env(daemon.env, shared)
    assert oct(shared.stat().st_mode & 0o777) == "0o666"
    assert oct(shared.parent.stat().st_mode & 0o777) == "0o711"
    for uid, gid, groups in ((ALLOWED_UID, None, None), (BY_GROUP_UID, ALLOWED_GID, None),
                             (BY_SUPPLEMENTARY_UID, None, [ALLOWED_GID])):
        token = as_user(uid, [str(BIN / "vm-token"), "token"], env, gid=gid, groups=groups)
        assert token.returncode == 0, (uid, token.stderr)
        assert standin.token_valid(token.stdout.strip()), uid
    listed = as_user(ALLOWED_UID, [str(BIN / "vm-token"), "list"], env)
    assert listed.returncode == 0 and "Marketing" in listed.stdout, listed.stderr
    for command in (["status"], ["logout"], ["login", "--username", "u", "--password-stdin"]):
        refused = as_user(ALLOWED_UID, [str(BIN / "vm-token"), *command], env,
                          input="a-password\n")
        assert refused.returncode == 1, (command, refused.stdout, refused.stderr)
        assert "forbidden_op" in refused.stderr and "token socket" in refused.stderr, \
            refused.stderr
        assert refused.stderr.count("\n") == 1, refused.stderr
    # The daemon kept its login through all of it: the logout was refused, not done.
    with daemon.client() as client:
        assert client.status()["state"] == "logged_in"
    assert standin.counts["login_ok"] == 1


def test_everyone_else_is_closed_unanswered_and_the_main_socket_serves_none_of_them(
        make_standin, start_daemon, shared):
    standin = make_standin()
    daemon = start_daemon(standin, env={"VM_TOKEN_TOKEN_SOCKET": str(shared),
                                        "VM_TOKEN_ALLOW_UIDS": str(ALLOWED_UID)})
    # The main socket opened up as far as the file system goes: what refuses is the
    # daemon's own check.
    daemon.socket.parent.parent.chmod(0o711)
    daemon.socket.parent.chmod(0o711)
    daemon.socket.chmod(0o666)
    assert raw_hello(ALLOWED_UID, shared, daemon.env) == "REPLY"
    assert raw_hello(OTHER_UID, shared, daemon.env) == "EOF"
    for uid in (ALLOWED_UID, OTHER_UID):
        assert raw_hello(uid, daemon.socket, daemon.env) == "EOF"
    # root is our uid here; as the token socket's peer it is admitted only as ours
    token = as_user(OTHER_UID, [str(BIN / "vm-token"), "token"],
                    client_env(daemon.env, shared))
    assert token.returncode != 0 and token.stdout == ""
    assert "closed the connection" in token.stderr
    time.sleep(0.2)
    log = daemon.log()
    assert f"refused a connection from uid {OTHER_UID} on the token socket" in log
    assert f"refused a connection from uid {ALLOWED_UID}" in log  # on the main socket


def run_daemon_as(uid: int, standin, private_dir: Path, shared: Path, allow: str
                  ) -> subprocess.Popen[bytes]:
    """vm-tokend as `uid`, its main socket in a directory of its own."""
    home = private_dir / f"home-{uid}"
    home.mkdir(mode=0o700)
    os.chown(home, uid, uid)
    env = clean_env(private_dir)
    env.update({"XDG_RUNTIME_DIR": str(home), "XDG_CONFIG_HOME": str(home / "config"),
                "VM_TOKEN_SOCKET": str(home / "socket"), "VM_TOKEN_API_URL": standin.url,
                "VM_TOKEN_USERNAME": standin.username, "VM_TOKEN_PASSWORD": standin.password,
                "VM_TOKEN_TOKEN_SOCKET": str(shared), "VM_TOKEN_ALLOW_UIDS": allow})
    with (private_dir / f"daemon-{uid}.log").open("wb") as log:
        return subprocess.Popen(
            ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
             str(BIN / "vm-tokend")], env=env, stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT)


LIBRARY = r"""
import sys, vm_token
try:
    print(vm_token.Client(sys.argv[1], daemon_uid=int(sys.argv[2])).get_token().access_token)
except vm_token.Error as exc:
    sys.exit(f"{type(exc).__name__}: {exc}")
"""


def test_a_daemon_of_another_uid_is_used_only_when_named(make_standin, private_dir):
    standin = make_standin()
    private_dir.chmod(0o711)
    volume = private_dir / "volume"  # as a volume shared with a container: used as it is
    volume.mkdir(mode=0o755)
    os.chown(volume, DAEMON_UID, DAEMON_UID)
    shared = volume / "token"
    daemon = run_daemon_as(DAEMON_UID, standin, private_dir, shared, str(ALLOWED_UID))
    try:
        deadline = time.monotonic() + 15
        while not shared.exists():
            assert time.monotonic() < deadline
            assert daemon.poll() is None, (private_dir / f"daemon-{DAEMON_UID}.log"
                                           ).read_text()
            time.sleep(0.05)
        env = client_env(clean_env(private_dir), shared)
        untrusted = as_user(ALLOWED_UID, [str(BIN / "vm-token"), "token"], env)
        assert untrusted.returncode == 3 and untrusted.stdout == ""
        assert f"owned by uid {DAEMON_UID}, not you" in untrusted.stderr
        assert f"VM_TOKEN_DAEMON_UID={DAEMON_UID}" in untrusted.stderr
        trusted = as_user(ALLOWED_UID, [str(BIN / "vm-token"), "token", "--timeout", "15"],
                          {**env, "VM_TOKEN_DAEMON_UID": str(DAEMON_UID)})
        assert trusted.returncode == 0, trusted.stderr
        assert standin.token_valid(trusted.stdout.strip())
        library = as_user(ALLOWED_UID, [str(BIN / "python"), "-c", LIBRARY, str(shared),
                                         str(DAEMON_UID)], env)
        assert library.returncode == 0, library.stderr
        assert standin.token_valid(library.stdout.strip())
        # Naming one uid trusts that one only.
        other = as_user(ALLOWED_UID, [str(BIN / "python"), "-c", LIBRARY, str(shared),
                                       str(DAEMON_UID + 1)], env)
        assert other.returncode == 1 and "UntrustedDaemon" in other.stderr
        bad = as_user(ALLOWED_UID, [str(BIN / "vm-token"), "token"],
                      {**env, "VM_TOKEN_DAEMON_UID": "daemon"})
        assert bad.returncode != 0 and bad.stderr.count("\n") == 1
        assert "VM_TOKEN_DAEMON_UID must be a uid number" in bad.stderr
    finally:
        daemon.terminate()
        daemon.wait(timeout=10)


@pytest.mark.skipif(shutil.which("unshare") is None and not os.environ.get("CI"),
                    reason="needs unshare")
def test_a_client_that_sees_the_daemon_as_the_overflow_uid_is_told_why(
        make_standin, start_daemon):
    """In a user namespace of its own (no mapping), the client is uid 65534 and so does
    the daemon look: trusting "our own uid" would trust every unmapped user."""
    standin = make_standin()
    daemon = start_daemon(standin)
    for extra in ({}, {"VM_TOKEN_DAEMON_UID": "65534"}):
        inside = subprocess.run(["unshare", "--user", str(BIN / "vm-token"), "token"],
                                env={**daemon.env, **extra}, capture_output=True, text=True,
                                timeout=20, check=False)
        assert inside.returncode == 3 and inside.stdout == "", inside
        assert "shows as uid 65534, the overflow uid" in inside.stderr, inside.stderr
        assert "--userns=keep-id" in inside.stderr
    assert standin.counts["login_ok"] == 1  # the daemon itself was fine all along


def test_a_reload_that_drops_a_uid_closes_its_open_connection(
        make_standin, start_daemon, shared, private_dir):
    """A uid no longer allowed keeps nothing: not its keep-alive connection either."""
    standin = make_standin()
    config = private_dir / "config" / "vm-token" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text(f'token_socket = "{shared}"\nallow_uids = [{ALLOWED_UID}]\n')
    daemon = start_daemon(standin)
    held = subprocess.Popen(
        ["setpriv", f"--reuid={ALLOWED_UID}", f"--regid={ALLOWED_UID}", "--clear-groups",
         str(BIN / "python"), "-c",
         "import sys, vm_token\n"
         "c = vm_token.Client(sys.argv[1])\n"
         "print(bool(c.get_token().access_token), flush=True)\n"
         "sys.stdin.readline()\n"
         "try:\n    c.get_token(); print('served')\n"
         "except vm_token.Error as exc:\n    print(type(exc).__name__)\n", str(shared)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env=client_env(daemon.env, shared))
    try:
        assert held.stdout is not None and held.stdin is not None
        assert held.stdout.readline().strip() == "True"
        config.write_text(f'token_socket = "{shared}"\nallow_uids = []\n')
        daemon.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "SIGHUP" not in daemon.log() or \
                "token socket on" not in daemon.log().split("SIGHUP")[-1]:
            assert time.monotonic() < deadline, daemon.log()
            time.sleep(0.05)
        held.stdin.write("\n")
        held.stdin.flush()
        # The held connection was closed; the one reconnect Client makes is refused too.
        assert held.stdout.readline().strip() == "ProtocolError", daemon.log()
    finally:
        held.kill()
        held.communicate()
    assert raw_hello(ALLOWED_UID, shared, daemon.env) == "EOF"


def test_the_token_socket_needs_a_path_of_its_own_and_a_group_that_exists(private_dir):
    env = clean_env(private_dir)
    env["VM_TOKEN_SOCKET"] = str(private_dir / "vm-token" / "socket")
    for extra, message in (
            ({"VM_TOKEN_TOKEN_SOCKET": env["VM_TOKEN_SOCKET"]}, "a path of its own"),
            ({"VM_TOKEN_TOKEN_SOCKET": str(private_dir / "t" / "s"),
              "VM_TOKEN_TOKEN_SOCKET_GROUP": "no-such-group-here"},
             "there is no group named 'no-such-group-here'"),
            ({"VM_TOKEN_ALLOW_UIDS": "65534"}, "65534 is the overflow uid")):
        done = subprocess.run([str(BIN / "vm-tokend")], env={**env, **extra},
                              capture_output=True, text=True, timeout=20, check=False)
        assert done.returncode == 2 and message in done.stderr, done.stderr
        assert done.stderr.count("\n") == 1, done.stderr


def test_a_token_socket_group_owns_the_socket_and_its_directory(
        make_standin, start_daemon, shared):
    standin = make_standin()
    daemon = start_daemon(standin, env={"VM_TOKEN_TOKEN_SOCKET": str(shared),
                                        "VM_TOKEN_TOKEN_SOCKET_GROUP": str(ALLOWED_GID),
                                        "VM_TOKEN_ALLOW_GIDS": str(ALLOWED_GID)})
    for path, mode in ((shared, 0o660), (shared.parent, 0o750)):
        info = path.stat()
        assert (info.st_gid, info.st_mode & 0o777) == (ALLOWED_GID, mode), path
    member = as_user(BY_GROUP_UID, [str(BIN / "vm-token"), "token"],
                     client_env(daemon.env, shared), gid=ALLOWED_GID)
    assert member.returncode == 0 and standin.token_valid(member.stdout.strip())
    # not a member: the file system stops it before the daemon has to
    outsider = as_user(ALLOWED_UID, [str(BIN / "vm-token"), "token"],
                       client_env(daemon.env, shared))
    assert outsider.returncode != 0 and "no permission" in outsider.stderr.lower()
    daemon.stop()
    assert not shared.parent.exists()  # removed at exit, with the directory it made


def test_a_library_client_refuses_a_bad_daemon_uid():
    with pytest.raises(vm_token.Error, match="daemon_uid must be a uid number"):
        vm_token.Client("/nonexistent", daemon_uid=-1)


def test_a_link_planted_where_the_socket_goes_is_refused_and_its_target_untouched(
        make_standin, start_daemon, shared):
    """In a directory others can write, somebody may put a link where the token socket
    will be: the daemon neither follows it (no chmod or chown of its target) nor starts."""
    shared.parent.mkdir(mode=0o777)
    target = shared.parent.parent / "precious"
    target.write_text("keep me\n")
    target.chmod(0o600)
    shared.symlink_to(target)
    env = {"VM_TOKEN_TOKEN_SOCKET": str(shared), "VM_TOKEN_ALLOW_UIDS": str(ALLOWED_UID),
           "VM_TOKEN_TOKEN_SOCKET_GROUP": str(ALLOWED_GID)}
    daemon = start_daemon(make_standin(), env=env, wait=False)
    assert daemon.proc.wait(timeout=20) == 2
    assert f"{shared} exists and is not a socket" in daemon.log()
    info = target.stat()
    assert (info.st_mode & 0o777, info.st_gid, target.read_text()) == (0o600, 0, "keep me\n")
    assert not daemon.socket.exists()  # the main socket is not left behind either


def test_the_proxy_run_by_an_allowed_user_works_through_the_token_socket(
        make_standin, start_daemon, shared, private_dir):
    """A proxy in the app's container, as the app's uid: it needs tokens only."""
    standin = make_standin()
    daemon = start_daemon(standin, env={"VM_TOKEN_TOKEN_SOCKET": str(shared),
                                        "VM_TOKEN_ALLOW_UIDS": str(ALLOWED_UID)})
    home = private_dir / "app"
    home.mkdir(mode=0o700)
    os.chown(home, ALLOWED_UID, ALLOWED_UID)
    env = client_env(daemon.env, shared, VM_TOKEN_PROXY_SOCKET=str(home / "proxy"),
                     XDG_RUNTIME_DIR=str(home))
    proxy = subprocess.Popen(
        ["setpriv", f"--reuid={ALLOWED_UID}", f"--regid={ALLOWED_UID}", "--clear-groups",
         str(BIN / "vm-tokend"), "proxy"], env=env, stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while not (home / "proxy").exists():
            assert proxy.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        before = standin.counts["api"]
        for path, expected in (("/v1/vms", b'"Marketing"'),
                               ("/_vm-token/health", b'"daemon": "reachable"')):
            done = as_user(ALLOWED_UID, ["curl", "-sS", "--unix-socket", str(home / "proxy"),
                                         "-w", "\n%{http_code}", f"http://localhost{path}"],
                           env)
            assert done.stdout.endswith("\n200") and expected.decode() in done.stdout, done
        assert standin.counts["api"] == before + 1 and standin.counts["api_rejected"] == 0
    finally:
        proxy.terminate()
        proxy.wait(timeout=15)
