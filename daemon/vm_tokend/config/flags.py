"""Command-line flags that more than one command takes, for the same settings."""

from __future__ import annotations

import argparse

__all__ = ["add_allow_flags"]


def add_allow_flags(parser: argparse.ArgumentParser) -> None:
    """--allow-uid and --allow-gid (the settings allow_uids and allow_gids), the same for
    the daemon and the proxy."""
    parser.add_argument("--allow-uid", dest="allow_uids", action="append", metavar="UID",
                        help="a user (number or name) the token socket and the proxy "
                             "serve besides you (repeatable; the setting allow_uids)")
    parser.add_argument("--allow-gid", dest="allow_gids", action="append", metavar="GID",
                        help="a group whose members they serve too (repeatable; the "
                             "setting allow_gids; not on the proxy's --listen port)")
