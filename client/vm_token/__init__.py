"""vm_token — get VideoManager Pro access tokens from the vm-tokend daemon.

    import vm_token
    token = vm_token.get_token("Marketing", min_ttl=60)
    headers = {"Authorization": token.authorization}

Depends on msgpack and the standard library only; never imports trio, httpx or pydantic
(VideoManagerAuth imports httpx when first used, AsyncClient trio only under trio).
Names are loaded on first use, so that `vm-token` — which imports this package on every
call — pays only for what it touches.
"""

from ._version import __version__

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .aio import AsyncClient
    from .auth import RequestsAuth, VideoManagerAuth
    from .client import Client, VideoManager, get_token
    from .errors import (
        BadRequest,
        CredentialsRejected,
        DaemonError,
        DaemonNotRunning,
        Error,
        Forbidden,
        ForbiddenOp,
        InternalError,
        LoginFailed,
        NotLoggedIn,
        ProtocolError,
        UnknownHost,
        UnknownProfile,
        UnknownVideoManager,
        UnsupportedVersion,
        UntrustedDaemon,
        UpstreamUnavailable,
    )
    from .token import Token

__all__ = [
    "AsyncClient",
    "BadRequest",
    "Client",
    "CredentialsRejected",
    "DaemonError",
    "DaemonNotRunning",
    "Error",
    "Forbidden",
    "ForbiddenOp",
    "InternalError",
    "LoginFailed",
    "NotLoggedIn",
    "ProtocolError",
    "RequestsAuth",
    "Token",
    "UnknownHost",
    "UnknownProfile",
    "UnknownVideoManager",
    "UnsupportedVersion",
    "UntrustedDaemon",
    "UpstreamUnavailable",
    "VideoManager",
    "VideoManagerAuth",
    "__version__",
    "get_token",
]

# Where each name lives; everything else in __all__ comes from errors.
_WHERE = {"Client": "client", "VideoManager": "client", "get_token": "client",
          "Token": "token", "AsyncClient": "aio", "VideoManagerAuth": "auth",
          "RequestsAuth": "auth"}


def __getattr__(name: str) -> object:
    module = _WHERE.get(name, "errors" if name in __all__ else None)
    if module is None:
        raise AttributeError(f"module 'vm_token' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
