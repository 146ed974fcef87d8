"""The proxy's client of vm-tokend: connections of its own for each profile.

A `get` waits in the daemon while its profile's API is slow to log in or refresh;
requests for a profile whose API hangs must not take every connection and keep another
profile's requests waiting in line, nor be cut short as if the daemon were gone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

import vm_token

__all__ = ["DAEMON_CONNECTIONS", "DAEMON_TIMEOUT", "ProfileClients"]

# The daemon's answer to a `get` may wait on the profile's API: a login or a refresh in
# flight. The longest such wait, a guess from the daemon's own bounds: a first OpenID
# Connect login is up to four requests in a row (WebFinger, discovery, the grant, the
# VideoManager list), each cut at the daemon's upstream TOTAL_TIMEOUT (15 s,
# upstream/base.py), and a client may first wait for an attempt about to start
# (keeper/slot.py RETRY_WAIT, 3 s); a quarter more to spare. Within it the daemon's own
# answer (`upstream_unavailable`, "no answer from the API within 15 s") reaches the
# client; past it the daemon itself is in trouble. The client's default, 5 s, made a
# hung API look like a missing daemon, and delayed every other request behind it.
DAEMON_TIMEOUT: Final = 4 * 15.0 + 15.0
# Connections to the daemon, per profile (see ProfileClients): a `get` the daemon
# answers from what it holds takes ~0.2 ms, so this many serve thousands of requests a
# second; the daemon takes 512 at once and makes room by closing the longest idle one.
DAEMON_CONNECTIONS: Final = 32


class ProfileClients(vm_token.AsyncClient):
    """The daemon's client, with connections of their own for each profile's requests.

    A `get` waits in the daemon while its profile's API is slow to log in or refresh (up
    to DAEMON_TIMEOUT); requests for a profile whose API hangs must not take every
    connection and keep another profile's requests waiting in line. Requests that name no
    profile (the default one) use this client's own connections."""

    def __init__(self, socket_path: Path) -> None:
        super().__init__(socket_path, timeout=DAEMON_TIMEOUT,
                         max_connections=DAEMON_CONNECTIONS)
        self._named: dict[str, vm_token.AsyncClient] = {}  # the proxy serves known ones

    async def request(self, op: str, **fields: Any) -> dict[str, Any]:
        profile = fields.get("profile")
        if not isinstance(profile, str) or profile == self.profile:
            return await super().request(op, **fields)
        client = self._named.get(profile)
        if client is None:
            client = self._named[profile] = vm_token.AsyncClient(
                self.socket_path, timeout=self.timeout, max_connections=self.max_connections,
                profile=profile)
        return await client.request(op, **fields)

    async def aclose(self) -> None:
        for client in self._named.values():
            await client.aclose()
        await super().aclose()
