"""Wires settings, upstream, keeper and server together, and handles signals.

SIGTERM/SIGINT: stop accepting, let in-flight requests finish (up to 2 s), remove the
socket file, return. SIGHUP: reload the configuration; start a new login session if the
credentials or the API changed, or if the last ones were rejected.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import trio

from vm_token import __version__

from .config.settings import ConfigError, Profiles, Settings, load_config, resolve_profiles
from .keeper import Keeper
from .peers import PeerRule, warn_if_unreachable
from .runtimes import Runtimes
from .server.connections import Server
from .server.dispatch import Dispatcher
from .server.listener import BoundSocket
from .server.routing import Routes
from .systemd import Notifier

__all__ = ["App"]

log = logging.getLogger(__name__)


class App:
    """The whole daemon, for `__main__` and for tests that run it in-process."""

    def __init__(
        self,
        settings: Settings,
        bound: BoundSocket,
        *,
        profiles: Profiles | None = None,
        flags: dict[str, Any] | None = None,
        notifier: Notifier | None = None,
        watchdog_interval: float | None = None,
        token_bound: BoundSocket | None = None,
    ) -> None:
        self.settings = settings
        self.profiles = profiles if profiles is not None else resolve_profiles(settings)
        self.notifier = notifier if notifier is not None else Notifier({})
        self.watchdog_interval = watchdog_interval
        self.flags = dict(flags or {})
        self.bound = bound
        self.token_bound = token_bound  # the token-only socket, if the settings ask for one
        # whether its file lets other users connect: set when it is made, at start
        self._token_opened = self._token_rule().opens_to_others or \
            settings.token_socket_group is not None
        self.started_at = time.time()
        self.keeper: Keeper | None = None
        self.runtimes: Runtimes | None = None
        self.server: Server | None = None
        self.token_server: Server | None = None
        self._nursery: trio.Nursery | None = None

    def stop(self) -> None:
        self.notifier.stopping()
        for server in (self.server, self.token_server):
            if server is not None:
                server.stop()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            self.keeper = keeper = Keeper()
            keeper.default_profile = self.settings.default_profile
            routes = Routes(keeper)
            self.runtimes = runtimes = Runtimes(keeper, self.settings.max_backoff, routes)
            dispatcher = Dispatcher(keeper, version=__version__, login=self._login,
                                    describe=self._describe, routes=routes)
            self.server = Server(self.bound.listener(), dispatcher, fast=dispatcher.fast_reply,
                                 on_close=self.bound.remove)
            if self.token_bound is not None:
                self.token_server = Server(
                    self.token_bound.listener(), dispatcher.token_only(),
                    fast=dispatcher.fast_reply, rule=self._token_rule(),
                    name=" on the token socket", on_close=self.token_bound.remove)
            try:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    await nursery.start(keeper.run)
                    for name, profile in self.profiles.valid.items():
                        await runtimes.add(name, profile)
                    nursery.start_soon(self._on_signals, signals)
                    await nursery.start(self._serve)
                    where = self.bound.path or "the socket systemd passed"
                    log.info("vm-tokend %s serving on %s", __version__, where)
                    if self.token_bound is not None:
                        self._say_token_socket()
                    self.notifier.ready()
                    if self.notifier.enabled:
                        nursery.start_soon(self._report_status)
                        if self.watchdog_interval:
                            nursery.start_soon(self._watchdog, self.watchdog_interval)
                    task_status.started()
            finally:
                with trio.CancelScope(shield=True):
                    await runtimes.close()
        log.info("stopped")

    async def _serve(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        assert self.server is not None and self._nursery is not None
        async with trio.open_nursery() as servers:
            for server in (self.server, self.token_server):
                if server is not None:
                    await servers.start(server.serve)
            task_status.started()
        self._nursery.cancel_scope.cancel()  # the keeper and signal tasks end with it

    def _token_rule(self) -> PeerRule:
        """Whom the token socket serves: our uid and those allowed; root only if listed
        (a container's root reaches the socket through a volume, not our memory)."""
        return PeerRule.allowing(self.settings.allow_uids, self.settings.allow_gids,
                                 root=False)

    def _say_token_socket(self) -> None:
        assert self.token_bound is not None
        rule = self._token_rule()
        who = ", ".join([*(f"uid {uid}" for uid in sorted(rule.uids)),
                         *(f"gid {gid}" for gid in sorted(rule.gids))]) or "no one else"
        log.info("token socket on %s: hello, get, invalidate and list for this user and %s",
                 self.token_bound.path, who)
        warn_if_unreachable(rule, self.token_bound.path, self.settings.token_socket_gid,
                            setting="token_socket")

    async def _watchdog(self, interval: float) -> None:
        # Runs on the event loop: if the loop is stuck, the pings stop and systemd restarts us.
        while True:
            self.notifier.watchdog()
            await trio.sleep(interval)

    async def _report_status(self) -> None:
        """STATUS= whenever what it says changes — and only then: at rest the daemon
        sleeps until its next refresh."""
        assert self.keeper is not None
        while True:
            changed = self.keeper.changes.next()
            self.notifier.status(self.summary())
            # A token that runs out changes "N tokens held" without any event.
            with trio.move_on_at(self.keeper.next_expiry()):
                await changed.wait()

    def summary(self) -> str:
        """One line on the daemon's state, for systemctl status (never a secret); with
        several profiles, one clause each."""
        assert self.keeper is not None
        names = list(self.keeper.accounts)
        if len(names) <= 1:
            return self._summary(names[0]) if names else "no profile"
        return "; ".join(f"{name}: {self._summary(name)}" for name in names)

    def _summary(self, profile: str) -> str:
        assert self.keeper is not None
        state = self.keeper.state(profile)
        user = state["username"]
        error = state["last_error"]
        match state["state"]:
            case "logged_out":
                return "waiting for `vm-token login` (no credentials configured)"
            case "logging_in":
                return f"logging in as {user}"
            case "upstream_unavailable":
                return f"cannot reach the API to log in as {user}: {error}"
            case "credentials_rejected":
                return f"credentials for {user} rejected; waiting for `vm-token login` or a reload"
            case "not_logged_in":
                return f"cannot log in: {error}"
            case "login_required":
                return f"login required: {error}"
        videomanagers = self.keeper.list(profile)
        held = sum(1 for vm in videomanagers if vm["expires_at"] is not None)
        text = (f"logged in as {user}; {len(videomanagers)} VideoManagers, "
                f"{held} tokens held")
        errors = [vm["last_error"] for vm in videomanagers if vm["last_error"]]
        if errors:
            text += f"; last upstream error: {errors[-1]}"
        return text

    async def _on_signals(self, signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            if signum == signal.SIGHUP:
                await self.reload()
            else:
                log.info("%s: shutting down", signal.Signals(signum).name)
                self.stop()

    async def _login(self, profile: str | None, username: str, password: str) -> None:
        assert self.keeper is not None and self.runtimes is not None
        await self.runtimes.login(profile or self.keeper.default_profile, username, password)

    def _describe(self, name: str | None = None) -> dict[str, Any]:
        runtimes = self.runtimes.by_name if self.runtimes else {}
        if name is None and self.keeper is not None:
            name = self.keeper.default_profile
        runtime = runtimes.get(name) if name is not None else None
        profile = runtime.profile if runtime else self.settings
        return {
            "login_method": profile.login_method,
            "redirect_port": profile.oidc_redirect_port,
            "version": __version__,
            "pid": os.getpid(),
            "api_url": profile.api_url,
            "ca_bundle": str(profile.ca_bundle) if profile.ca_bundle is not None else None,
            "profile_apis": {name: r.profile.api_url for name, r in runtimes.items()},
            "uptime": round(time.time() - self.started_at, 3),
            "connections_accepted": self.server.accepted if self.server else 0,
            "connections_open": self.server.open_connections if self.server else 0,
        }

    async def reload(self) -> None:
        """Re-read the configuration (SIGHUP)."""
        assert self.keeper is not None
        log.info("SIGHUP: reloading the configuration")
        self.notifier.reloading()
        try:
            await self._reload()
        finally:
            self.notifier.ready()
            self.notifier.status(self.summary())

    async def _reload(self) -> None:
        assert self.keeper is not None and self.runtimes is not None
        try:
            new, profiles = load_config(self.flags, strict=False)
        except ConfigError as exc:
            log.error("reload failed, keeping the running configuration: %s", exc)
            return
        for error in profiles.errors.values():
            log.error("reload: %s; that profile keeps its running configuration", error)
        old, self.settings = self.settings, new
        self.profiles = profiles
        for name in ("socket", "token_socket", "token_socket_group"):
            if getattr(new, name) != getattr(old, name):
                log.warning("a change of %s takes effect only after a restart", name)
        if self.token_server is not None and (new.allow_uids, new.allow_gids) != (
                old.allow_uids, old.allow_gids):
            self.token_server.set_rule(self._token_rule())
            self._say_token_socket()
            if self._token_rule().opens_to_others and not self._token_opened:
                log.warning("allow_uids and allow_gids now name other users, but the token "
                            "socket was made for this user alone (0600): restart vm-tokend "
                            "for them to reach it")
        logging.getLogger("vm_tokend").setLevel(new.log_level.upper())
        runtimes = self.runtimes
        runtimes.max_backoff = new.max_backoff
        for name in list(runtimes.by_name):
            if name not in profiles.valid and name not in profiles.errors:
                await runtimes.remove(name)
        for name, profile in profiles.valid.items():
            if name in runtimes.by_name:
                await runtimes.reload(name, profile)
            else:
                log.info("profile %s added", name)
                await runtimes.add(name, profile)
        if new.default_profile in self.keeper.accounts:
            self.keeper.default_profile = new.default_profile
