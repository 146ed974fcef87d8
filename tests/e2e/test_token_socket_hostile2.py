"""A second hostile reading of the token socket (issue 18), after the fixes of the first.
Real other uids by setpriv (we run as root here)."""

from __future__ import annotations

import os
import shutil
import stat
import struct
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import BIN, clean_env
from tests.e2e.test_token_socket import as_user
from vm_tokend.server.listener import SocketSetupError, bind_shared_socket

ALLOWED_UID = 12345
DAEMON_UID = 23456
ATTACKER_UID = 34567

pytestmark = [pytest.mark.timeout(90)]
if os.getuid() != 0 or shutil.which("setpriv") is None:
    pytestmark.append(pytest.mark.skip(reason="needs root and setpriv"))


def _home(private_dir: Path, uid: int) -> Path:
    home = private_dir / f"home-{uid}"
    home.mkdir(mode=0o700)
    os.chown(home, uid, uid)
    return home


def _owned_dir(path: Path, uid: int, mode: int = 0o755) -> Path:
    path.mkdir()
    path.chmod(mode)
    os.chown(path, uid, uid)
    return path


def test_run_as_root_trusts_its_own_daemon_whatever_vm_token_daemon_uid_says(
        make_standin, private_dir):
    """A CI job in a container run as root (GitLab's docker executor, most images) whose
    environment names another daemon's uid (VM_TOKEN_DAEMON_UID, set in the image for a
    sidecar's token socket): `vm-tokend run -- CMD` waits for the login with
    daemon_uid=getuid() and succeeds, then CMD's client refuses the very same daemon —
    check_peer drops root when daemon_uid is set, even when root is the client's own uid."""
    standin = make_standin()
    env = clean_env(private_dir)
    env.update({"VM_TOKEN_API_URL": standin.url, "VM_TOKEN_USERNAME": standin.username,
                "VM_TOKEN_PASSWORD": standin.password, "VM_TOKEN_DAEMON_UID": str(DAEMON_UID)})
    done = subprocess.run([str(BIN / "vm-tokend"), "run", "--", str(BIN / "vm-token"),
                           "token"], env=env, capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0 and done.stdout.strip(), done.stderr


def test_a_made_directory_is_removed_when_its_group_cannot_be_given(
        make_standin, private_dir):
    """token_socket_group names a group the daemon's user is not in: bind_shared_socket
    makes the directory, _give_to_group fails in the mkdir's `else:` — outside the
    try that removes `made` — and the directory is left behind."""
    standin = make_standin()
    private_dir.chmod(0o711)
    home = _home(private_dir, DAEMON_UID)
    volume = _owned_dir(private_dir / "volume", DAEMON_UID)
    made = volume / "made"
    env = clean_env(private_dir)
    env.update({"XDG_RUNTIME_DIR": str(home), "XDG_CONFIG_HOME": str(home / "config"),
                "VM_TOKEN_SOCKET": str(home / "vm-token" / "socket"),
                "VM_TOKEN_API_URL": standin.url, "VM_TOKEN_USERNAME": standin.username,
                "VM_TOKEN_PASSWORD": standin.password,
                "VM_TOKEN_TOKEN_SOCKET": str(made / "token"),
                "VM_TOKEN_TOKEN_SOCKET_GROUP": "4242",  # not one of the daemon's groups
                "VM_TOKEN_ALLOW_UIDS": str(ALLOWED_UID)})
    done = as_user(DAEMON_UID, [str(BIN / "vm-tokend")], env)
    assert done.returncode == 2 and "group 4242" in done.stderr, done.stderr
    assert not made.exists(), f"{made} was left behind"


def _default_acl_everyone_rwx(directory: Path) -> None:
    """`setfacl -d -m u::rwx,g::rwx,o::rwx` (a shared directory set up for a team): new
    entries take their mode from it, and the umask no longer applies."""
    entries = b"".join(struct.pack("<HHI", tag, 7, 0xFFFFFFFF) for tag in (0x01, 0x04, 0x20))
    os.setxattr(directory, "system.posix_acl_default", struct.pack("<I", 2) + entries)


@pytest.mark.parametrize(("group", "others", "expected"), [
    (None, False, 0o700), (None, True, 0o711)])
def test_a_made_directory_has_its_mode_under_a_default_acl(private_dir, group, others,
                                                           expected):
    """bind_shared_socket makes the directory with mkdir()'s default mode 0777 and relies
    on the umask alone; under a parent with a default ACL the kernel ignores the umask,
    and the directory is made 0777: anyone can delete or replace the socket, or plant a
    file so that it is never removed."""
    parent = private_dir / "team"
    parent.mkdir()
    try:
        _default_acl_everyone_rwx(parent)
    except OSError as exc:
        pytest.skip(f"no ACLs here: {exc}")
    try:
        bound = bind_shared_socket(parent / "made" / "token", group=group, others=others)
    except SocketSetupError as exc:
        pytest.fail(str(exc))
    try:
        mode = stat.S_IMODE((parent / "made").stat().st_mode)
        assert mode == expected, f"made {mode:04o}, not {expected:04o}"
    finally:
        bound.sock.close()
        bound.remove()


def test_the_proxys_shared_socket_refuses_root_as_the_token_socket_does(private_dir):
    """allow_uids put the proxy's socket on a shared volume (bind_shared_socket, 0666),
    like the token socket; the token socket refuses root there (a rootful container's
    root reaches the volume, not our memory), the proxy's admits root (PeerRule root=True)
    — and forwards its requests to the API with our token."""
    private_dir.chmod(0o711)
    home = _home(private_dir, DAEMON_UID)
    volume = _owned_dir(private_dir / "volume", DAEMON_UID)
    env = clean_env(private_dir)
    env.update({"XDG_RUNTIME_DIR": str(home),
                "VM_TOKEN_SOCKET": str(home / "vm-token" / "socket"),
                "VM_TOKEN_PROXY_SOCKET": str(volume / "proxy"),
                "VM_TOKEN_ALLOW_UIDS": str(ALLOWED_UID)})
    proxy = subprocess.Popen(
        ["setpriv", f"--reuid={DAEMON_UID}", f"--regid={DAEMON_UID}", "--clear-groups",
         str(BIN / "vm-tokend"), "proxy"], env=env, stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while not (volume / "proxy").exists():
            assert proxy.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        codes = {}
        for uid in (ALLOWED_UID, ATTACKER_UID, 0):
            done = as_user(uid, ["curl", "-s", "--unix-socket", str(volume / "proxy"),
                                 "-o", "/dev/null", "-w", "%{http_code}",
                                 "http://localhost/_vm-token/health"], env)
            codes[uid] = done.stdout
        assert codes[ALLOWED_UID] != "000" and codes[ATTACKER_UID] == "000", codes
        assert codes[0] == "000", f"root was answered ({codes[0]}) on the shared socket"
    finally:
        proxy.terminate()
        proxy.wait(timeout=15)


def test_the_proxys_health_tells_an_allowed_uid_no_more_than_the_token_socket(
        make_standin, start_daemon, private_dir):
    """The token socket keeps `status` (the daemon's state) from other users; the proxy,
    opened to the same allow_uids, answers its health with the daemon's state
    (logged_in, credentials_rejected, …) to any of them."""
    standin = make_standin()
    daemon = start_daemon(standin)
    private_dir.chmod(0o711)
    volume = private_dir / "volume"
    volume.mkdir(mode=0o755)
    env = {**daemon.env, "VM_TOKEN_PROXY_SOCKET": str(volume / "proxy"),
           "VM_TOKEN_ALLOW_UIDS": str(ALLOWED_UID)}
    proxy = subprocess.Popen([str(BIN / "vm-tokend"), "proxy"], env=env,
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while not (volume / "proxy").exists():
            assert proxy.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        done = as_user(ALLOWED_UID, ["curl", "-sS", "--unix-socket", str(volume / "proxy"),
                                     "http://localhost/_vm-token/health"], env)
        assert '"state": null' in done.stdout, done.stdout
    finally:
        proxy.terminate()
        proxy.wait(timeout=15)
