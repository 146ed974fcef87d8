"""The stand-in: a fake VideoManager Pro API and its identity provider, on loopback.

For `make demo`, the tests and the benchmarks — never shipped in the wheel. Standard
library only, so it runs anywhere the tests run.

    server.py   StandIn: the HTTP server, the legacy API, the VideoManagers, fault injection
    oidc.py     the Keycloak-like provider: WebFinger, discovery, JWKS, password/refresh grants
    login.py    the interactive grants: authorization code + PKCE, device code
    jose.py     the RS256 key and JSON Web Tokens
"""

from .server import StandIn

__all__ = ["StandIn"]
