"""Who is at the other end of a Unix socket, and whom a socket serves: one rule for the
daemon's sockets and the proxy's (refusals are logged by `refusals`).

The kernel tells a Unix socket's peer as it was when it connected: uid, gid and pid by
SO_PEERCRED, its supplementary groups by SO_PEERGROUPS (Linux 4.13) — both race-free,
unlike a look at /proc/PID afterwards (the pid may be gone, or another process's by then),
and both for peers in another pid namespace too, whose pid reads 0. /proc/PID/status is
read only where SO_PEERGROUPS cannot answer.

Every socket serves our own uid. The daemon's main socket and the proxy's socket serve
root too, who could read our memory anyway; the token-only socket does not: the root of a
container that shares it through a volume has no way into our memory, only into that
volume. `allow_uids` and `allow_gids` add who else a socket serves.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import trio

from .config.settings import overflow_id

__all__ = ["OVERFLOW_UID_MESSAGE", "Peer", "PeerRule", "peer_groups", "runs_as_overflow_uid",
           "socket_peer", "unmapped_ids", "warn_if_unreachable"]

log = logging.getLogger(__name__)

_PEERCRED: Final = struct.Struct("iII")  # struct ucred: pid, uid, gid (uid_t, gid_t unsigned)
# Not in Python's socket module; 59 on every architecture Linux shares its numbers with.
SO_PEERGROUPS: Final = getattr(socket, "SO_PEERGROUPS", 59)
# Python's getsockopt takes at most 1024 bytes: 256 groups. A peer in more is looked up
# in /proc instead.
_GROUPS_ROOM: Final = 1024


@dataclass(frozen=True, slots=True)
class Peer:
    uid: int
    gid: int  # primary
    pid: int  # 0 when the peer is not in our pid namespace


def socket_peer(stream: trio.abc.Stream) -> Peer | None:
    """The peer of a Unix socket (SO_PEERCRED), as it was when it connected; None for
    anything else."""
    if not isinstance(stream, trio.SocketStream):
        return None
    try:
        raw = stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    except OSError:
        return None
    pid, uid, gid = _PEERCRED.unpack(raw)
    return Peer(int(uid), int(gid), int(pid))


def peer_groups(stream: trio.abc.Stream, peer: Peer) -> frozenset[int]:
    """The peer's supplementary groups: SO_PEERGROUPS, else /proc/PID/status where
    readable; none when neither says."""
    if isinstance(stream, trio.SocketStream):
        try:
            raw = stream.socket.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, _GROUPS_ROOM)
            return frozenset(struct.unpack(f"{len(raw) // 4}I", raw[:len(raw) // 4 * 4]))
        except OSError:
            pass  # an older kernel, or more groups than fit
    return _proc_groups(peer.pid)


def _proc_groups(pid: int) -> frozenset[int]:
    if pid <= 0:
        return frozenset()
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Groups:"):
                    return frozenset(int(g) for g in line.split()[1:] if g.isdigit())
    except OSError:
        pass
    return frozenset()


@dataclass(frozen=True)
class PeerRule:
    """Whom a socket serves: our uid; root if `root`; the uids in `uids`; a peer whose
    primary or supplementary group is in `gids`."""

    root: bool = True
    uids: frozenset[int] = field(default_factory=frozenset)
    gids: frozenset[int] = field(default_factory=frozenset)

    @classmethod
    def allowing(cls, uids: Iterable[int], gids: Iterable[int], *, root: bool) -> PeerRule:
        return cls(root, frozenset(uids), frozenset(gids))

    @property
    def opens_to_others(self) -> bool:
        """Whether anyone but our uid (and root) is served: then the socket's file must
        let them connect."""
        return bool(self.uids - {os.getuid()} or self.gids)

    def admits(self, stream: trio.abc.Stream, peer: Peer | None) -> bool:
        if peer is None:
            return False
        if peer.uid == os.getuid() or peer.uid in self.uids or (self.root and peer.uid == 0):
            return True
        if not self.gids:
            return False
        return peer.gid in self.gids or not self.gids.isdisjoint(peer_groups(stream, peer))

    def admits_uid(self, uid: int | None) -> bool:
        """For a peer whose uid alone is known (loopback TCP): our uid, or one of `uids`
        — never by group, nor root unless listed."""
        return uid is not None and (uid == os.getuid() or uid in self.uids)


def _mapped(kind: str) -> list[tuple[int, int]]:
    """The ids our user namespace maps, as (first, count) ranges: the first and third
    columns of /proc/self/{uid,gid}_map. Everything, when it cannot be read."""
    try:
        with open(f"/proc/self/{kind}_map", encoding="ascii") as table:
            return [(int(first), int(count)) for first, _, count in
                    (line.split() for line in table if len(line.split()) == 3)]
    except (OSError, ValueError):
        return [(0, 2**32 - 1)]


def runs_as_overflow_uid() -> bool:
    """Whether we run, in a user namespace of our own, as its overflow uid: then every user
    the namespace does not map shows as our uid too, and no peer check can tell our own
    clients from them."""
    return _mapped("uid") != [(0, 2**32 - 1)] and os.getuid() == overflow_id("uid")


OVERFLOW_UID_MESSAGE: Final = (
    "it runs as uid {uid}, the overflow uid of its user namespace: every user the "
    "namespace does not map shows as that uid too, so it cannot tell its own clients from "
    "them; run it as another uid (in a container: a USER other than nobody)")


def unmapped_ids(uids: Iterable[int], gids: Iterable[int]) -> dict[str, list[int]]:
    """Of the ids allowed, those no peer can show as here: not mapped into our user
    namespace (systemd's PrivateUsers=, a container's), every such peer shows as the
    overflow id instead. By kind ("uid", "gid"), only the kinds with any."""
    found = {}
    for kind, ids in (("uid", uids), ("gid", gids)):
        ranges = _mapped(kind)
        missing = sorted(i for i in ids if not any(f <= i < f + n for f, n in ranges))
        if missing:
            found[kind] = missing
    return found


def closed_directory(path: Path, group: int | None) -> Path | None:
    """The first directory on the way to `path` that other users cannot pass through
    (no x for others — nor for `group`, when there is one), or None."""
    for directory in reversed(path.absolute().parents):
        try:
            info = directory.stat()
        except OSError:
            return directory
        if info.st_mode & 0o001 or group is not None and info.st_gid == group \
                and info.st_mode & 0o010:
            continue
        return directory
    return None


def warn_if_unreachable(rule: PeerRule, path: Path | None, group: int | None, *,
                        setting: str) -> None:
    """Warn when the users and groups `rule` allows cannot reach the socket at `path`
    (named by `setting`), or can never show as themselves here."""
    if not rule.opens_to_others:
        return
    closed = closed_directory(path, group) if path is not None else None
    if closed is not None:
        log.warning("allow_uids and allow_gids reach nobody on %s: other users cannot pass "
                    "through %s; set %s to a path they can reach", path, closed, setting)
    for kind, ids in unmapped_ids(rule.uids, rule.gids).items():
        log.warning("allow_%ss %s: not mapped into this user namespace (systemd's "
                    "PrivateUsers=, a container's): they show as the overflow %s and are "
                    "refused; see the README on the token socket", kind,
                    ", ".join(map(str, ids)), kind)
