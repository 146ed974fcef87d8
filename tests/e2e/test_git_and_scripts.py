"""`vm-token` as git's credential helper and in scripts: real git, real curl."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import datetime
from urllib.parse import urlsplit

import pytest

from tests.conftest import BIN, clean_env

pytestmark = pytest.mark.timeout(60)

HELPER = str(BIN / "vm-token")


def git_credential(daemon, action: str, text: str, *config: str):
    env = {**daemon.env, "HOME": daemon.env["XDG_CONFIG_HOME"], "GIT_CONFIG_NOSYSTEM": "1",
           "GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "", "SSH_ASKPASS": ""}
    os.makedirs(env["HOME"], exist_ok=True)
    args = ["git", "-c", "credential.helper=", "-c", f"credential.helper={HELPER}"]
    for item in config:
        args += ["-c", item]
    return subprocess.run([*args, "credential", action], input=text, capture_output=True,
                          text=True, env=env, timeout=30, check=False)


def attributes(output: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in output.splitlines() if "=" in line)


def describe(standin, path: str | None = None) -> str:
    url = urlsplit(standin.url)
    text = f"protocol={url.scheme}\nhost={url.netloc}\n"
    if path:
        text += f"path={path}\n"
    return text + "\n"


def test_git_fill_reject_fill(standin, start_daemon):
    daemon = start_daemon(standin)
    fill = git_credential(daemon, "fill", describe(standin))
    assert fill.returncode == 0, fill.stderr
    first = attributes(fill.stdout)
    assert first["username"] == standin.username
    assert standin.token_valid(first["password"], "1001")
    # git 2.41+ passes the expiry on; older ones drop it, so ask the helper itself.
    direct = attributes(daemon.cli("get", input=describe(standin)).stdout)
    assert direct["password"] == first["password"]
    assert 250 < int(direct["password_expiry_utc"]) - time.time() <= 300
    # git saw a 401 with it: `reject` makes the helper invalidate it.
    reject = git_credential(daemon, "reject", describe(standin).rstrip("\n")
                            + f"\nusername={first['username']}\npassword={first['password']}\n\n")
    assert reject.returncode == 0, reject.stderr
    second = attributes(git_credential(daemon, "fill", describe(standin)).stdout)
    assert second["password"] != first["password"]
    assert standin.token_valid(second["password"], "1001")
    # approve (store) is accepted and changes nothing.
    approve = git_credential(daemon, "approve", describe(standin).rstrip("\n")
                             + f"\nusername=x\npassword={second['password']}\n\n")
    assert approve.returncode == 0 and approve.stdout == ""


def test_git_use_http_path_selects_the_videomanager(standin, start_daemon):
    daemon = start_daemon(standin)
    fill = git_credential(daemon, "fill", describe(standin, "v1/vms/1002/videos"),
                          "credential.useHttpPath=true")
    assert standin.token_valid(attributes(fill.stdout)["password"], "1002")


def test_a_foreign_host_gets_nothing(standin, start_daemon):
    daemon = start_daemon(standin)
    for host in ("github.com", "127.0.0.1:1", "api.video-cdn.net.evil.example"):
        direct = daemon.cli("get", input=f"protocol=https\nhost={host}\n\n")
        assert direct.returncode == 0 and direct.stdout == "" and direct.stderr == ""
        fill = git_credential(daemon, "fill", f"protocol=https\nhost={host}\n\n")
        assert fill.returncode != 0  # git found nothing and may not prompt
        for token in standin.issued:
            assert token not in fill.stdout
    # The API's host over plain http is refused unless it is loopback (it is here: allowed).
    url = urlsplit(standin.url)
    assert daemon.cli("get", input=f"protocol=http\nhost={url.netloc}\n\n").stdout


def test_credential_hosts_setting_adds_hosts(standin, start_daemon):
    daemon = start_daemon(standin, env={"VM_TOKEN_CREDENTIAL_HOSTS": "git.example.com:8443"})
    ok = daemon.cli("get", input="protocol=https\nhost=git.example.com:8443\n\n")
    assert standin.token_valid(attributes(ok.stdout)["password"])
    plain = daemon.cli("get", input="protocol=http\nhost=git.example.com:8443\n\n")
    assert plain.stdout == "" and plain.returncode == 0  # never over plain http


def test_authtype_capability_answers_bearer(standin, start_daemon):
    daemon = start_daemon(standin)
    text = describe(standin).rstrip("\n") + "\ncapability[]=authtype\nusername=Sales\n\n"
    result = daemon.cli("get", input=text)
    answer = attributes(result.stdout)
    assert result.stdout.splitlines()[0] == "capability[]=authtype"
    assert answer["authtype"] == "Bearer" and answer["ephemeral"] == "1"
    assert standin.token_valid(answer["credential"], "1002")  # username named Sales
    assert "password" not in answer and "username" not in answer
    erase = daemon.cli("erase", input=describe(standin).rstrip("\n")
                       + f"\ncapability[]=authtype\ncredential={answer['credential']}\n\n")
    assert erase.returncode == 0
    again = attributes(daemon.cli("get", input=text).stdout)
    assert again["credential"] != answer["credential"]


def test_username_that_names_no_videomanager_means_the_default(standin, start_daemon):
    daemon = start_daemon(standin)
    text = describe(standin).rstrip("\n") + "\nusername=someone@example.com\n\n"
    assert standin.token_valid(attributes(daemon.cli("get", input=text).stdout)["password"],
                               "1001")


def test_git_protocol_edge_cases(standin, start_daemon, private_dir):
    daemon = start_daemon(standin)
    unknown = daemon.cli("frobnicate", input="protocol=https\n\n")
    assert (unknown.returncode, unknown.stdout, unknown.stderr) == (0, "", "")
    for bad in ("host=x\nsecret-looking-line\n", "host=a\0b\n"):
        result = daemon.cli("get", input=bad)
        assert result.returncode == 2 and result.stdout == ""
        assert len(result.stderr.splitlines()) == 1 and "cannot read" in result.stderr
        assert "secret" not in result.stderr  # where, never what
    assert daemon.cli("store", input=describe(standin)).returncode == 0
    # Daemon not running: nothing for git, one line for the user, exit 0.
    env = {**clean_env(private_dir), "VM_TOKEN_SOCKET": str(private_dir / "nothing")}
    down = subprocess.run([HELPER, "get"], input=describe(standin), capture_output=True,
                          text=True, env=env, timeout=15, check=False)
    assert (down.returncode, down.stdout) == (0, "")
    assert len(down.stderr.splitlines()) == 1 and "not running" in down.stderr
    # Options before the operation, as `credential.helper = vm-token --socket=...` gives.
    result = subprocess.run([HELPER, f"--socket={daemon.socket}", "get"],
                            input=describe(standin), capture_output=True, text=True,
                            env=env, timeout=15, check=False)
    assert standin.token_valid(attributes(result.stdout)["password"])


def test_input_that_is_not_utf8_is_a_usage_error(standin, start_daemon):
    """Bytes git may pass on from a URL or a config are not text the daemon can be sent:
    one line, exit 2, no traceback, for every operation that reads git's input."""
    daemon = start_daemon(standin)
    url = urlsplit(standin.url)
    head = f"protocol={url.scheme}\nhost={url.netloc}\n".encode()
    cases = [
        b"protocol=https\nhost=\xff\xfeapi.example\n\n",
        head + b"username=\xc3\x28\n\n",                 # a truncated UTF-8 sequence
        head + b"path=v1/vms/\xed\xa0\x80/videos\n\n",  # a lone surrogate, encoded
        head + b"password=\x80secret\n\n",
    ]
    for operation in ("get", "erase", "store"):
        for data in cases:
            result = subprocess.run([HELPER, operation], input=data, capture_output=True,
                                    env=daemon.env, timeout=15, check=False)
            stderr = result.stderr.decode()
            assert result.returncode == 2, (operation, data, stderr)
            assert result.stdout == b""
            assert stderr.count("\n") == 1 and "Traceback" not in stderr, stderr
            assert stderr.startswith("vm-token: cannot read the credential description")
            assert "not valid UTF-8" in stderr and "secret" not in stderr
    # The daemon never saw any of it, and serves the next request as before.
    assert standin.token_valid(attributes(git_credential(
        daemon, "fill", describe(standin)).stdout)["password"])


