"""The API's original login: a token per VideoManager, refreshed with one refresh token.

`POST /auth/login` answers with the user's VideoManagers and a token valid for one of
them; `POST /auth/refresh/{id}` gives a token for any other. So this session holds a slot
per VideoManager in use, hands a login's token to the slot it is valid for, and renews
the session on that VideoManager's turn when the refresh token is about to run out.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

from .. import upstream
from ..upstream.base import Grant, VideoManagerRef
from ..upstream.legacy import LegacyBackend
from .password_reader import PasswordReader
from .session import REFRESH_TOKEN_MARGIN, AccountConfig, Session
from .slot import Slot
from .timing import REFRESH_AT, REFRESH_JITTER, Timing
from .videomanagers import VideoManagers

__all__ = ["LegacySession"]

log = logging.getLogger("vm_tokend.keeper")


class LegacySession(Session):
    kind = "legacy"

    def __init__(self, source: PasswordReader | None, backend: LegacyBackend, *,
                 config: AccountConfig, timing: Timing) -> None:
        super().__init__(source, config=config, timing=timing)
        self.backend = backend
        self._slots: dict[str, Slot] = {}
        self.login_videomanager: str | None = None  # whose token a login brings

    # -- slots -----------------------------------------------------------------------

    def slot_of(self, vm: VideoManagerRef) -> Slot | None:
        return self._slots.get(vm.id)

    def slot_for(self, vm: VideoManagerRef) -> Slot:
        slot = self._slots.get(vm.id)
        if slot is None:
            slot = self._slots[vm.id] = self.new_slot(
                vm.name, lambda s, vm_id=vm.id: self._idle_at(s, vm_id))
        return slot

    def slots(self) -> Iterable[Slot]:
        return self._slots.values()

    def forget_slot(self, slot: Slot) -> None:
        for vm_id, held in list(self._slots.items()):
            if held is slot:
                del self._slots[vm_id]

    def _idle_at(self, slot: Slot, vm_id: str) -> float:
        """When an unused token is dropped: never for the default and kept-warm ones."""
        if self.vms is not None and vm_id in self.vms.pinned:
            return math.inf
        return slot.last_used + self.config.idle_timeout

    def configure(self) -> None:
        if self.vms is not None:
            self._pin(self.vms)
            for slot in self._slots.values():
                slot.wake.set()  # recompute idle deadlines

    def _pin(self, vms: VideoManagers) -> None:
        vms.pin(self.config.default_videomanager, self.config.videomanagers,
                fallback=self.login_videomanager)
        for vm_id in vms.pinned:
            vm = vms.by_id(vm_id)
            if vm is not None:
                self.slot_for(vm)

    # -- logging in ----------------------------------------------------------------------

    async def _password_grant(self, username: str, password: str) -> Grant:
        grant = await self.backend.login(username, password)
        if not grant.videomanagers:
            raise upstream.TransientError("the API listed no VideoManagers for this user")
        self.login_videomanager = grant.valid_for
        vms = VideoManagers(grant.videomanagers)
        if self.vms is not None:
            vms.notices = self.vms.notices  # logged already
        self._pin(vms)
        self.vms = vms
        return grant

    async def _refresh_grant(self, refresh_token: str, *args: str) -> Grant:
        return await self.backend.refresh(refresh_token, *args)

    async def _establish(self) -> None:
        grant = await self.login()
        self._hand_over(grant)  # its VideoManager, if pinned, needs no refresh

    def _hand_over(self, grant: Grant) -> None:
        """Give a login's token to the slot it is valid for, if we hold one in good
        standing (not backing off, not forbidden)."""
        slot = self._slots.get(grant.valid_for) if grant.valid_for else None
        if slot is not None and slot.in_good_standing:
            slot.take(grant)

    # -- fetching ------------------------------------------------------------------------

    async def _fetch(self, slot: Slot) -> Grant:
        vm_id = self._vm_id(slot)
        if self._login_due(slot, vm_id):
            grant = await self._login_for(vm_id)
            if grant is not None:
                return grant
        try:
            return await self.refresh(vm_id)
        except upstream.RefreshRejected as exc:
            log.info("%s; logging in again", exc)
            self.refresh_token = None
        grant = await self._login_for(vm_id)
        if grant is not None:
            return grant
        try:
            return await self.refresh(vm_id)
        except upstream.RefreshRejected as again:
            self.refresh_token = None
            raise upstream.TransientError(
                f"a fresh refresh token was rejected too: {again}") from None

    def _vm_id(self, slot: Slot) -> str:
        for vm_id, held in self._slots.items():
            if held is slot:
                return vm_id
        raise LookupError("a slot this session does not hold")

    def _login_due(self, slot: Slot, vm_id: str) -> bool:
        """Whether to log in rather than refresh now.

        When there is no refresh token, or it expires within the margin. And one step
        earlier for the VideoManager a login gives a token for: if the refresh token would
        expire before that VideoManager's next refresh, a login now costs no more than
        the refresh would have — it brings this VideoManager's token too — while waiting
        would cost a login on top of another VideoManager's refresh.
        """
        if self.login_due():
            return True
        if vm_id != self.login_videomanager or slot.lifetime is None:
            return False
        margin = slot.lifetime * (REFRESH_AT + REFRESH_JITTER)
        return self.refresh_token_left() < margin + REFRESH_TOKEN_MARGIN

    async def _login_for(self, vm_id: str) -> Grant | None:
        """Log in; the grant if its token is for `vm_id`, else None (a refresh must follow).
        A login's token is valid for one VideoManager; if we hold another's, it gets the
        fresh token rather than going to the API for one later."""
        grant = await self.login_again()
        if grant.valid_for == vm_id:
            return grant
        self._hand_over(grant)
        return None
