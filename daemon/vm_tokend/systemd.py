"""systemd integration, written out rather than bound to libsystemd.

* Socket activation: `LISTEN_PID`/`LISTEN_FDS`/`LISTEN_FDNAMES` (sd_listen_fds(3)).
* Notifications: one datagram per message to `$NOTIFY_SOCKET` (sd_notify(3)), abstract
  `@` addresses included; READY, STATUS, RELOADING, STOPPING, WATCHDOG.
* The journal: `JOURNAL_STREAM` tells whether stderr is the journal (then log lines carry a
  `<N>` priority prefix and no timestamp).
* Process hygiene, as ssh-agent does: not dumpable (no ptrace by the user's other
  processes), no core files.

Each function takes the environment as a Mapping, so tests can hand it one.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping, MutableMapping
from typing import Final

__all__ = [
    "ActivationError",
    "Notifier",
    "activated_socket",
    "harden_process",
    "stderr_is_journal",
    "watchdog_interval",
]

log = logging.getLogger(__name__)

SD_LISTEN_FDS_START: Final = 3
# The name our .socket unit gives its descriptor (FileDescriptorName=).
FD_NAME: Final = "vm-tokend"
_LISTEN_VARIABLES: Final = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


class ActivationError(Exception):
    """The socket systemd passed cannot be used; the message says why."""


def activated_socket(environ: MutableMapping[str, str], fd_name: str = FD_NAME
                     ) -> socket.socket | None:
    """The listening socket systemd passed us, or None when not socket-activated.

    Only when `LISTEN_PID` is our pid (the variables may have leaked from a parent). With
    several descriptors, the one named `fd_name` in `LISTEN_FDNAMES`. The variables are
    removed from `environ` either way, so children (a password command) do not see them.
    """
    values = {name: environ.pop(name, "") for name in _LISTEN_VARIABLES}
    try:
        pid = int(values["LISTEN_PID"])
        count = int(values["LISTEN_FDS"])
    except ValueError:
        return None
    if pid != os.getpid() or count < 1:
        return None
    names = values["LISTEN_FDNAMES"].split(":")
    fds = list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count))
    if count == 1:
        fd = fds[0]
    else:
        named = [fd for fd, name in zip(fds, names, strict=False) if name == fd_name]
        if not named:
            raise ActivationError(
                f"systemd passed {count} sockets and none is named {fd_name!r} "
                "(FileDescriptorName= in the .socket unit)"
            )
        fd = named[0]
    for other in fds:
        if other != fd:
            os.set_inheritable(other, False)
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ActivationError(f"descriptor {fd} from systemd is not a socket: {exc}") from None
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise ActivationError(
            "systemd passed a socket that is not a Unix stream socket; vm-tokend checks its "
            "peers' uid and serves only on Unix sockets (ListenStream=%t/vm-token/socket)"
        )
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock.detach()
        raise ActivationError("systemd passed a socket that is not listening (Accept=no, "
                              "please)")
    sock.set_inheritable(False)
    return sock


def watchdog_interval(environ: Mapping[str, str]) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None if not asked."""
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    watchdog_pid = environ.get("WATCHDOG_PID")
    if usec <= 0 or (watchdog_pid and watchdog_pid != str(os.getpid())):
        return None
    return usec / 2 / 1_000_000


def stderr_is_journal(environ: Mapping[str, str]) -> bool:
    """Whether stderr is connected to the journal (JOURNAL_STREAM is its `device:inode`)."""
    stream = environ.get("JOURNAL_STREAM", "")
    device, _, inode = stream.partition(":")
    try:
        info = os.fstat(2)
        return (int(device), int(inode)) == (info.st_dev, info.st_ino)
    except (ValueError, OSError):
        return False


class Notifier:
    """sd_notify: datagrams to $NOTIFY_SOCKET; does nothing when that is not set."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        address = environ.get("NOTIFY_SOCKET", "")
        self._address: str | bytes | None = None
        self._sock: socket.socket | None = None
        self._last_status: str | None = None
        if not address:
            return
        if address.startswith("@"):
            self._address = b"\0" + address[1:].encode()  # abstract namespace
        elif address.startswith("/"):
            self._address = address
        else:
            log.warning("ignoring NOTIFY_SOCKET=%r: not a Unix socket path", address)
            return
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.setblocking(False)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *fields: str) -> bool:
        if self._sock is None or self._address is None:
            return False
        try:
            self._sock.sendto("\n".join(fields).encode(), self._address)
        except OSError as exc:
            # Never fatal: a missing supervisor must not take the daemon down.
            log.debug("sd_notify failed: %s", exc.strerror)
            return False
        return True

    def ready(self) -> None:
        self.send("READY=1")

    def status(self, text: str) -> None:
        """STATUS=, only when it changed; one line."""
        text = " ".join(text.split())
        if text != self._last_status:
            self._last_status = text
            self.send(f"STATUS={text}")

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def harden_process() -> None:
    """No ptrace by other processes of the user, no core files; log, never fail."""
    import ctypes
    import resource

    PR_SET_DUMPABLE = 4  # noqa: N806 - the constant's name in <sys/prctl.h>
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    except (OSError, AttributeError) as exc:
        log.warning("cannot make the process non-dumpable: %s", exc)
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (OSError, ValueError) as exc:
        log.warning("cannot disable core files: %s", exc)
