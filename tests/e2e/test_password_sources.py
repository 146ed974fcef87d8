"""Where a password may go (issue 15, finding 8), with the real vm-tokend: a profile that
points at another server never sends it the top level's password; a password command never
sees the daemon's secrets in its environment.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import trio

import vm_token

pytestmark = pytest.mark.timeout(60)


class Recorder:
    """Another VideoManager API, of which the test sees every request: it knows no WebFinger
    (so the daemon logs in with the API's own endpoints) and refuses every login."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                recorder.requests.append({"method": self.command, "path": self.path,
                                          "headers": dict(self.headers.items()),
                                          "body": self.rfile.read(length).decode("latin-1")})
                login = self.command == "POST" and self.path.endswith("/auth/login")
                status, message = (401, "Invalid username or password") if login \
                    else (404, "Not found")
                body = json.dumps({"message": message}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/vms"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def seen(self) -> str:
        return json.dumps(self.requests)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    server = Recorder()
    yield server
    server.stop()


async def in_thread(fn, *args):
    return await trio.to_thread.run_sync(fn, *args)


async def test_a_profile_on_another_api_never_gets_the_top_level_password(
        standin, recorder, start_daemon):
    daemon = start_daemon(standin, env={"VM_TOKEN_PROFILES__OTHER__API_URL": recorder.url})
    other = vm_token.Client(daemon.socket, profile="other", timeout=10)
    with trio.fail_after(30), other:
        # The default profile logs in as configured...
        token = await in_thread(vm_token.Client(daemon.socket).get_token)
        assert standin.token_valid(token.access_token, "1001")
        # ...the other has no credentials of its own: it waits for a login.
        with pytest.raises(vm_token.NotLoggedIn):
            await in_thread(other.get_token)
        assert standin.password not in recorder.seen()
        # PasswordSource given for it go there (the recorder hears what it is sent).
        with pytest.raises(vm_token.CredentialsRejected):
            await in_thread(other.login, "someone-else", "their-own-password")
    assert "their-own-password" in recorder.seen()
    assert standin.password not in recorder.seen()
    assert daemon.stop() == 0


SECRETS = {
    "VM_TOKEN_PASSWORD": "top-level-secret",
    "VM_TOKEN_PROFILES__THIRD__PASSWORD": "third-profile-secret",
    "VM_TOKEN_OIDC_CLIENT_SECRET": "client-secret-value",
    "vm_token_profiles__fourth__password": "lower-case-secret",
}


async def test_a_password_command_sees_none_of_the_daemons_secrets(standin, start_daemon,
                                                                   private_dir: Path):
    dumped = private_dir / "env.json"
    dump = private_dir / "dump.py"
    dump.write_text(f"import json, os\njson.dump(dict(os.environ), open({str(dumped)!r}, 'w'))\n")
    creds = private_dir / "creds"
    creds.mkdir()
    (creds / "password.third").write_text("credential-file-secret\n")
    command = f"{sys.executable} {dump} && echo {standin.password}"
    env = {
        **SECRETS,
        "CREDENTIALS_DIRECTORY": str(creds),
        "VM_TOKEN_PROFILES__CMD__USERNAME": standin.username,
        "VM_TOKEN_PROFILES__CMD__PASSWORD_COMMAND": command,
        "VM_TOKEN_PROFILES__THIRD__USERNAME": "third",
        "VM_TOKEN_PROFILES__FOURTH__USERNAME": "fourth",
        "KEEP_ME": "an ordinary variable",
    }
    # The default profile logs in as someone else with the password from the environment.
    daemon = start_daemon(standin, username="top-level-user", password=SECRETS[
        "VM_TOKEN_PASSWORD"], env=env)
    with trio.fail_after(30), vm_token.Client(daemon.socket, profile="cmd",
                                              timeout=10) as client:
        token = await in_thread(client.get_token)  # logged in with the command's password
    assert standin.token_valid(token.access_token, "1001")
    seen = json.loads(dumped.read_text())
    assert seen.get("KEEP_ME") == "an ordinary variable" and seen.get("PATH")
    assert not [name for name in seen if name.upper().startswith("VM_TOKEN_")], sorted(seen)
    assert "CREDENTIALS_DIRECTORY" not in seen
    for secret in [*SECRETS.values(), "credential-file-secret"]:
        assert secret not in dumped.read_text()
    assert daemon.stop() == 0


async def test_a_password_a_client_gave_does_not_follow_a_reload_to_another_api(
        standin, recorder, start_daemon, private_dir: Path):
    config = private_dir / "config" / "vm-token" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text(f'api_url = "{standin.url}"\n')
    daemon = start_daemon(None)  # no password configured: a client gives one
    with trio.fail_after(30), vm_token.Client(daemon.socket, timeout=10) as client:
        await in_thread(client.login, standin.username, standin.password)
        config.write_text(f'api_url = "{recorder.url}"\n')  # the API moved
        daemon.signal(signal.SIGHUP)
        while True:  # until the reload has dealt with the profile
            if "new login session" in daemon.log():
                break
            await trio.sleep(0.05)
        with pytest.raises(vm_token.NotLoggedIn):  # log in again, for the new API
            await in_thread(client.get_token)
    assert standin.password not in recorder.seen()
    assert daemon.stop() == 0
