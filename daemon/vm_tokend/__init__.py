"""vm_tokend — the vm-token daemon: keeps VideoManager Pro access tokens fresh in memory.

    __main__.py   the `vm-tokend` command        app.py       wiring, signals, reload
    runtimes.py   one runtime per profile: its HTTP client, way of logging in, account
    config/       settings and their sources — the only code that reads the environment
    server/       the Unix socket, framing, limits, the ops, profile routing
    keeper/       accounts, sessions, slots: the token life cycle
    upstream/     HTTP to the API and its identity provider
    systemd.py    socket activation, sd_notify, watchdog      install.py   install-units
    text.py       bounded quoting of outside text             unit_files/  the systemd units

docs/ARCHITECTURE.md draws the arrows between them; `make lint` checks them.
"""

from vm_token import __version__

__all__ = ["__version__"]