def test_not_logged_in_falls_through(standin, start_daemon):
    daemon = start_daemon(standin, password="")
    result = daemon.cli("get", input=describe(standin))
    assert (result.returncode, result.stdout) == (0, "")
    assert "not_logged_in" in result.stderr and len(result.stderr.splitlines()) == 1


def test_exit_code_4_says_log_in_first(standin, start_daemon):
    daemon = start_daemon(standin, password="")  # nobody logged in
    for command in (["token"], ["header"], ["list"], ["exec", "--", "true"]):
        result = daemon.cli(*command)
        assert result.returncode == 4, (command, result)
        assert result.stdout == "" and "not_logged_in" in result.stderr, (command, result)
        assert "vm-token login" in result.stderr and len(result.stderr.splitlines()) == 1
    assert "4  log in first" in daemon.cli("token", "--help").stdout


def test_an_unknown_videomanager_is_exit_code_1(standin, start_daemon):
    unknown = start_daemon(standin).cli("token", "--vm", "Nowhere")
    assert (unknown.returncode, unknown.stdout) == (1, ""), unknown
    assert "unknown_videomanager" in unknown.stderr


def test_curl_with_header(standin, start_daemon):
    daemon = start_daemon(standin)
    header = subprocess.Popen([HELPER, "header", "--vm", "Sales"], stdout=subprocess.PIPE,
                              env=daemon.env)
    curl = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}",
                           "-H", "@-", f"{standin.url}/1002/videos"],
                          stdin=header.stdout, capture_output=True, text=True, timeout=30,
                          check=False)
    assert header.wait(timeout=10) == 0
    assert header.stdout is not None
    header.stdout.close()
    assert curl.stdout == "200", curl.stderr


