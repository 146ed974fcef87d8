"""`vm-tokend install-units`: put the systemd user units in place for this installation."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from importlib import resources
from pathlib import Path

from .config.settings import config_home

__all__ = ["UNITS", "daemon_command", "install_units", "render", "user_unit_dir"]

UNITS = ("vm-tokend.socket", "vm-tokend.service", "vm-token-proxy.socket",
         "vm-token-proxy.service")
PROXY_ENABLE = ["systemctl", "--user", "enable", "--now", "vm-token-proxy.socket"]
ENABLE_COMMANDS = (
    ["systemctl", "--user", "daemon-reload"],
    ["systemctl", "--user", "enable", "--now", "vm-tokend.socket"],
)


def user_unit_dir(environ: Mapping[str, str]) -> Path:
    return config_home(environ) / "systemd" / "user"


def _systemd_quote(word: str) -> str:
    """One word of an ExecStart= line: specifiers and variables escaped, quoted if needed."""
    word = word.replace("%", "%%").replace("$", "$$")
    if any(c in word for c in ' \t"\'\\;'):
        word = '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return word


def daemon_command() -> str:
    """How systemd should start this installation's daemon."""
    script = Path(sys.executable).parent / "vm-tokend"
    if script.exists():
        return _systemd_quote(str(script.absolute()))
    return f"{_systemd_quote(str(Path(sys.executable).absolute()))} -m vm_tokend"


def profile_credentials(environ: Mapping[str, str]) -> str:
    """A drop-in for vm-tokend.service loading each profile's secrets, the default
    profile's way (see the unit file): `password.NAME` and `oidc_client_secret.NAME` from
    $XDG_CONFIG_HOME/vm-token, each with an empty fallback so that the unit starts when a
    profile keeps its secret elsewhere. Empty without profiles (or a readable config)."""
    from .config.settings import CREDENTIAL_FILES, ConfigError, load_config

    try:
        _, profiles = load_config(strict=False)
    except ConfigError:
        return ""
    names = sorted(set(profiles.valid) | set(profiles.errors) - {"default"})
    names = [name for name in names if name != "default"]
    if not names:
        return ""
    lines = ["# Written by `vm-tokend install-units`: each profile's secrets, if kept as files",
             "# only systemd reads. Run it again after adding or removing a profile.",
             "[Service]"]
    for name in names:
        for secret in CREDENTIAL_FILES:
            lines.append(f"LoadCredential={secret}.{name}:%E/vm-token/{secret}.{name}")
            lines.append(f"SetCredential={secret}.{name}:\\n")
    return "\n".join(lines) + "\n"


def render(name: str, exec_start: str) -> str:
    """A unit file as shipped, with ExecStart= pointing at `exec_start`."""
    text = (resources.files("vm_tokend") / "unit_files" / name).read_text()
    lines = [f"ExecStart={exec_start}" if line.startswith("ExecStart=") else line
             for line in text.splitlines()]
    return "\n".join(lines) + "\n"


def install_units(
    environ: Mapping[str, str],
    *,
    enable: bool,
    run: Callable[..., subprocess.CompletedProcess[str]] = subprocess.run,
) -> int:
    target = user_unit_dir(environ)
    target.mkdir(parents=True, exist_ok=True)
    command = daemon_command()
    for name in UNITS:
        path = target / name
        path.write_text(render(name, f"{command} proxy" if name.startswith("vm-token-proxy")
                               else command))
        path.chmod(0o644)
        print(f"wrote {path}")
    print(f"ExecStart={command}")
    drop_in = target / "vm-tokend.service.d" / "profiles.conf"
    credentials = profile_credentials(environ)
    if credentials:
        drop_in.parent.mkdir(exist_ok=True)
        drop_in.write_text(credentials)
        drop_in.chmod(0o644)
        print(f"wrote {drop_in} (credentials of the profiles)")
    elif drop_in.exists():
        drop_in.unlink()
    if not enable:
        print("\nnow run:")
        for args in ENABLE_COMMANDS:
            print("  " + " ".join(args))
        print("and, for the API proxy (`vm-tokend proxy`), if you want it:\n  "
              + " ".join(PROXY_ENABLE))
        return 0
    if shutil.which("systemctl") is None:
        print("vm-tokend: systemctl not found; enable the socket by hand", file=sys.stderr)
        return 1
    for args in ENABLE_COMMANDS:
        print("$ " + " ".join(args))
        result = run(args, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            message = (result.stderr or result.stdout).strip().splitlines()
            print(f"vm-tokend: `{' '.join(args)}` failed: "
                  f"{message[-1] if message else result.returncode}", file=sys.stderr)
            return 1
    print("vm-tokend.socket is listening; the daemon starts on the first request")
    print("for the API proxy, if you want it: " + " ".join(PROXY_ENABLE))
    return 0
