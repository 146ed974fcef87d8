"""Wires settings, upstream, keeper and server together, and handles signals.

SIGTERM/SIGINT: stop accepting, let in-flight requests finish (up to 2 s), remove the
socket file, return. SIGHUP: reload the configuration; start a new login session if the
credentials or the API changed, or if the last ones were rejected.
"""

from __future__ import annotations

import logging
import os
import signal
import ssl
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import httpx
import trio
from pydantic import SecretStr

from vm_token import __version__

from .connect import Connector
from .keeper import Keeper
from .server import BoundSocket, Dispatcher, Server
from .settings import ConfigError, Credentials, PasswordUnavailable, Settings, load_settings
from .systemd import Notifier
from .upstream import CONNECT_TIMEOUT, TOTAL_TIMEOUT

__all__ = ["App"]

log = logging.getLogger(__name__)

# How often STATUS= is recomputed (and sent, if it changed).
STATUS_INTERVAL = 1.0


def _ssl_context(settings: Settings) -> ssl.SSLContext:
    # Certificates are always verified; ca_bundle only changes which CAs we trust.
    if settings.ca_bundle is not None:
        return ssl.create_default_context(cafile=str(settings.ca_bundle))
    return ssl.create_default_context()


class App:
    """The whole daemon, for `__main__` and for tests that run it in-process."""

    def __init__(
        self,
        settings: Settings,
        bound: BoundSocket,
        *,
        flags: dict[str, Any] | None = None,
        notifier: Notifier | None = None,
        watchdog_interval: float | None = None,
    ) -> None:
        self.settings = settings
        self.notifier = notifier if notifier is not None else Notifier({})
        self.watchdog_interval = watchdog_interval
        self.flags = dict(flags or {})
        self.bound = bound
        self.started_at = time.time()
        self.keeper: Keeper | None = None
        self.server: Server | None = None
        self._connector: Connector | None = None
        self._nursery: trio.Nursery | None = None
        # Whether the session's credentials came from the configuration (a reload may then
        # change them) or from a client's `login` (a reload leaves those alone).
        self._configured_session = False

    def stop(self) -> None:
        self.notifier.stopping()
        if self.server is not None:
            self.server.stop()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        settings = self.settings
        timeout = httpx.Timeout(TOTAL_TIMEOUT, connect=CONNECT_TIMEOUT)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async with httpx.AsyncClient(
                timeout=timeout,
                verify=_ssl_context(settings),
                follow_redirects=False,
                headers={"User-Agent": f"vm-tokend/{__version__}"},
            ) as http:
                calls: Counter[str] = Counter()
                self._connector = Connector(http, lambda: self.settings, calls)
                self.keeper = keeper = Keeper(
                    self._connector,
                    calls=calls,
                    default_videomanager=settings.default_videomanager,
                    videomanagers=settings.videomanagers,
                    idle_timeout=settings.idle_timeout,
                    max_backoff=settings.max_backoff,
                )
                dispatcher = Dispatcher(
                    keeper, version=__version__, login=self._login, describe=self._describe,
                    git_hosts=lambda: self.settings.git_hosts(),
                )
                self.server = Server(self.bound, dispatcher, fast=dispatcher.fast_reply)
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    await nursery.start(keeper.run)
                    credentials = settings.credentials()
                    if credentials is None:
                        how = "--browser" if settings.login_method == "browser" else ""
                        log.info("no credentials configured; waiting for `vm-token login%s`",
                                 f" {how}" if how else "")
                    else:
                        log.info("logging in as %r with %s", credentials.username,
                                 credentials.describe())
                    self._configured_session = credentials is not None
                    await keeper.start_session(credentials)
                    nursery.start_soon(self._on_signals, signals)
                    await nursery.start(self._serve)
                    where = self.bound.path or "the socket systemd passed"
                    log.info("vm-tokend %s serving on %s", __version__, where)
                    self.notifier.ready()
                    if self.notifier.enabled:
                        nursery.start_soon(self._report_status)
                        if self.watchdog_interval:
                            nursery.start_soon(self._watchdog, self.watchdog_interval)
                    task_status.started()
        log.info("stopped")

    async def _serve(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        assert self.server is not None and self._nursery is not None
        await self.server.serve(task_status=task_status)
        self._nursery.cancel_scope.cancel()  # the keeper and signal tasks end with it

    async def _watchdog(self, interval: float) -> None:
        # Runs on the event loop: if the loop is stuck, the pings stop and systemd restarts us.
        while True:
            self.notifier.watchdog()
            await trio.sleep(interval)

    async def _report_status(self) -> None:
        while True:
            self.notifier.status(self.summary())
            await trio.sleep(STATUS_INTERVAL)

    def summary(self) -> str:
        """One line on the daemon's state, for systemctl status (never a secret)."""
        assert self.keeper is not None
        state = self.keeper.state()
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
        videomanagers = self.keeper.list()
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

    async def _login(self, username: str, password: str) -> None:
        assert self.keeper is not None
        log.info("login requested by a client for %r", username)
        self._configured_session = False
        await self.keeper.start_session(
            Credentials(username=username, password=SecretStr(password))
        )

    def _describe(self) -> dict[str, Any]:
        return {
            "login_method": self.settings.login_method,
            "redirect_port": self.settings.oidc_redirect_port,
            "version": __version__,
            "pid": os.getpid(),
            "api_url": self.settings.api_url,
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
        assert self.keeper is not None and self._connector is not None
        try:
            new = load_settings(self.flags)
        except ConfigError as exc:
            log.error("reload failed, keeping the running configuration: %s", exc)
            return
        old, self.settings = self.settings, new
        for name in ("socket", "ca_bundle"):
            if getattr(new, name) != getattr(old, name):
                log.warning("a change of %s takes effect only after a restart", name)
        logging.getLogger("vm_tokend").setLevel(new.log_level.upper())
        # A new API, or a new way of logging in (settings, or WebFinger's answer), needs a
        # new session; so do new or refused credentials.
        state = self.keeper.state()
        method_changed = (Connector.key(new) != Connector.key(old)
                          or await self._connector.changed(new, state.get("auth"),
                                                           state.get("issuer")))
        self.keeper.configure(
            default_videomanager=new.default_videomanager,
            videomanagers=new.videomanagers,
            idle_timeout=new.idle_timeout,
            max_backoff=new.max_backoff,
        )
        credentials = new.credentials()
        from_config = credentials is not None
        if credentials is None and not self._configured_session:
            credentials = self.keeper.credentials  # given by `vm-token login`: kept
        if (method_changed or self.keeper.rejected
                or await self._credentials_changed(credentials)):
            log.info("starting a new login session after the reload")
            self._configured_session = from_config
            await self.keeper.start_session(credentials)

    async def _credentials_changed(self, credentials: Credentials | None) -> bool:
        assert self.keeper is not None
        current = self.keeper.credentials
        if credentials is None or current is None:
            return credentials is not current
        if credentials != current:
            return True
        if credentials.password_command is not None and credentials.password is None \
                and credentials.password_file is None:
            return False  # not run just to compare: it may prompt
        try:
            password = await credentials.read_password()
        except PasswordUnavailable:
            return True  # let the new session say what is wrong
        return not self.keeper.logged_in_with(password)