def test_exec_puts_the_token_in_the_environment_only(standin, start_daemon):
    daemon = start_daemon(standin)
    child = (
        "import os, sys\n"
        "token = os.environ['VM_TOKEN_ACCESS_TOKEN']\n"
        "argv = open('/proc/self/cmdline', 'rb').read().decode()\n"
        "assert token not in argv\n"
        "print(os.environ['VM_TOKEN_VIDEOMANAGER_ID'], os.environ['VM_TOKEN_API_URL'])\n"
        "print(token)\n"
        "sys.exit(7)\n"
    )
    result = daemon.cli("exec", "--vm", "Support", "--", sys.executable, "-c", child)
    assert result.returncode == 7, result.stderr
    vm_line, token = result.stdout.splitlines()
    assert vm_line == f"1003 {standin.url}"
    assert standin.token_valid(token, "1003")
    missing = daemon.cli("exec", "--", "/nonexistent/command")
    assert missing.returncode == 127 and "command not found" in missing.stderr


def test_json_and_json_listings(standin, start_daemon):
    daemon = start_daemon(standin)
    data = json.loads(daemon.cli("json", "--vm", "sales").stdout)
    assert data["videomanager_id"] == "1002" and data["videomanager_name"] == "Sales"
    assert standin.token_valid(data["token"], "1002")
    assert datetime.fromisoformat(data["expires_at"]).tzinfo is not None
    listing = json.loads(daemon.cli("list", "--json").stdout)
    assert [vm["name"] for vm in listing] == ["Marketing", "Sales", "Support"]
    status = json.loads(daemon.cli("status", "--json").stdout)
    assert {"username", "version", "uptime", "requests", "upstream_calls",
            "videomanagers"} <= set(status)
    assert status["videomanagers"][1]["refreshed_at"].endswith("Z")
    assert data["token"] not in json.dumps(status)


def test_help_everywhere(standin, start_daemon):
    daemon = start_daemon(standin)
    for command in ("token", "header", "json", "exec", "list", "status", "profiles", "login",
                    "logout", "get"):
        result = daemon.cli(command, "--help")
        assert result.returncode == 0
        assert "example:" in result.stdout and "exit codes:" in result.stdout
    assert daemon.cli("--version").stdout.startswith("vm-token ")


def test_the_fast_path_imports_almost_nothing(standin, start_daemon):
    daemon = start_daemon(standin)
    code = (
        "import sys\n"
        "from vm_token.cli import main\n"
        "assert main(['token']) == 0\n"
        "heavy = {'argparse', 'socket', 'struct', 'msgpack', 're', 'typing', 'json',\n"
        "         'datetime', 'threading', 'trio', 'httpx', 'pydantic', 'dataclasses'}\n"
        "print(sorted(heavy & set(sys.modules)), file=sys.stderr)\n"
    )
    result = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True,
                            text=True, env=daemon.env, timeout=15, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "[]"


def test_get_answers_at_the_blank_line_without_waiting_for_eof(standin, start_daemon):
    daemon = start_daemon(standin)
    helper = subprocess.Popen([HELPER, "get"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              env=daemon.env, text=True)
    assert helper.stdin is not None and helper.stdout is not None
    helper.stdin.write(describe(standin))
    helper.stdin.flush()  # and keep stdin open
    answer = helper.stdout.read()
    assert helper.wait(timeout=10) == 0
    helper.stdin.close()
    helper.stdout.close()
    assert standin.token_valid(attributes(answer)["password"])


def test_the_helper_configured_by_name_as_the_readme_says(standin, start_daemon):
    """`credential.helper vm-token` makes git run `git credential-vm-token`: found on PATH
    next to vm-token, it answers. (Every other test names the helper by its full path,
    which hid that the README's own line gave git nothing; `make soak` found it.)"""
    daemon = start_daemon(standin)
    env = {**daemon.env, "HOME": daemon.env["XDG_CONFIG_HOME"], "GIT_CONFIG_NOSYSTEM": "1",
           "GIT_TERMINAL_PROMPT": "0", "PATH": f"{BIN}:/usr/bin:/bin"}
    os.makedirs(env["HOME"], exist_ok=True)
    host = urlsplit(standin.url).netloc
    subprocess.run(["git", "config", "--global", f"credential.http://{host}.helper",
                    "vm-token"], env=env, check=True)
    subprocess.run(["git", "config", "--global", f"credential.http://{host}.useHttpPath",
                    "true"], env=env, check=True)
    fill = subprocess.run(["git", "credential", "fill"], env=env, capture_output=True,
                          text=True, timeout=30, check=False,
                          input=f"protocol=http\nhost={host}\npath=v1/vms/1002/videos\n\n")
    assert fill.returncode == 0, fill.stderr
    assert standin.token_valid(attributes(fill.stdout)["password"], "1002")
