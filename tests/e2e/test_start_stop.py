"""`vm-tokend start` / `vm-tokend stop`: a private daemon for CI steps that run in separate
shells (issue 18)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e.test_run import ours, run_env

pytestmark = pytest.mark.timeout(60)


def shell(script: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True,
                          timeout=60, check=False)


def test_three_shells_start_use_and_stop_it(standin, private_dir):
    env = run_env(standin, private_dir)
    # step 1: start, and keep what it printed for the next steps (as $GITHUB_ENV does)
    started = shell('eval "$(vm-tokend start --sh --proxy)" && '
                    'echo "$VM_TOKEN_SOCKET $VM_TOKEN_PID $VM_TOKEN_PROXY_SOCKET"', env)
    assert started.returncode == 0, started
    socket, pid, proxy = started.stdout.split()
    private = str(Path(socket).parent)
    assert Path(private).parent == private_dir and ours(private)
    later = {name: value for name, value in env.items() if name != "VM_TOKEN_PASSWORD"}
    later.update(VM_TOKEN_SOCKET=socket, VM_TOKEN_PID=pid)
    # step 2: another shell, no password, gets a token and goes through the proxy
    token = shell("vm-token token", later)
    assert token.returncode == 0 and standin.token_valid(token.stdout.strip()), token
    listed = shell(f"curl -sS --unix-socket {proxy} http://localhost/v1/vms", later)
    assert "Marketing" in listed.stdout, listed
    # step 3: stop; nothing remains, and a second stop is no error
    stopped = shell("vm-tokend stop", later)
    assert (stopped.returncode, stopped.stderr) == (0, ""), stopped
    assert not Path(private).exists() and ours(private) == []
    assert shell("vm-tokend stop", later).returncode == 0


@pytest.mark.parametrize("form", ["env", "json", "csh"])
def test_the_other_forms_name_the_same_things(standin, private_dir, form):
    env = run_env(standin, private_dir)
    started = shell(f"vm-tokend start --{form} --lifetime 30", env)
    assert started.returncode == 0, started
    if form == "env":  # $GITHUB_ENV, docker --env-file: NAME=value lines
        names = dict(line.split("=", 1) for line in started.stdout.splitlines())
    elif form == "json":
        names = json.loads(started.stdout)
    else:
        names = {line.split()[1]: line.split()[2].rstrip(";").strip("'")
                 for line in started.stdout.splitlines()}
    assert set(names) == {"VM_TOKEN_SOCKET", "VM_TOKEN_PID"}
    later = {**env, **names}
    assert shell("vm-tokend stop", later).returncode == 0
    assert not Path(names["VM_TOKEN_SOCKET"]).parent.exists()


def test_lifetime_ends_it_by_itself(standin, private_dir):
    started = shell("vm-tokend start --env --lifetime 2", run_env(standin, private_dir))
    assert started.returncode == 0, started
    private = str(Path(started.stdout.splitlines()[0].split("=", 1)[1]).parent)
    assert ours(private)
    deadline = time.monotonic() + 15
    while Path(private).exists() or ours(private):
        assert time.monotonic() < deadline, ours(private)
        time.sleep(0.1)


def test_a_failed_login_is_one_line_exit_1_and_nothing_left(standin, private_dir):
    started = shell("vm-tokend start --sh",
                    run_env(standin, private_dir, password="not-the-password"))
    assert (started.returncode, started.stdout) == (1, ""), started
    [line] = started.stderr.splitlines()
    assert line.startswith("vm-tokend start: ") and "credentials_rejected" in line
    assert [p for p in private_dir.iterdir() if p.name.startswith("vm-token-run-")] == []


def test_stop_kills_nothing_but_its_own_supervisor(standin, private_dir):
    env = run_env(standin, private_dir)
    bystander = subprocess.Popen(["sleep", "30"])
    try:
        socket = private_dir / "vm-token-run-x" / "socket"
        socket.parent.mkdir()
        refused = shell("vm-tokend stop", {**env, "VM_TOKEN_PID": str(bystander.pid),
                                           "VM_TOKEN_SOCKET": str(socket)})
        assert refused.returncode == 1 and "is not the vm-tokend" in refused.stderr
        assert bystander.poll() is None  # still running
        assert shell("vm-tokend stop", env).returncode == 1  # no variables: says so
    finally:
        bystander.kill()
        bystander.wait()
