"""upstream: HTTP to the API and its identity provider — the daemon's only network side.

    base.py         what every way of logging in shares: the errors, Grant, sending, reading
                    answers defensively, scrubbing secrets out of messages
    legacy.py       VideoManagerApi: the API's own login, a token per VideoManager
    oidc.py         WebFinger, Keycloak's discovery document, the password and refresh grants
    interactive_grants.py  authorization code + PKCE, device code (a person logs in)
    connect.py      choosing the way to log in from a profile's settings

Everything here faces a hostile upstream: answers are read with limits, and no message
carries a secret we sent.
"""

from .base import (
    ClientRejected,
    CredentialsRejected,
    Forbidden,
    Grant,
    RefreshRejected,
    TransientError,
    UpstreamError,
    VideoManagerRef,
    jwt_claims,
)
from .legacy import LegacyBackend, VideoManagerApi

__all__ = [
    "ClientRejected",
    "CredentialsRejected",
    "Forbidden",
    "Grant",
    "LegacyBackend",
    "RefreshRejected",
    "TransientError",
    "UpstreamError",
    "VideoManagerApi",
    "VideoManagerRef",
    "jwt_claims",
]
