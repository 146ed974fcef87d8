"""The user's VideoManagers as the API lists them: lookup by id or name, and which ones
the configuration makes the default and keeps warm."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Final

from vm_token.errors import UnknownVideoManager

from ..text import quote
from ..upstream.base import VideoManagerRef

__all__ = ["VideoManagers"]

log = logging.getLogger("vm_tokend.keeper")

# How many VideoManagers an "unknown VideoManager" message names.
NAMES_SHOWN: Final = 10


class VideoManagers:
    """One list of VideoManagers, and the default and kept-warm ones resolved in it."""

    def __init__(self, listed: Sequence[VideoManagerRef]) -> None:
        self.listed = tuple(listed)
        # Ids first: an id wins over a VideoManager whose name looks like an id.
        self._by_key = {vm.name.casefold(): vm for vm in reversed(self.listed)}
        self._by_key.update((vm.id, vm) for vm in self.listed)
        self._by_id = {vm.id: vm for vm in self.listed}
        self.default: VideoManagerRef | None = None
        self.pinned: set[str] = set()
        self.notices: list[str] = []  # how the configuration did not fit the list, for status

    def find(self, ref: str) -> VideoManagerRef | None:
        """A VideoManager by id, or by name case-insensitively."""
        return self._by_key.get(ref) or self._by_key.get(ref.casefold())

    def by_id(self, vm_id: str | None) -> VideoManagerRef | None:
        return self._by_id.get(vm_id) if vm_id is not None else None

    def resolve(self, ref: str | None) -> VideoManagerRef:
        """`ref` (None: the default), or UnknownVideoManager naming a few that exist."""
        if ref is None:
            if self.default is None:
                raise UnknownVideoManager("no default VideoManager: name one")
            return self.default
        vm = self.find(ref)
        if vm is None:
            names = ", ".join(f"{v.name} ({v.id})" for v in self.listed[:NAMES_SHOWN])
            if len(self.listed) > NAMES_SHOWN:
                names += f" and {len(self.listed) - NAMES_SHOWN} more (`vm-token list`)"
            raise UnknownVideoManager(
                f"no VideoManager {quote(ref)} for this user; known: {names or 'none'}"
            )
        return vm

    def pin(self, default: str | None, keep_warm: Sequence[str], fallback: str | None) -> None:
        """Resolve the configured default and kept-warm VideoManagers.

        The default is the configured one, else `fallback` (the one a legacy login's token
        is for), else the first listed (the API's answer need not be consistent); notices
        say what did not fit, and are logged once.
        """
        notices = []
        chosen = None
        if default:
            chosen = self.find(default)
            if chosen is None:
                notices.append(f"default_videomanager {quote(default)} is not one of this "
                               "user's VideoManagers")
        if chosen is None:
            chosen = self.by_id(fallback)
        if chosen is None and self.listed:
            chosen = self.listed[0]
            if not default and fallback is not None:
                notices.append(
                    f"the API's login answer named VideoManager {quote(fallback)}, which is "
                    f"not in the user's list; the default is the first listed, "
                    f"{chosen.name} ({chosen.id})")
        self.default = chosen
        self.pinned = {chosen.id} if chosen else set()
        for ref in keep_warm:
            vm = self.find(ref)
            if vm is None:
                notices.append(f"videomanagers: {quote(ref)} is not one of this user's "
                               "VideoManagers")
            else:
                self.pinned.add(vm.id)
        for notice in notices:
            if notice not in self.notices:
                log.warning("%s", notice)
        self.notices = notices
