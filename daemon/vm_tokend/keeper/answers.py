"""What a session answers clients: tokens, their state, what the API listed.

Every answer reads the session's state; none calls the API itself — a client that needs
a new token wakes the slot's task and waits for its attempt (see slot.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import trio

from vm_token.errors import CredentialsRejected, NotLoggedIn, UpstreamUnavailable
from vm_token.errors import DaemonError as Refused

from ..upstream.base import VideoManagerRef
from .password_reader import PasswordReader
from .slot import Slot, TokenInfo
from .timing import seconds
from .videomanagers import VideoManagers

__all__ = ["Answers", "Changes", "LoginRequired", "SessionEnded"]


class Changes:
    """Something `status` shows changed: a login, a token, an error. Whoever shows the
    state (systemd's STATUS= line) waits for the next change instead of looking again
    and again."""

    def __init__(self) -> None:
        self._next = trio.Event()

    def note(self) -> None:
        self._next.set()
        self._next = trio.Event()  # trio's Events cannot be cleared: one per change

    def next(self) -> trio.Event:
        """An Event set at the next change (take it before looking at the state)."""
        return self._next


# What `list` answers of each VideoManager (a map per VideoManager).
Listing = list[dict[str, Any]]


class SessionEnded(Exception):
    """The session was replaced or ended while a client was waiting on it."""


class LoginRequired(NotLoggedIn):
    """A session without a password can no longer refresh: a person must log in again."""


class Answers:
    """The request side of a Session (which sets these attributes and methods)."""

    source: PasswordReader | None
    vms: VideoManagers | None
    ready: bool
    ended: bool
    blocked: Refused | None
    last_error: str | None
    login_retry_at: float | None
    logged_in_at_wall: float | None
    changed: trio.Event
    kind: str

    identity: str | None
    # (what it was made of, until when it holds, the list): see list()
    _listed: tuple[tuple[object, ...], float, Listing] | None = None

    @property
    def username(self) -> str | None:
        return self.source.username if self.source else self.identity

    # -- requests -------------------------------------------------------------------------

    def require(self) -> None:
        if self.ended:
            raise SessionEnded
        if self.blocked is not None:
            raise self.blocked

    async def wait_logged_in(self) -> VideoManagers:
        """The VideoManagers once the first login succeeded; raise if it failed."""
        while True:
            self.require()
            if self.ready and self.vms is not None:
                return self.vms
            now = trio.current_time()
            if self.login_retry_at is not None and self.login_retry_at > now:
                raise UpstreamUnavailable(f"cannot log in: {self.last_error}; next attempt "
                                          f"in {seconds(self.login_retry_at - now)}")
            await self.changed.wait()

    async def get(self, ref: str | None, min_ttl: float) -> TokenInfo:
        """A token for VideoManager `ref` (id or name; None: default) valid > min_ttl s."""
        waited_on: Slot | None = None
        while True:
            vm = await self.resolve(await self.wait_logged_in(), ref)
            slot = self.slot_for(vm)
            if slot.ready(min_ttl, waited=waited_on is slot):
                return slot.info(vm)
            await slot.wait_attempt(min_ttl)
            waited_on = slot

    def held(self, ref: str | None, min_ttl: float) -> TokenInfo | None:
        """What get() would answer at once, or None if it would do more than hand out a
        token it holds (log in, fetch, wait, refuse)."""
        vms = self.vms
        if self.ended or self.blocked is not None or vms is None or not self.ready:
            return None
        vm = vms.find(ref) if ref is not None else vms.default
        slot = self.slot_of(vm) if vm is not None else None
        if slot is None or vm is None:
            return None
        now = trio.current_time()
        if slot.valid_for(now) <= min_ttl:
            return None
        slot.last_used = now
        return slot.info(vm)

    def invalidate(self, token: str, ref: str | None) -> bool:
        """Drop `token` if it is the current one (of `ref`, or of any VideoManager)."""
        if self.vms is None:
            return False
        if ref is not None:
            slot = self.slot_of(self.vms.resolve(ref))
            candidates = [slot] if slot is not None else []
        else:
            candidates = list(self.slots())
        return any(slot.invalidate(token) for slot in candidates)

    def list(self) -> list[dict[str, Any]]:
        """Every VideoManager of the user, with what we hold for it. No tokens. Not to be
        changed: the same list is answered until something in it changes — `status` and
        `list` ask for it on every request, and it may be 10,000 long."""
        if self.vms is None:
            return []
        now = trio.current_time()
        # What the list is made of, besides time: the VideoManagers, the default, and what
        # each slot holds (a slot is made, replaced or let go with its token).
        key = (self.vms, self.vms.default, tuple(
            (slot, slot.token, slot.refreshed_at_wall, slot.last_error)
            for slot in self.slots()))
        if self._listed is not None and self._listed[0] == key and now < self._listed[1]:
            return self._listed[2]
        listed = self._render(self.vms, now)
        self._listed = (key, self.next_expiry(), listed)  # a token running out changes it
        return listed

    def _render(self, vms: VideoManagers, now: float) -> Listing:
        default = vms.default
        result = []
        for vm in vms.listed:
            slot = self.slot_of(vm)
            item: dict[str, Any] = {"id": vm.id, "name": vm.name, "default": vm == default}
            item.update(slot.describe(now) if slot is not None
                        else {"expires_at": None, "refreshed_at": None, "last_error": None})
            result.append(item)
        return result

    def next_expiry(self) -> float:
        """When the first token still valid expires (trio's clock; inf: none is). What `list`
        shows changes then without any event: a token is refreshed well before, unless
        the API is down."""
        now = trio.current_time()
        return min((slot.expires_at for slot in self.slots()
                    if slot.token is not None and slot.expires_at > now), default=math.inf)

    def state(self) -> dict[str, Any]:
        """The session's state for `status`. No secrets."""
        if self.blocked is not None:
            state = ("credentials_rejected" if isinstance(self.blocked, CredentialsRejected)
                     else "login_required" if isinstance(self.blocked, LoginRequired)
                     else "not_logged_in")
        elif not self.ready:
            state = "logging_in" if self.login_retry_at is None else "upstream_unavailable"
        else:
            state = "logged_in"
        return {
            "state": state,
            "username": self.username,
            "logged_in_at": self.logged_in_at_wall,
            "last_error": self.blocked.message if self.blocked else self.last_error,
            "notices": list(self.vms.notices) if self.vms else [],
            **self.describe_auth(),
        }

    # -- decided by the way of logging in (see Session) ----------------------------------

    def describe_auth(self) -> dict[str, Any]:
        return {"auth": self.kind}

    async def resolve(self, vms: VideoManagers, ref: str | None) -> VideoManagerRef:
        return vms.resolve(ref)

    def slot_for(self, vm: VideoManagerRef) -> Slot:
        """The slot whose token serves `vm`, made if needed."""
        raise NotImplementedError

    def slot_of(self, vm: VideoManagerRef) -> Slot | None:
        raise NotImplementedError

    def slots(self) -> Iterable[Slot]:
        raise NotImplementedError
