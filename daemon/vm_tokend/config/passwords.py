"""Where a profile's password comes from: given, a file, or a command (run here: reading
files and running commands is configuration's business, not the keeper's)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import trio
from pydantic import SecretStr

from .environment import ENV_PREFIX, process_environment

__all__ = ["PASSWORD_COMMAND_TIMEOUT", "PasswordSource", "PasswordUnavailable",
           "command_environment"]

# `pass`, gpg and the like may wait for a pinentry; a minute is generous, and bounded.
PASSWORD_COMMAND_TIMEOUT = 60.0


class PasswordUnavailable(Exception):
    """The password file or command could not give a password."""


@dataclass(frozen=True)
class PasswordSource:
    """A username and where its password comes from, in order of precedence.

    Equality compares the sources, not the secret's content of a file or command; the
    daemon uses it to decide whether SIGHUP brought a new username or password source.
    """

    username: str
    password: SecretStr | None = None
    password_file: Path | None = None
    password_command: str | None = None

    def describe(self) -> str:
        if self.password is not None:
            return "a password"
        if self.password_file is not None:
            return f"the password file {self.password_file}"
        return "the password command"

    async def read_password(self) -> str:
        """The password: given, read from the file, or printed by the command (first line)."""
        if self.password is not None:
            return self.password.get_secret_value()
        if self.password_file is not None:
            try:
                text = await trio.Path(self.password_file).read_text()
            except (OSError, UnicodeDecodeError) as exc:
                raise PasswordUnavailable(
                    f"cannot read the password file {self.password_file}: "
                    f"{getattr(exc, 'strerror', None) or type(exc).__name__}"
                ) from None
            password = text.splitlines()[0] if text else ""
        elif self.password_command is not None:
            password = await _run_password_command(self.password_command)
        else:  # pragma: no cover - Profile.password_source() never builds this
            raise PasswordUnavailable("no password configured")
        if not password:
            raise PasswordUnavailable(f"{self.describe()} gave an empty password")
        return password


async def _run_password_command(command: str) -> str:
    try:
        with trio.fail_after(PASSWORD_COMMAND_TIMEOUT):
            # Through the shell, like git's `!helper` and ssh's ProxyCommand: users write
            # pipelines such as `pass show movingimage | head -1`.
            result = await trio.run_process(
                ["/bin/sh", "-c", command],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                env=command_environment(),
            )
    except trio.TooSlowError:
        raise PasswordUnavailable(
            f"the password command did not finish within {PASSWORD_COMMAND_TIMEOUT:g} s"
        ) from None
    except OSError as exc:
        raise PasswordUnavailable(f"cannot run the password command: {exc.strerror}") from None
    if result.returncode != 0:
        # Its stderr is not shown: a failing command may echo what it was given.
        raise PasswordUnavailable(f"the password command failed with exit code {result.returncode}")
    try:
        text = result.stdout.decode()
    except UnicodeDecodeError:
        raise PasswordUnavailable("the password command printed something not UTF-8") from None
    return text.splitlines()[0] if text else ""


def command_environment() -> dict[str, str]:
    """The environment a password command runs in: the daemon's, without any of our own
    settings — VM_TOKEN_* variables may hold passwords and client secrets (of any profile;
    the name in any case, as we read them) — and without CREDENTIALS_DIRECTORY, which
    holds every profile's password. A command's own profile never takes its password from
    there: a password there wins over the command, which then never runs."""
    return {name: value for name, value in process_environment().items()
            if not name.upper().startswith(ENV_PREFIX) and name != "CREDENTIALS_DIRECTORY"}
