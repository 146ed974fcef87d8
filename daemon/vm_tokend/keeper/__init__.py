"""The keeper: fresh access tokens per VideoManager, in memory, for every client.

    keeper.py         Keeper, the request API `server` uses
    account.py        Account: settings, credentials, finding how to log in, the session
    session.py        Session: one login's life cycle, lock, pauses, refresh token
    answers.py        Answers: what a session tells clients (tokens, state, the list)
    legacy_session.py LegacySession: a token per VideoManager (the API's own login)
    oidc_session.py   OidcSession: one token for every VideoManager (OpenID Connect)
    interactive.py    InteractiveLogins: the browser or device login in progress
    slot.py           Slot: one token's refresh/backoff/idle state machine; TokenInfo
    timing.py         refresh times and backoff
    videomanagers.py  the user's VideoManagers, the default and kept-warm ones
    password_reader.py PasswordReader: reads the password, knows whether it changed

A refusal is the very exception the client will raise: one class per wire error code.
"""

from vm_token.errors import (
    BadRequest,
    CredentialsRejected,
    Forbidden,
    NotLoggedIn,
    UnknownVideoManager,
    UpstreamUnavailable,
)
from vm_token.errors import DaemonError as Refused

from .keeper import Keeper
from .slot import FORBIDDEN_RECHECK, QUICK_INVALIDATION, RETRY_WAIT, TokenInfo
from .timing import BACKOFF_CAP, MIN_REFRESH_INTERVAL

__all__ = [
    "BACKOFF_CAP",
    "FORBIDDEN_RECHECK",
    "MIN_REFRESH_INTERVAL",
    "QUICK_INVALIDATION",
    "RETRY_WAIT",
    "BadRequest",
    "CredentialsRejected",
    "Forbidden",
    "Keeper",
    "NotLoggedIn",
    "Refused",
    "TokenInfo",
    "UnknownVideoManager",
    "UpstreamUnavailable",
]
