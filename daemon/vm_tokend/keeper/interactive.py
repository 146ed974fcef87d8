"""Interactive logins in progress: at most one at a time, held by the daemon.

`vm-token login --browser` (or `--device`) drives a flow through the wire ops
login_start / login_finish / login_wait / login_cancel; the flow's secrets (state, nonce,
PKCE verifier, device code) never leave the daemon. A new flow cancels the one before it:
two terminals racing to log in end with the later one's login.

A redirect that is not this login's answer (another `state`) is refused and the flow goes
on: whoever sends one cannot end it. A login that comes back as somebody other than the
profile's `username` changes nothing: the session in place stays.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final, TypeVar

import trio

from vm_token.errors import BadRequest, LoginFailed, UpstreamUnavailable

from .. import upstream
from ..text import quote
from ..upstream.base import Grant
from ..upstream.interactive_grants import CodeFlow, DeviceFlow, identity
from ..upstream.interactive_grants import LoginFailed as FlowFailed
from ..upstream.oidc import OidcApi

__all__ = ["Flow", "InteractiveLogins"]

log = logging.getLogger("vm_tokend.keeper")

T = TypeVar("T")

# How long a browser login may take from start to finish (vm-token waits 5 minutes by
# default; a little more here so the daemon is never the first to give up).
CODE_FLOW_LIFETIME: Final = 600.0


@dataclass
class Flow:
    """One interactive login in progress."""

    id: str
    code: CodeFlow | None = None
    device: DeviceFlow | None = None
    expires_at: float = 0.0
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)  # cancel() ends it
    cancelled: bool = False
    ended: trio.Event = field(default_factory=trio.Event)  # cancelled, or finished
    busy: bool = False  # a finish or wait is under way


class InteractiveLogins:
    """The flow in progress, and what completes it: `done(grant, username, api)`."""

    def __init__(self, connect: Callable[[], Awaitable[OidcApi]],
                 done: Callable[[Grant, str, OidcApi, str], Awaitable[None]]) -> None:
        self._connect = connect
        self._done = done
        self._flow: Flow | None = None
        self._api: OidcApi | None = None

    def cancel(self, flow_id: str | None = None) -> bool:
        """Cancel the flow in progress (only if it is `flow_id`, when given)."""
        flow = self._flow
        if flow is None or (flow_id is not None and flow.id != flow_id):
            return False
        self._flow = None
        flow.cancelled = True
        flow.scope.cancel()
        flow.ended.set()
        log.info("interactive login cancelled")
        return True

    async def start_code(self, redirect_uri: str) -> tuple[Flow, CodeFlow]:
        api = await self._begin()
        code = await _told(CodeFlow.start(api, redirect_uri), "start")
        flow = self._new(code=code, expires_at=trio.current_time() + CODE_FLOW_LIFETIME)
        log.info("browser login started (redirect to %s)", redirect_uri)
        return flow, code

    async def start_device(self) -> tuple[Flow, DeviceFlow]:
        api = await self._begin()
        device = await _told(DeviceFlow.start(api), "start")
        flow = self._new(device=device, expires_at=device.expires_at)
        log.info("device login started; waiting for the user to enter the code")
        return flow, device

    async def finish_code(self, flow_id: str, code: str, state: str, iss: str | None = None,
                          *, user: str | None = None) -> str:
        """Exchange the code the browser brought; the username logged in. `iss` is the
        redirect's (RFC 9207), `user` the profile's username (None: anybody)."""
        flow = self._take(flow_id, "code", state)
        assert flow.code is not None
        try:
            grant = await self._until_cancelled(flow, flow.code.finish(self._api_(), code,
                                                                        state, iss))
            return await self._complete(flow, grant, flow.code.nonce, "browser", user)
        finally:
            self._end(flow)

    async def wait_device(self, flow_id: str, *, user: str | None = None) -> str:
        """Poll until the user approved the device code; the username logged in."""
        flow = self._take(flow_id, "device")
        assert flow.device is not None
        try:
            grant = await self._until_cancelled(flow, flow.device.wait(self._api_()))
            return await self._complete(flow, grant, None, "device", user)
        finally:
            self._end(flow)

    # -- internals ------------------------------------------------------------------------

    async def _begin(self) -> OidcApi:
        self.cancel()  # a newer login wins
        self._api = await self._connect()
        return self._api

    def _api_(self) -> OidcApi:
        assert self._api is not None
        return self._api

    def _new(self, **fields: object) -> Flow:
        flow = Flow(id=secrets.token_urlsafe(16), **fields)  # type: ignore[arg-type]
        self._flow = flow
        return flow

    def _take(self, flow_id: str, kind: str, state: str | None = None) -> Flow:
        flow = self._flow
        if flow is None or flow.id != flow_id or flow.busy:
            raise LoginFailed("no such login in progress (it ended, or a newer one replaced "
                              "it): start again")
        if (kind == "code") != (flow.code is not None):
            raise BadRequest(f"login {quote(flow_id, 30)} is not a {kind} login")
        if trio.current_time() >= flow.expires_at:
            self._end(flow)
            raise LoginFailed("the login took too long: start again")
        if flow.code is not None and state is not None and not flow.code.answers(state):
            # Not this login's answer: whoever sent it (a stale tab, another local
            # process) must not be able to end the login the user is in.
            raise BadRequest("the state does not match this login's: this is not the answer "
                             "to it (nothing was exchanged; the login goes on)")
        flow.busy = True
        return flow

    def _end(self, flow: Flow) -> None:
        flow.busy = False
        if self._flow is flow:
            self._flow = None
            flow.ended.set()

    async def watch(self, flow_id: str) -> None:
        """Return when the browser login `flow_id` ends; LoginFailed if it was cancelled
        (a newer login, Ctrl-C elsewhere): vm-token, waiting for its redirect, hears so."""
        flow = self._flow
        if flow is None or flow.id != flow_id:
            raise LoginFailed("no such login in progress (it ended, or a newer one replaced "
                              "it): start again")
        with trio.move_on_at(flow.expires_at):
            await flow.ended.wait()
        if not flow.ended.is_set():
            self.cancel(flow.id)  # its secrets go with it
            raise LoginFailed("the login took too long: start again")
        if flow.cancelled:
            raise LoginFailed("this login was cancelled by a newer one (or Ctrl-C)")

    async def _until_cancelled(self, flow: Flow, work: Awaitable[Grant]) -> Grant:
        """`work`'s grant, unless the flow is cancelled first; upstream failures become
        what the client is told."""
        with flow.scope:
            return await _told(work, "finish")
        # Only a cancelled scope gets here.
        raise LoginFailed("the login was cancelled (by Ctrl-C, or a newer login)")

    async def _complete(self, flow: Flow, grant: Grant, nonce: str | None, how: str,
                        user: str | None) -> str:
        api = self._api_()
        try:
            who = await identity(grant, api, nonce)
        except FlowFailed as exc:
            raise LoginFailed(str(exc)) from None
        if flow.cancelled:
            raise LoginFailed("the login was cancelled (by Ctrl-C, or a newer login)")
        if user is not None and not who.is_user(user):
            who = await who.with_userinfo(grant, api)
        if user is not None and not who.is_user(user):
            # Somebody else's account (a shared browser, a wrong tab, a forged redirect
            # that got this far): the session in place, if any, stays as it is.
            log.warning("an interactive login came back as %s, not %s: refused",
                        quote(who.name), quote(user))
            raise LoginFailed(f"logged in as {quote(who.name)}, but this profile is for "
                              f"{quote(user)}: nothing changed; log in as {quote(user)}")
        await self._done(grant, who.name, api, how)
        log.info("logged in interactively as %s", quote(who.name))
        return who.name


async def _told(work: Awaitable[T], step: str) -> T:
    """`work`, one step of a flow ("start", "finish"): the provider's refusals and failures
    become what the client is told (login_failed, upstream_unavailable), not an internal
    error."""
    try:
        return await work
    except (FlowFailed, upstream.ClientRejected) as exc:
        raise LoginFailed(str(exc)) from None
    except upstream.UpstreamError as exc:
        raise UpstreamUnavailable(f"the login could not {step}: {exc}") from None

