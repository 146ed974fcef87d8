"""The process environment, handed out from here so that `config` stays the one place
that reads it (tests/test_architecture.py holds that): systemd's variables, the unit
installer's XDG paths and the settings' VM_TOKEN_* all come through this function."""

from __future__ import annotations

import os
from collections.abc import MutableMapping

__all__ = ["ENV_PREFIX", "process_environment"]

# Every variable of ours: settings read them, and a password command never sees them.
ENV_PREFIX = "VM_TOKEN_"


def process_environment() -> MutableMapping[str, str]:
    """os.environ itself (mutable: socket activation removes its LISTEN_* variables)."""
    return os.environ
