"""vm_tokend — the vm-token daemon: keeps VideoManager Pro access tokens fresh in memory.

Modules: settings (configuration), upstream (the API), keeper (tokens and their timing),
server (the Unix socket), app (wiring and signals), standin (a stand-in API for tests).
"""

from vm_token import __version__

__all__ = ["__version__"]
