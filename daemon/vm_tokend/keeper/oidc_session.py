"""OpenID Connect: one access token for every VideoManager, the list from the API.

The password grant logs in, the refresh grant keeps the token fresh (always with the
newest refresh token: Keycloak may rotate it and end the session when an old one is
reused — the session lock sends one at a time), and `invalid_grant` on a refresh leads to
one new login. The VideoManagers are listed at login and again when a client names one we
do not know, at most once a minute.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from typing import Any, Final, Protocol

import trio

from vm_token.errors import UnknownVideoManager

from .. import upstream
from ..upstream.base import Grant, VideoManagerRef
from ..upstream.oidc import TokenRejected
from .password_reader import PasswordReader
from .session import AccountConfig, Session, contained
from .slot import QUICK_INVALIDATION, Slot
from .timing import Timing
from .videomanagers import VideoManagers

__all__ = ["OidcBackend", "OidcSession"]

log = logging.getLogger("vm_tokend.keeper")

# A client naming a VideoManager we do not know makes us list them again, at most this
# often: a typo in a loop must not become a request per call.
RELIST_INTERVAL: Final = 60.0


class OidcBackend(Protocol):
    """What the keeper needs from an OpenID Connect provider (oidc.OidcApi)."""

    @property
    def issuer(self) -> str: ...

    @property
    def client_id(self) -> str: ...

    async def login(self, username: str, password: str) -> Grant: ...

    async def refresh(self, refresh_token: str) -> Grant: ...

    async def videomanagers(self, access_token: str) -> tuple[VideoManagerRef, ...]: ...


class OidcSession(Session):
    kind = "oidc"

    def __init__(self, source: PasswordReader | None, backend: OidcBackend, *,
                 config: AccountConfig, timing: Timing,
                 initial: tuple[Grant, str, str] | None = None) -> None:
        super().__init__(source, config=config, timing=timing)
        self.backend = backend
        # An interactive login's grant, who it is, and how to log in again ("browser" or
        # "device"): the session has no password and asks for a new interactive login
        # when the refresh token is gone, instead of logging in itself.
        self._initial = initial
        if initial is not None:
            self.identity, self.relogin_hint = initial[1], initial[2]
        self._slot: Slot | None = None
        self._listed_at = -math.inf
        self._relisting: trio.Event | None = None
        self._fresh_rejections: dict[str, int] = {}  # VideoManager id → in a row

    def invalidate(self, token: str, ref: str | None) -> bool:
        """As for any session — but one token serves every VideoManager, so one that keeps
        rejecting fresh tokens (no rights there, most likely) must not make every other
        VideoManager's clients wait: from its second fresh token in a row, its reports
        no longer replace the token."""
        slot, vms = self._slot, self.vms
        if ref is None or slot is None or vms is None or slot.token != token:
            return super().invalidate(token, ref)
        vm = vms.resolve(ref)
        if trio.current_time() - slot.obtained_at >= QUICK_INVALIDATION:
            self._fresh_rejections.pop(vm.id, None)
            return super().invalidate(token, ref)
        count = self._fresh_rejections.get(vm.id, 0) + 1
        self._fresh_rejections[vm.id] = count
        if count >= 2:
            if count == 2:
                log.warning("VideoManager %s rejects fresh tokens that serve the others: "
                            "keeping the token (no rights there?)", vm.name)
            return False
        return super().invalidate(token, ref)

    def describe_auth(self) -> dict[str, Any]:
        return {"auth": self.kind, "issuer": self.backend.issuer,
                "client_id": self.backend.client_id}

    # -- one slot for all ------------------------------------------------------------------

    def slot_of(self, vm: VideoManagerRef | None) -> Slot | None:
        return self._slot

    def slot_for(self, vm: VideoManagerRef | None) -> Slot:
        if self._slot is None:
            # Kept while the session lives: it is every VideoManager's token.
            self._slot = self.new_slot("every VideoManager", lambda slot: math.inf)
        return self._slot

    def slots(self) -> Iterable[Slot]:
        return [self._slot] if self._slot is not None else []

    # -- logging in ----------------------------------------------------------------------

    async def _password_grant(self, username: str, password: str) -> Grant:
        return await self.backend.login(username, password)

    async def _refresh_grant(self, refresh_token: str, *args: str) -> Grant:
        return await self.backend.refresh(refresh_token)

    async def _establish(self) -> None:
        if self._initial is not None:
            grant, self._initial = self._initial[0], None
            self.keep_refresh_token(grant)
            self.logged_in_at_wall = time.time()
            self.slot_for(None).take(grant)
        if self._slot is None or self._slot.valid_for(trio.current_time()) <= 0:
            grant = await self.login()
            self.slot_for(None).take(grant)  # made now: its task finds a token
        slot = self.slot_for(None)
        assert slot.token is not None
        await self._list(slot, slot.token)

    async def _list(self, slot: Slot, token: str) -> None:
        self.config.calls["videomanagers"] += 1
        self._listed_at = trio.current_time()
        try:
            listed = await contained(self.backend.videomanagers(token))
        except TokenRejected:
            slot.invalidate(token)  # the next attempt gets a new one first
            raise
        vms = VideoManagers(listed)
        if self.vms is not None:
            vms.notices = self.vms.notices  # logged already
        vms.pin(self.config.default_videomanager, self.config.videomanagers, fallback=None)
        self.vms = vms

    def configure(self) -> None:
        if self.vms is not None:
            self.vms.pin(self.config.default_videomanager, self.config.videomanagers,
                         fallback=None)

    async def resolve(self, vms: VideoManagers, ref: str | None) -> VideoManagerRef:
        try:
            return vms.resolve(ref)
        except UnknownVideoManager:
            if ref is None or trio.current_time() - self._listed_at < RELIST_INTERVAL:
                raise
        await self._relist()
        return (self.vms or vms).resolve(ref)

    async def _relist(self) -> None:
        """List the VideoManagers again (one request however many clients ask)."""
        if self._relisting is not None:
            await self._relisting.wait()
            return
        self._relisting = done = trio.Event()
        try:
            slot = self._slot
            if slot is not None and slot.token is not None \
                    and slot.valid_for(trio.current_time()) > 0:
                await self._list(slot, slot.token)
        except upstream.UpstreamError as exc:
            log.warning("cannot list the VideoManagers again: %s", exc)
        finally:
            self._relisting = None
            done.set()

    # -- fetching --------------------------------------------------------------------------

    async def _fetch(self, slot: Slot) -> Grant:
        if self.source is None and self.refresh_token is not None:
            # No password: the refresh token is all there is; use it as long as the
            # provider takes it, however close to its announced end.
            try:
                return await self.refresh()
            except upstream.RefreshRejected as exc:
                log.info("%s", exc)
                self.refresh_token = None
            return await self.login_again()  # login required: raises
        if self.login_due():
            return await self.login_again()
        try:
            return await self.refresh()
        except upstream.RefreshRejected as exc:
            log.info("%s; logging in again", exc)
            self.refresh_token = None
        return await self.login_again()
