"""vm_token — get VideoManager Pro access tokens from the vm-tokend daemon.

    import vm_token
    token = vm_token.get_token("Marketing", min_ttl=60)
    headers = {"Authorization": token.authorization}

Depends on msgpack and the standard library only; never imports trio, httpx or pydantic.
"""

from ._version import __version__
from .client import Client, VideoManager, get_token
from .errors import (
    BadRequest,
    CredentialsRejected,
    DaemonError,
    DaemonNotRunning,
    Error,
    Forbidden,
    InternalError,
    NotLoggedIn,
    ProtocolError,
    UnknownVideoManager,
    UnsupportedVersion,
    UpstreamUnavailable,
)
from .token import Token

__all__ = [
    "BadRequest",
    "Client",
    "CredentialsRejected",
    "DaemonError",
    "DaemonNotRunning",
    "Error",
    "Forbidden",
    "InternalError",
    "NotLoggedIn",
    "ProtocolError",
    "Token",
    "UnknownVideoManager",
    "UnsupportedVersion",
    "UpstreamUnavailable",
    "VideoManager",
    "__version__",
    "get_token",
]
