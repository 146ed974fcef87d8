"""The profiles at run time: for each, its settings, its HTTP client, how it logs in, and
its account in the keeper — made at start, and changed, added or removed by a reload.

A reload touches a profile only as much as its settings changed: an unchanged one keeps
its session and tokens and makes no upstream call, however it logged in; changed soft
settings (default and kept-warm VideoManagers, idle timeout) apply in place; a new API or
way of logging in starts a new session, and so do new credentials — for a session made
from the configured ones. A session a person made (a browser or device login, or
`vm-token login` with a password) outlives a change of the configured credentials: they
are used when the profile next logs in from the configuration (on a reload once that
session was refused or logged out, or at a restart).
"""

from __future__ import annotations

import logging
import ssl
from collections import Counter
from dataclasses import dataclass, field

import httpx
from pydantic import SecretStr

from vm_token import __version__

from .config.passwords import PasswordSource, PasswordUnavailable
from .config.profile import Profile
from .keeper import Keeper
from .keeper.account import Account
from .server.routing import Routes
from .text import quote
from .upstream.base import CONNECT_TIMEOUT, TOTAL_TIMEOUT
from .upstream.connect import Connector

__all__ = ["Runtime", "Runtimes"]

log = logging.getLogger(__name__)


def _http(profile: Profile) -> httpx.AsyncClient:
    # Certificates are always verified; ca_bundle only changes which CAs we trust.
    context = (ssl.create_default_context(cafile=str(profile.ca_bundle))
               if profile.ca_bundle is not None else ssl.create_default_context())
    return httpx.AsyncClient(
        timeout=httpx.Timeout(TOTAL_TIMEOUT, connect=CONNECT_TIMEOUT),
        verify=context, follow_redirects=False,
        headers={"User-Agent": f"vm-tokend/{__version__}"},
    )


@dataclass
class Runtime:
    """One profile as it runs."""

    name: str
    profile: Profile
    http: httpx.AsyncClient
    account: Account
    connector: Connector
    # Whether the session's credentials came from the configuration (a reload may then
    # change them) or from a client's `login` (a reload leaves those alone). A browser or
    # device login leaves it as it was: Account.logged_in_interactively tells of those.
    configured: bool = False
    calls: Counter[str] = field(default_factory=Counter)


