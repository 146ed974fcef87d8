"""A hostile reading of the token socket (issue 18): each test is a way in, or a thing left
behind, that should not be possible. Real other uids by setpriv (we run as root here)."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import BIN, clean_env
from tests.e2e.test_token_socket import as_user, client_env

ALLOWED_UID = 12345
DAEMON_UID = 23456
ATTACKER_UID = 34567

pytestmark = [pytest.mark.timeout(90)]
if os.getuid() != 0 or shutil.which("setpriv") is None or shutil.which("unshare") is None:
    pytestmark.append(pytest.mark.skip(reason="needs root, setpriv and unshare"))


# The venv's python lives under /root (0700 here): inside a user namespace it cannot be
# reached, so the daemon runs on the system's python 3.11 with the venv's packages.
SITE = next((BIN.parent / "lib").glob("python3*/site-packages"))
IN_NAMESPACE = ["/usr/bin/python3", "-c",
                f"import site, sys; site.addsitedir({str(SITE)!r}); sys.argv[0] = 'vm-tokend'; "
                "from vm_tokend.__main__ import main; sys.exit(main())"]


def _home(private_dir: Path, uid: int) -> Path:
    home = private_dir / f"home-{uid}"
    home.mkdir(mode=0o700)
    os.chown(home, uid, uid)
    return home


def _daemon_env(private_dir: Path, home: Path, standin, **more: str) -> dict[str, str]:
    env = clean_env(private_dir)
    env.update({"XDG_RUNTIME_DIR": str(home), "XDG_CONFIG_HOME": str(home / "config"),
                "VM_TOKEN_SOCKET": str(home / "vm-token" / "socket"),
                "VM_TOKEN_API_URL": standin.url, "VM_TOKEN_USERNAME": standin.username,
                "VM_TOKEN_PASSWORD": standin.password, "VM_TOKEN_LOG_LEVEL": "debug"})
    env.update(more)
    return env


def _wait_for(path: Path, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 20
    while not path.exists():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)


def test_a_daemon_that_is_the_overflow_uid_does_not_start(make_standin, private_dir):
    """A daemon in a user namespace that runs as the overflow uid (a container image's
    `USER nobody` under rootless podman or a Kubernetes user namespace): every peer whose
    uid the namespace does not map shows as 65534 too — "our uid". It would admit them
    all; it says why and does not start."""
    standin = make_standin()
    private_dir.chmod(0o711)
    home = _home(private_dir, DAEMON_UID)
    volume = private_dir / "volume"
    volume.mkdir(mode=0o755)
    os.chown(volume, DAEMON_UID, DAEMON_UID)
    shared = volume / "token"
    env = _daemon_env(private_dir, home, standin, VM_TOKEN_TOKEN_SOCKET=str(shared),
                      VM_TOKEN_ALLOW_UIDS=str(ALLOWED_UID))
    log = private_dir / "daemon.log"
    with log.open("wb") as out:
        daemon = subprocess.Popen(
            ["setpriv", f"--reuid={DAEMON_UID}", f"--regid={DAEMON_UID}", "--clear-groups",
             "unshare", "--user", "--map-user=65534", "--map-group=65534",
             *IN_NAMESPACE], env=env, stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT)
    try:
        assert daemon.wait(timeout=20) == 2
    finally:
        daemon.kill()
        daemon.wait()
    said = log.read_text()
    assert "runs as uid 65534, the overflow uid of its user namespace" in said, said
    assert said.count("\n") == 1 and not shared.exists()
    # ATTACKER_UID, allowed nowhere and not mapped into that namespace, gets nothing
    stolen = as_user(ATTACKER_UID, [str(BIN / "vm-token"), "token"],
                     client_env(env, shared, VM_TOKEN_DAEMON_UID=str(DAEMON_UID)))
    assert stolen.returncode != 0 and stolen.stdout == ""


# Another user who can write to the token socket's directory (one it made beforehand: the
# daemon uses an existing directory "as it is"; or a volume the app container writes to)
# swaps the new socket for a symlink between bind() and chmod(): chmod follows it.
SWAPPER = r"""
import ctypes, os, struct, sys
directory, name, target = sys.argv[1], sys.argv[2].encode(), sys.argv[3]
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.inotify_init()
libc.inotify_add_watch(fd, directory.encode(), 0x100)  # IN_CREATE
link = os.path.join(directory, ".link")
print("ready", flush=True)
while True:
    try:
        os.symlink(target, link)
    except FileExistsError:
        pass
    events = os.read(fd, 4096)
    while events:
        length = struct.unpack_from("iIII", events)[3]
        if events[16:16 + length].rstrip(b"\0") == name:
            try:
                os.rename(link, os.path.join(directory, name.decode()))
            except OSError:
                pass
        events = events[16 + length:]
