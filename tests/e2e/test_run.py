"""`vm-tokend run -- CMD`: CMD under a daemon of its own, for CI jobs (issue 18)."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.conftest import BIN, clean_env

pytestmark = pytest.mark.timeout(60)


def run_env(standin, private_dir: Path, password: str | None = None) -> dict[str, str]:
    env = clean_env(private_dir)
    env.update(VM_TOKEN_API_URL=standin.url, VM_TOKEN_USERNAME=standin.username,
               VM_TOKEN_PASSWORD=password or standin.password,
               PATH=f"{BIN}:{env['PATH']}")
    return env


def live_processes(marker: str) -> list[tuple[int, str]]:
    """(pid, command line) of the live (not zombie) processes, other than this one, whose
    command line names `marker` (our private directory: our daemon, our proxy)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if marker in cmdline and state != "Z":
            found.append((int(entry.name), cmdline))
    return found


def ours(private: str) -> list[str]:
    """The command lines of live processes that name `private`."""
    return [cmdline for _, cmdline in live_processes(private)]


def vm_tokend_run(env: dict[str, str], *args: str, script: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "vm-tokend"), "run", *args, "--", "sh", "-c", script],
                          env=env, capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize(("script", "status"), [
    ("exit 0", 0), ("exit 7", 7), ("kill -TERM $$", 128 + signal.SIGTERM)])
def test_cmd_gets_a_token_at_once_and_its_exit_status_is_ours(standin, private_dir, script,
                                                              status):
    env = run_env(standin, private_dir)
    result = vm_tokend_run(env, script='echo "socket=$VM_TOKEN_SOCKET"; '
                                      'echo "password=${VM_TOKEN_PASSWORD:-}"; '
                                      'vm-token token || exit 99; ' + script)
    assert result.returncode == status, result
    lines = result.stdout.splitlines()
    socket = lines[0].removeprefix("socket=")
    assert lines[1] == "password="  # CMD asks the daemon; it gets no password
    assert standin.token_valid(lines[2])  # the first request, no wait: logged in before
    private = str(Path(socket).parent)
    assert Path(private).parent == private_dir  # in $XDG_RUNTIME_DIR
    assert not Path(private).exists()  # removed
    assert ours(private) == []  # no daemon left
    assert standin.password not in result.stderr + result.stdout


def test_the_proxy_too_and_nothing_secret_in_any_argv_or_file(standin, private_dir):
    env = run_env(standin, private_dir)
    script = ('cat /proc/[0-9]*/cmdline 2>/dev/null | tr "\\0" " " > "$OUT/argv"; '
              'ls -A "$(dirname "$VM_TOKEN_SOCKET")" > "$OUT/files"; '
              'cat "$(dirname "$VM_TOKEN_SOCKET")/vm-tokend.log" > "$OUT/log"; '
              'curl -sS --unix-socket "$VM_TOKEN_PROXY_SOCKET" http://localhost/v1/vms '
              '> "$OUT/listed"')
    out = private_dir / "out"
    out.mkdir()
    result = vm_tokend_run({**env, "OUT": str(out)}, "--proxy", script=script)
    assert result.returncode == 0, result
    assert "Marketing" in (out / "listed").read_text()
    assert standin.password not in (out / "argv").read_text()
    assert standin.password not in (out / "log").read_text()
    assert "vm-tokend" in (out / "argv").read_text()  # the daemon was listed
    # the sockets, and the children's log (for the one line a failure prints): no secret
    assert sorted((out / "files").read_text().split()) == ["proxy", "socket", "vm-tokend.log"]


def test_bad_credentials_exit_1_with_one_line_and_cmd_never_runs(standin, private_dir):
    env = run_env(standin, private_dir, password="not-the-password")
    marker = private_dir / "ran"
    result = vm_tokend_run(env, script=f"touch {marker}")
    assert result.returncode == 1, result
    assert not marker.exists()
    [line] = result.stderr.splitlines()
    assert line.startswith("vm-tokend run: ") and "credentials_rejected" in line, line
    assert "not-the-password" not in line
    assert [p for p in private_dir.iterdir() if p.name.startswith("vm-token-run-")] == []


def _started(env: dict[str, str], private_dir: Path) -> tuple[subprocess.Popen[str], str]:
    """`vm-tokend run` with a CMD that says its directory and pid, then sleeps."""
    run = subprocess.Popen(
        [str(BIN / "vm-tokend"), "run", "--", "sh", "-c",
         'echo "$(dirname "$VM_TOKEN_SOCKET") $$"; exec sleep 30'],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert run.stdout is not None
    return run, run.stdout.readline()


def test_sigterm_to_run_ends_cmd_then_everything(standin, private_dir):
    run, said = _started(run_env(standin, private_dir), private_dir)
    private, _ = said.split()
    assert ours(private)  # the daemon runs meanwhile
    run.send_signal(signal.SIGTERM)
    run.communicate(timeout=30)
    assert run.returncode == 128 + signal.SIGTERM  # CMD's status: it got the signal
    assert not Path(private).exists() and ours(private) == []


def test_a_killed_cmd_still_leaves_nothing(standin, private_dir):
    run, said = _started(run_env(standin, private_dir), private_dir)
    private, pid = said.split()
    os.kill(int(pid), signal.SIGKILL)
    run.communicate(timeout=30)
    assert run.returncode == 128 + signal.SIGKILL
    assert not Path(private).exists() and ours(private) == []


def test_usage_errors_are_one_line_and_exit_2(private_dir):
    env = clean_env(private_dir)
    for args in (["run", "true"], ["run", "--socket", "/tmp/x", "--", "true"],
                 ["run", "--no-such-flag", "--", "true"], ["run", "--"]):
        result = subprocess.run([str(BIN / "vm-tokend"), *args], env=env, capture_output=True,
                                text=True, timeout=20, check=False)
        assert result.returncode == 2, (args, result)
        assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr


def test_a_command_that_does_not_exist_is_127_and_leaves_nothing(standin, private_dir):
    result = subprocess.run([str(BIN / "vm-tokend"), "run", "--", "no-such-command-x"],
                            env=run_env(standin, private_dir), capture_output=True,
                            text=True, timeout=30, check=False)
    assert result.returncode == 127, result
    [line] = result.stderr.splitlines()
    assert "no-such-command-x" in line
    assert [p for p in private_dir.iterdir() if p.name.startswith("vm-token-run-")] == []
