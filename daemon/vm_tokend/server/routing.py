"""Which profile a request is for — one place for the rule.

Its `profile` field; else, for git, the profile whose API host (or credential_hosts) is the
request's `host` (two: the one whose user is `user`, else the default one); else, for the
httpx/requests auth, the one whose host is `prefer_host`; else the default profile. A token
goes to a host only over https, or plain http to loopback: a git request for any other
host or scheme is refused here (`unknown_host`), before any token is looked at.

The table (each profile's hosts and user) is set by the runtimes from the profiles'
settings, and follows them on reload.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from vm_token import protocol
from vm_token.errors import UnknownHost

from ..config.settings import host_is_loopback, normalize_host
from ..keeper import BadRequest, Keeper
from ..text import quote

__all__ = ["Routes"]

MAX_PROFILE: Final = 64


@dataclass(frozen=True)
class _Route:
    hosts: frozenset[str]  # normalized host[:port]s: the API's and credential_hosts
    user: str | None  # the profile's username, if it names one


class Routes:
    """Each profile's hosts and user; `profile(request)` decides."""

    def __init__(self, keeper: Keeper) -> None:
        self.keeper = keeper
        self._routes: dict[str, _Route] = {}

    def set(self, profile: str, hosts: frozenset[str], user: str | None) -> None:
        self._routes[profile] = _Route(hosts, user)

    def forget(self, profile: str) -> None:
        self._routes.pop(profile, None)

    def user(self, profile: str | None) -> str | None:
        """The username `profile` is for (None: anybody); a login as another is refused."""
        name = profile if profile is not None else self.keeper.default_profile
        route = self._routes.get(name)
        return route.user if route else None

    def profile(self, request: dict[str, Any]) -> str | None:
        """The profile `request` is for (None: the default one); see the module docstring.
        BadRequest, UnknownProfile or UnknownHost when it names none that may answer."""
        value = request.get("profile")
        if value is not None:
            if not isinstance(value, str) or not value or len(value) > MAX_PROFILE:
                raise BadRequest("'profile' must be a profile name")
            self.keeper.account(value)  # UnknownProfile
            if request.get("host") is not None:
                # Named, and for git: the host must still be that profile's own.
                return self._git_profile(request, named=value)
            return value
        if request.get("host") is not None:
            return self._git_profile(request)
        prefer = request.get("prefer_host")
        if prefer is not None:
            if not isinstance(prefer, str) or len(prefer) > protocol.MAX_FRAME:
                raise BadRequest("'prefer_host' must be a host[:port]")
            return self.for_host(prefer, "https")
        return None

    def for_host(self, host: str, scheme: str, username: str | None = None) -> str | None:
        """The profile whose API host (or credential_hosts) is `host`: if two are, the
        one whose user is `username`, else the default one; None if no profile is."""
        name = normalize_host(host, scheme)
        matches = [profile for profile, route in self._live() if name in route.hosts]
        if len(matches) <= 1:
            return matches[0] if matches else None
        if username:
            for profile in matches:
                user = self._routes[profile].user
                if user is not None and user.casefold() == username.casefold():
                    return profile
        default = self.keeper.default_profile
        return default if default in matches else matches[0]

    def _live(self) -> list[tuple[str, _Route]]:
        """The routes of the profiles the keeper has, in its order."""
        return [(name, self._routes[name]) for name in self.keeper.accounts
                if name in self._routes]

    def _git_profile(self, request: dict[str, Any], named: str | None = None) -> str:
        """For git: the profile of `host` (it must be `named`'s, when given); refuse a host
        that is no such profile's API host, or plain http to a remote one."""
        host, scheme, user = request.get("host"), request.get("protocol", "https"), \
            request.get("user")
        if not isinstance(host, str) or not isinstance(scheme, str) \
                or not isinstance(user, str | None):
            raise BadRequest("'host', 'protocol' and 'user' must be strings")
        scheme = scheme.lower()
        name = normalize_host(host, scheme)
        if named is not None:
            route = self._routes.get(named)
            hosts = route.hosts if route else frozenset()
            profile = named if name in hosts else None
        else:
            hosts = frozenset(h for _, route in self._live() for h in route.hosts)
            profile = self.for_host(host, scheme, user)
        if profile is None:
            allowed = sorted(hosts)
            raise UnknownHost(f"{quote(name)} is not the API's host; vm-tokend gives tokens "
                              "only for " + (", ".join(allowed) or "no host"))
        if scheme != "https" and not (scheme == "http" and host_is_loopback(name)):
            raise UnknownHost(f"vm-tokend gives tokens for {quote(name)} only over https")
        return profile