class Runtimes:
    """Every profile's runtime, and the keeper's accounts kept in step with them."""

    def __init__(self, keeper: Keeper, max_backoff: float, routes: Routes) -> None:
        self.keeper = keeper
        self.routes = routes  # each profile's hosts and user, for choosing it by host
        self.max_backoff = max_backoff
        self.by_name: dict[str, Runtime] = {}

    async def add(self, name: str, profile: Profile) -> Runtime:
        http = _http(profile)
        calls: Counter[str] = Counter()
        holder: list[Runtime] = []
        connector = Connector(http, lambda: holder[0].profile, calls)
        account = Account(connector, default_videomanager=profile.default_videomanager,
                          videomanagers=profile.videomanagers,
                          idle_timeout=profile.idle_timeout, max_backoff=self.max_backoff,
                          calls=calls)
        runtime = Runtime(name, profile, http, account, connector, calls=calls)
        holder.append(runtime)
        self._route(runtime)
        self.by_name[name] = runtime
        await self.keeper.add(name, account, prepare=lambda: self.start_configured(runtime))
        return runtime

    async def remove(self, name: str) -> None:
        runtime = self.by_name.pop(name)
        self.keeper.remove(name)
        self.routes.forget(name)
        await runtime.http.aclose()
        log.info("profile %s removed: its session ended, its tokens forgotten", quote(name))

    def _route(self, runtime: Runtime) -> None:
        self.routes.set(runtime.name, runtime.profile.git_hosts(), runtime.profile.username)

    async def close(self) -> None:
        for runtime in self.by_name.values():
            await runtime.http.aclose()

    async def start_configured(self, runtime: Runtime) -> None:
        source = runtime.profile.password_source()
        where = "" if runtime.name == "default" else f" (profile {quote(runtime.name)})"
        if source is None:
            how = " --browser" if runtime.profile.login_method == "browser" else ""
            log.info("no credentials configured%s; waiting for `vm-token login%s`", where, how)
        else:
            log.info("logging in as %s with %s%s", quote(source.username),
                     source.describe(), where)
        runtime.configured = source is not None
        await runtime.account.start(source)

    async def login(self, name: str, username: str, password: str) -> None:
        """A username and password a client gave (`vm-token login`): a new session with them."""
        runtime = self.by_name[name]
        log.info("login requested by a client for %s", quote(username))
        runtime.configured = False
        await runtime.account.start(
            PasswordSource(username=username, password=SecretStr(password)), asked=True)

    async def reload(self, name: str, new: Profile) -> None:
        """Apply `new` settings to a running profile, doing no more than they ask."""
        runtime = self.by_name[name]
        old, runtime.profile = runtime.profile, new
        if new.ca_bundle != old.ca_bundle:
            await runtime.http.aclose()  # a new trust store needs a new client
            runtime.http = _http(new)
            runtime.connector = Connector(runtime.http, lambda: runtime.profile, runtime.calls)
            runtime.account.set_connect(runtime.connector)
        self._route(runtime)
        account = runtime.account
        state = account.state()
        method_changed = (new.ca_bundle != old.ca_bundle
                          or Connector.key(new) != Connector.key(old)
                          or await runtime.connector.changed(new, state.get("auth"),
                                                            state.get("issuer")))
        account.configure(default_videomanager=new.default_videomanager,
                          videomanagers=new.videomanagers, idle_timeout=new.idle_timeout,
                          max_backoff=self.max_backoff)
        where = "" if name == "default" else f" (profile {quote(name)})"
        configured = new.password_source()
        given = None if runtime.configured else account.password_source  # by `vm-token login`
        if method_changed:
            # The session's tokens are for the old API or way of logging in. A password a
            # client gave goes along only where it went before.
            if given is not None and new.destination() != old.destination():
                given = None
            # (another API, or another way to it: the old one's Retry-After is not its)
            await self._restart(runtime, configured or given, configured is not None, where,
                                elsewhere=True)
        elif given is not None or account.logged_in_interactively:
            # A person logged in: only a refusal makes this session worth replacing, and
            # only with credentials to try (an interactive one waits for a person).
            if account.rejected and (configured or given) is not None:
                await self._restart(runtime, configured or given, configured is not None,
                                    where)
            elif new.username != old.username and new.username is not None \
                    and (account.username or "").casefold() != new.username.casefold():
                # The profile is someone else's now: not this person's session.
                await self._restart(runtime, configured, configured is not None, where)
            elif configured is not None and configured != old.password_source():
                log.info("reload%s: the configured credentials changed, but a person "
                         "logged in: session kept (the new credentials are for the next "
                         "login from the configuration)", where)
            else:
                log.debug("reload%s: nothing changed for the session; session kept", where)
        elif (account.rejected and configured is not None) \
                or await _changed(account, configured):
            await self._restart(runtime, configured, configured is not None, where)
        else:
            log.debug("reload%s: nothing changed for the session; session kept", where)

    async def _restart(self, runtime: Runtime, source: PasswordSource | None,
                       configured: bool, where: str, *, elsewhere: bool = False) -> None:
        log.info("starting a new login session after the reload%s", where)
        runtime.configured = configured
        await runtime.account.start(source, asked=elsewhere)


async def _changed(account: Account, source: PasswordSource | None) -> bool:
    """Whether `source` differs from the session's, its password file's or command's
    output included (compared by keyed digest, never kept)."""
    current = account.password_source
    if source is None or current is None:
        return source is not current
    if source != current:
        return True
    if source.password_command is not None and source.password is None \
            and source.password_file is None:
        return False  # not run just to compare: it may prompt
    try:
        password = await source.read_password()
    except PasswordUnavailable:
        return True  # let the new session say what is wrong
    return not account.logged_in_with(password)