"""


def test_the_socket_chmod_does_not_follow_a_symlink_another_user_put_there(
        make_standin, private_dir):
    standin = make_standin()
    private_dir.chmod(0o711)
    volume = private_dir / "volume"  # made by another user before the daemon started
    volume.mkdir(mode=0o777)
    os.chown(volume, ATTACKER_UID, ATTACKER_UID)
    victim = private_dir / "victim-secret"  # any file of the daemon's user (here: root)
    victim.write_text("the daemon user's secret\n")
    victim.chmod(0o600)
    swapper = subprocess.Popen(
        ["setpriv", f"--reuid={ATTACKER_UID}", f"--regid={ATTACKER_UID}", "--clear-groups",
         str(BIN / "python"), "-I", "-c", SWAPPER, str(volume), "token", str(victim)],
        stdout=subprocess.PIPE, text=True)
    env = clean_env(private_dir)
    env.update({"VM_TOKEN_SOCKET": str(private_dir / "vm-token" / "socket"),
                "VM_TOKEN_API_URL": standin.url, "VM_TOKEN_USERNAME": standin.username,
                "VM_TOKEN_PASSWORD": standin.password,
                "VM_TOKEN_TOKEN_SOCKET": str(volume / "token"),
                "VM_TOKEN_ALLOW_UIDS": str(ALLOWED_UID)})
    try:
        assert swapper.stdout is not None and swapper.stdout.readline() == "ready\n"
        for _ in range(3):
            daemon = subprocess.Popen([str(BIN / "vm-tokend")], env=env,
                                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 3  # until it serves there, or gives up
            while daemon.poll() is None and time.monotonic() < deadline and not (
                    (volume / "token").is_socket()):
                time.sleep(0.02)
            daemon.terminate()
            daemon.wait(timeout=10)
            mode = stat.S_IMODE(victim.stat().st_mode)
            assert mode == 0o600, f"the daemon made {victim} {mode:04o}"
    finally:
        swapper.kill()
        swapper.communicate()


def test_another_users_dead_socket_in_a_sticky_directory_is_one_line_and_no_leftover(
        make_standin, private_dir):
    """token_socket in a sticky shared directory (/tmp, a 1777 volume) where another user
    left a socket nobody listens on: the daemon cannot unlink it. It must say so in one
    line, and not leave its own main socket behind."""
    standin = make_standin()
    private_dir.chmod(0o711)
    sticky = private_dir / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    dead = sticky / "token"
    subprocess.run(["setpriv", f"--reuid={ATTACKER_UID}", f"--regid={ATTACKER_UID}",
                    "--clear-groups", str(BIN / "python"), "-I", "-c",
                    "import os, socket, sys; os.umask(0); "
                    "socket.socket(socket.AF_UNIX).bind(sys.argv[1])", str(dead)], check=True)
    home = _home(private_dir, DAEMON_UID)
    env = _daemon_env(private_dir, home, standin, VM_TOKEN_TOKEN_SOCKET=str(dead),
                      VM_TOKEN_ALLOW_UIDS=str(ALLOWED_UID))
    done = subprocess.run(["setpriv", f"--reuid={DAEMON_UID}", f"--regid={DAEMON_UID}",
                           "--clear-groups", str(BIN / "vm-tokend")], env=env,
                          capture_output=True, text=True, timeout=30, check=False)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert not (home / "vm-token" / "socket").exists(), "the main socket was left behind"


def test_a_proxy_with_allow_uids_leaves_the_daemons_directory_private(
        make_standin, start_daemon, private_dir):
    """allow_uids in the shared settings, the proxy started before the daemon (units
    started in any order, a restart of the daemon): the proxy's default socket is in the
    daemon's socket directory, which it must not open to others — else the daemon
    refuses to start there."""
    standin = make_standin()
    env = clean_env(private_dir)
    env.update({"VM_TOKEN_SOCKET": str(private_dir / "vm-token" / "socket"),
                "VM_TOKEN_ALLOW_UIDS": str(ALLOWED_UID)})
    proxy = subprocess.Popen([str(BIN / "vm-tokend"), "proxy"], env=env,
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while not (private_dir / "vm-token" / "proxy").exists():
            assert proxy.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        mode = stat.S_IMODE((private_dir / "vm-token").stat().st_mode)
        assert mode == 0o700, f"the proxy made the daemon's directory {mode:04o}"
        start_daemon(standin, env={"VM_TOKEN_ALLOW_UIDS": str(ALLOWED_UID)})
    finally:
        proxy.terminate()
        proxy.wait(timeout=15)


def test_a_reload_that_allows_a_uid_lets_it_reach_the_socket_or_says_why_not(
        make_standin, start_daemon, private_dir):
    """Started with a token socket for itself only (0600, in a 0700 directory), reloaded
    with allow_uids: the log says the uid is served — but the file's mode still keeps it
    out, and nothing says so."""
    standin = make_standin()
    private_dir.chmod(0o711)
    shared = private_dir / "shared" / "token"
    config = private_dir / "config" / "vm-token" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text(f'token_socket = "{shared}"\n')
    daemon = start_daemon(standin)
    config.write_text(f'token_socket = "{shared}"\nallow_uids = [{ALLOWED_UID}]\n')
    daemon.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while f"uid {ALLOWED_UID}" not in daemon.log():
        assert time.monotonic() < deadline, daemon.log()
        time.sleep(0.05)
    token = as_user(ALLOWED_UID, [str(BIN / "vm-token"), "token"],
                    client_env(daemon.env, shared))
    served = token.returncode == 0
    warned = "restart" in daemon.log().split("SIGHUP")[-1]
    assert served or warned, (token.stderr, daemon.log().split("SIGHUP")[-1])


def test_run_with_a_token_socket_leaves_no_directory_behind(make_standin, private_dir):
    """`vm-tokend run` leaves nothing behind — but a token socket's directory, which the
    daemon made, stays."""
    standin = make_standin()
    where = private_dir / "made-by-the-daemon"
    env = clean_env(private_dir)
    env.update({"VM_TOKEN_API_URL": standin.url, "VM_TOKEN_USERNAME": standin.username,
                "VM_TOKEN_PASSWORD": standin.password})
    done = subprocess.run([str(BIN / "vm-tokend"), "run", "--token-socket",
                           str(where / "token"), "--", "true"], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert not where.exists(), f"{where} was left behind"


def test_run_with_a_bad_daemon_uid_variable_fails_at_once(make_standin, private_dir):
    """VM_TOKEN_DAEMON_UID (set for another daemon's token socket) that is no uid: `run`
    waited LOGIN_TIMEOUT (90 s) for a login that succeeded at once, then said "no login".
    It talks to its own daemon, whatever the variable says; CMD's clients say what is
    wrong with it."""
    standin = make_standin()
    env = clean_env(private_dir)
    env.update({"VM_TOKEN_API_URL": standin.url, "VM_TOKEN_USERNAME": standin.username,
                "VM_TOKEN_PASSWORD": standin.password, "VM_TOKEN_DAEMON_UID": "sidecar"})
    run = subprocess.Popen([str(BIN / "vm-tokend"), "run", "--", str(BIN / "vm-token"),
                            "token"], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = run.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        run.send_signal(signal.SIGTERM)
        run.communicate(timeout=20)
        pytest.fail("vm-tokend run hung on VM_TOKEN_DAEMON_UID=sidecar")
    assert run.returncode == 3 and stderr.count("\n") == 1, stderr  # as any unusable socket
    assert "VM_TOKEN_DAEMON_UID must be a uid number, not 'sidecar'" in stderr, stderr


FAKE_DAEMON = r"""
import socket, struct, sys, msgpack
server = socket.socket(socket.AF_UNIX)
server.bind(sys.argv[1])
server.listen()
print("ready", flush=True)
while True:
    conn, _ = server.accept()
    length = struct.unpack(">I", conn.recv(4))[0]
    conn.recv(length)
    body = msgpack.packb({"ok": True, "token": "token-of-the-impostor", "videomanager_id": "1",
                          "videomanager_name": "x", "expires_at": 4e9, "username": "x",
                          "profile": "default", "api_url": None, "ca_bundle": None})
    conn.sendall(struct.pack(">I", len(body)) + body)
    conn.close()
"""


def test_a_client_told_which_uid_to_trust_trusts_that_one_not_a_containers_root(
        private_dir):
    """The token socket refuses root (a container's root reaches the shared volume, not
    our memory). The client, told VM_TOKEN_DAEMON_UID=DAEMON_UID for that volume, still
    takes tokens from whatever root process put a socket there."""
    private_dir.chmod(0o711)
    volume = private_dir / "volume"
    volume.mkdir(mode=0o755)
    impostor = subprocess.Popen([str(BIN / "python"), "-c", FAKE_DAEMON,
                                 str(volume / "token")], stdout=subprocess.PIPE, text=True)
    try:
        assert impostor.stdout is not None and impostor.stdout.readline() == "ready\n"
        (volume / "token").chmod(0o666)
        got = as_user(ALLOWED_UID, [str(BIN / "vm-token"), "token"],
                      client_env(clean_env(private_dir), volume / "token",
                                 VM_TOKEN_DAEMON_UID=str(DAEMON_UID)))
        assert "token-of-the-impostor" not in got.stdout
    finally:
        impostor.kill()
        impostor.communicate()
