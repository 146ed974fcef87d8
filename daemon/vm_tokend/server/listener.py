"""The daemon's listening Unix socket: a private directory, mode 0600, no stale leftovers,
and the peer's uid (SO_PEERCRED) for the server's check.

A socket systemd passed (socket activation) is used as it is, and never removed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import socket as stdlib_socket
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import trio

__all__ = [
    "BoundSocket",
    "SocketAlreadyServed",
    "SocketSetupError",
    "bind_shared_socket",
    "bind_unix_socket",
]

# The longest path a Unix socket can be bound at (sun_path, less its NUL).
MAX_SOCKET_PATH: Final = 107
# What link() answers where the file system has no hard links (FUSE mounts, vboxsf, ...).
NO_HARD_LINKS: Final = frozenset({errno.EPERM, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP,
                                  errno.EXDEV})

# Connections waiting to be accepted. A burst of clients beyond it would see EAGAIN on
# connect (Unix sockets do not queue more); the kernel caps it at net.core.somaxconn.
LISTEN_BACKLOG: Final = 4096


class SocketSetupError(Exception):
    """The socket path cannot be used safely; the message says why."""


class SocketAlreadyServed(SocketSetupError):
    """Another daemon answers on the socket."""


def _check_private_directory(directory: Path) -> None:
    try:
        directory.mkdir(mode=0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise SocketSetupError(f"cannot create {directory}: {exc.strerror}") from None
    info = directory.lstat()
    if not stat.S_ISDIR(info.st_mode):
        raise SocketSetupError(f"{directory} is not a directory")
    if info.st_uid != os.getuid():
        raise SocketSetupError(
            f"{directory} belongs to uid {info.st_uid}, not to this user ({os.getuid()}); "
            "refusing to put the socket there"
        )
    if info.st_mode & 0o077:
        raise SocketSetupError(
            f"{directory} is accessible to other users (mode {stat.S_IMODE(info.st_mode):04o}); "
            f"make it private with `chmod 700 {directory}`"
        )


def _clear_stale_socket(path: Path) -> None:
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise SocketSetupError(f"{path} exists and is not a socket; remove it or pick another")
    probe = stdlib_socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        try:
            path.unlink(missing_ok=True)  # nothing listens: a leftover of a crashed daemon
        except OSError as exc:  # another user's, in a shared sticky directory
            raise SocketSetupError(f"cannot remove the stale socket {path}: "
                                   f"{exc.strerror}") from None
        return
    except OSError:
        pass  # e.g. a full backlog: somebody is listening
    finally:
        probe.close()
    raise SocketAlreadyServed(f"another vm-tokend is already serving on {path}")


@dataclass
class BoundSocket:
    sock: stdlib_socket.socket
    path: Path | None  # set when we created the file, and so must remove it
    inode: int = 0
    made_directory: Path | None = None  # the directory too, when we made it for the socket

    def remove(self) -> None:
        """Remove the socket file, if it is still the one we made, and the directory we
        made for it, if nothing else is in it by now."""
        if self.path is None:
            return
        try:
            if self.path.lstat().st_ino == self.inode:
                self.path.unlink()
        except FileNotFoundError:
            pass
        if self.made_directory is not None:
            try:
                self.made_directory.rmdir()
            except OSError:
                pass  # not empty, or gone: not ours to clear

    def listener(self) -> trio.SocketListener:
        """The socket as a trio listener (in trio's run: it registers with its loop)."""
        return trio.SocketListener(trio.socket.from_stdlib_socket(self.sock))


def bind_unix_socket(path: Path) -> BoundSocket:
    """A listening socket at `path` in a private directory, mode 0600."""
    _check_private_directory(path.parent)
    _clear_stale_socket(path)
    return _listen_at(path, 0o600, None)


def bind_shared_socket(path: Path, *, group: int | None, others: bool) -> BoundSocket:
    """The token-only socket at `path`, for other users and containers.

    Its directory, when missing, is made 0700 if only our uid is served, 0750 and given to
    `group` if there is one, else 0711 (others may pass through to the socket, not list
    it). One that exists is used as it is: a volume shared with a container is not ours to
    change, and the file system is only the first fence — the daemon checks every peer's
    uid and groups, and clients check the daemon's. The socket is 0660 and `group`'s with
    a group, 0666 when others are served (the daemon's check decides), else 0600.
    """
    directory = path.parent
    mode = 0o700 if not others and group is None else 0o750 if group is not None else 0o711
    made: Path | None = None
    # Made with its mode (the umask too: mkdir's mode alone is widened by a parent's
    # default ACL, the umask alone ignored under one): no chmod to follow a link.
    old_umask = os.umask(0o777 & ~mode)
    try:
        directory.mkdir(mode=mode)
        made = directory
    except FileExistsError:
        pass
    except OSError as exc:
        raise SocketSetupError(f"cannot create {directory}: {exc.strerror}") from None
    finally:
        os.umask(old_umask)
    if not stat.S_ISDIR(directory.lstat().st_mode):
        raise SocketSetupError(f"{directory} is not a directory")
    try:
        if made is not None and group is not None:
            _give_to_group(made, group)
        _clear_stale_socket(path)
        bound = _listen_at(path, 0o660 if group is not None else 0o666 if others else 0o600,
                           group)
    except BaseException:
        if made is not None:
            with contextlib.suppress(OSError):
                made.rmdir()
        raise
    bound.made_directory = made
    return bound


def _listen_at(path: Path, mode: int, group: int | None) -> BoundSocket:
    """A socket of `mode` (and `group`) listening at `path`.

    bind() makes the file with its mode at once (through the umask), and link() puts it
    at `path` only if nothing is there (another daemon starting: SocketAlreadyServed);
    neither follows a link. The group is given with lchown. So in a directory others can
    write, a shared volume, no chmod or chown of ours follows a link planted meanwhile.
    """
    sock = stdlib_socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
    # Bound and listening under a name of its own first, then linked into place: a client
    # never finds the file before it listens (a process can be preempted between bind
    # and listen for long on a busy machine). Where that cannot be (a file system without
    # hard links, a path at the length limit), bound in place as before.
    staging = path.with_name(f".{secrets.token_hex(3)}")
    if len(os.fsencode(staging)) > MAX_SOCKET_PATH:
        staging = path
    old_umask = os.umask(0o777 & ~mode)
    inode: int | None = None
    try:
        sock.bind(str(staging))
        inode = staging.lstat().st_ino
        sock.listen(LISTEN_BACKLOG)
        if staging != path:
            try:
                os.link(staging, path)
            except OSError as exc:
                if exc.errno not in NO_HARD_LINKS:
                    raise
                os.rename(staging, path)  # nothing was at path a moment ago
    except OSError as exc:
        sock.close()
        if exc.errno in (errno.EEXIST, errno.EADDRINUSE):
            raise SocketAlreadyServed(f"another vm-tokend is starting on {path}") from None
        raise SocketSetupError(f"cannot bind {path}: {exc.strerror or exc}") from None
    finally:
        os.umask(old_umask)
        with contextlib.suppress(OSError):
            if staging != path and inode is not None and staging.lstat().st_ino == inode:
                staging.unlink()
    assert inode is not None
    bound = BoundSocket(sock, path, inode)
    try:
        if group is not None:
            _give_to_group(path, group)
    except BaseException:
        sock.close()
        bound.remove()
        raise
    return bound


def _give_to_group(path: Path, group: int) -> None:
    try:
        os.chown(path, -1, group, follow_symlinks=False)
    except OSError as exc:
        raise SocketSetupError(
            f"cannot give {path} to group {group}: {exc.strerror} (the daemon's user must "
            "be a member of token_socket_group)") from None

