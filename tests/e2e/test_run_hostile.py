"""A hostile review of `vm-tokend run`, `start` and `stop` (issue 18): each test here
reproduces a defect and fails until it is fixed."""

from __future__ import annotations

import fcntl
import os
import pty
import signal
import subprocess
import sys
import termios
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import BIN
from tests.e2e.test_run import live_processes, run_env

pytestmark = pytest.mark.timeout(90)


def leftovers(marker: str) -> list[int]:
    """Live (not zombie) processes whose command line names `marker`, other than us."""
    return [pid for pid, _ in live_processes(marker)]


def kill_leftovers(marker: str) -> None:
    """Clean up after a test that showed a leak: only processes that name our directory."""
    for pid in leftovers(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def private_dirs(parent: Path) -> list[Path]:
    return [p for p in parent.iterdir() if p.name.startswith("vm-token-run-")]


def wait_for_daemon_socket(parent: Path, timeout: float = 30.0) -> Path:
    """The private directory once the daemon listens in it (its login then in flight)."""
    deadline = time.monotonic() + timeout
    while True:
        for directory in private_dirs(parent):
            if (directory / "socket").exists():
                return directory
        assert time.monotonic() < deadline, "the daemon did not start"
        time.sleep(0.02)


def settle(condition, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


# -- start: its caller gives up while it waits -------------------------------------------

@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_start_interrupted_while_it_waits_for_the_login_leaves_nothing(
        standin, private_dir, signum):
    """Ctrl-C, `timeout 10 vm-tokend start`, a cancelled CI job: `start` has no handler,
    dies (SIGINT: with a KeyboardInterrupt traceback), and the supervisor it started in a
    session of its own runs on with the daemon and the directory — and nobody has its pid."""
    standin.delay = 6  # a slow identity provider: the first login takes a while
    env = run_env(standin, private_dir)
    start = subprocess.Popen([str(BIN / "vm-tokend"), "start", "--sh"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    private = wait_for_daemon_socket(private_dir)
    try:
        start.send_signal(signum)
        out, err = start.communicate(timeout=30)
        left = settle(lambda: not private.exists() and not leftovers(str(private)), 10)
        assert left, f"left behind: {private.exists()=}, processes {leftovers(str(private))}"
        assert "Traceback" not in err, err
        assert start.returncode in (1, 128 + signum, -signum), (start.returncode, err)
    finally:
        kill_leftovers(str(private))


def test_start_that_cannot_print_its_variables_leaves_nothing(standin, private_dir):
    """`vm-tokend start > /dev/full` (a full disk under $GITHUB_ENV, a closed pipe): the
    variables never reach anyone, yet the supervisor and daemon run on (forever without
    --lifetime) and start's failure is a Python 'Exception ignored' message."""
    env = run_env(standin, private_dir)
    with open("/dev/full", "w") as full:
        result = subprocess.run([str(BIN / "vm-tokend"), "start", "--sh"], env=env,
                                stdout=full, stderr=subprocess.PIPE, text=True, timeout=60,
                                check=False)
    [private] = private_dirs(private_dir) or [None]  # type: ignore[list-item]
    try:
        assert private is None or settle(
            lambda: not private.exists() and not leftovers(str(private)), 10), \
            f"left behind: {private}, processes {leftovers(str(private))}"
        assert result.returncode == 1, result
        assert len(result.stderr.splitlines()) == 1, result.stderr
    finally:
        if private is not None:
            kill_leftovers(str(private))


def test_start_with_a_log_level_does_not_hang_a_capture_of_its_output(standin, private_dir):
    """`subprocess.run([... "vm-tokend", "start", "--json"], capture_output=True)` (or
    `$(vm-tokend start 2>&1)`) in a job that sets VM_TOKEN_LOG_LEVEL to debug: the
    supervisor and the daemon inherit start's stderr pipe and hold it for their whole life,
    so the capture never ends."""
    env = {**run_env(standin, private_dir), "VM_TOKEN_LOG_LEVEL": "info"}
    try:
        result = subprocess.run([str(BIN / "vm-tokend"), "start", "--json", "--lifetime", "60"],
                                env=env, capture_output=True, text=True, timeout=20,
                                check=False)
        assert result.returncode == 0, result
    except subprocess.TimeoutExpired:
        pytest.fail("the capture of `vm-tokend start`'s output did not end within 20 s")
    finally:
        for private in private_dirs(private_dir):
            kill_leftovers(str(private))


# -- start: the password outlives the step that had it ------------------------------------

def test_a_later_step_cannot_read_the_password_from_the_advertised_pid(standin, private_dir):
    """The README: "the password stays in the CI's secret store and the daemon's memory".
    The daemon makes itself non-dumpable; but the supervisor (whose pid `start` prints as
    VM_TOKEN_PID, alive for the whole job) and the proxy (which needs no password at all)
    get VM_TOKEN_PASSWORD in their environment and are dumpable: any later step of the
    job's user — which the recipes deliberately run without the secret — reads it with
    `cat /proc/$VM_TOKEN_PID/environ`. (Checked as root here, so only processes that are
    not the daemon are looked at: root reads even a non-dumpable process's environ.)"""
    env = run_env(standin, private_dir)
    started = subprocess.run(["sh", "-c", 'eval "$(vm-tokend start --sh --proxy --lifetime 60)"'
                              ' && echo "$VM_TOKEN_PID $VM_TOKEN_SOCKET"'],
                             env=env, capture_output=True, text=True, timeout=60, check=False)
    assert started.returncode == 0 and started.stdout.strip(), started
    pid, socket = started.stdout.split()
    private = str(Path(socket).parent)
    later = {k: v for k, v in env.items() if k != "VM_TOKEN_PASSWORD"}
    later.update(VM_TOKEN_PID=pid, VM_TOKEN_SOCKET=socket)
    try:
        proxies = [p for p in leftovers(private) if b"\0proxy\0" in _cmdline(p)]
        assert proxies, "no proxy"
        holders = {p: _cmdline(p).replace(b"\0", b" ").decode()[:60]
                   for p in [int(pid), *proxies]
                   if f"VM_TOKEN_PASSWORD={standin.password}".encode() in _environ(p)}
        assert holders == {}, f"the password is in /proc/PID/environ of {holders}"
    finally:
        subprocess.run([str(BIN / "vm-tokend"), "stop"], env=later, timeout=60, check=False)
        kill_leftovers(private)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _environ(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return b""


# -- run: signals ------------------------------------------------------------------------

def test_ctrl_c_reaches_cmd_once(standin, private_dir):
    """A terminal's Ctrl-C goes to the whole foreground process group: `vm-tokend run` and
    CMD (the daemon is in a session of its own for exactly that reason). run must not pass
    that SIGINT on to CMD as well: programs that take a second interrupt as "stop now,
    skip the clean-up" (terraform, docker compose, many deploy scripts) would. A real
    terminal here: a pty whose line discipline turns ^C into the kernel's SIGINT."""
    counter = textwrap.dedent("""
        import signal, sys, time
        got = []
        signal.signal(signal.SIGINT, lambda *a: got.append(1))
        print("ready", flush=True)
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            time.sleep(0.01)
        print("got", len(got), flush=True)
    """)
    env = run_env(standin, private_dir)
    counts = []
    for _ in range(2):
        master, slave = pty.openpty()

        def controlling_terminal() -> None:
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        run = subprocess.Popen([str(BIN / "vm-tokend"), "run", "--", sys.executable, "-c",
                                counter], env=env, stdin=slave, stdout=slave, stderr=slave,
                               start_new_session=True, preexec_fn=controlling_terminal)
        os.close(slave)
        seen = b""
        deadline = time.monotonic() + 30
        while b"ready" not in seen:
            assert time.monotonic() < deadline, seen
            seen += os.read(master, 4096)
        os.write(master, b"\x03")  # Ctrl-C
        while b"got" not in seen or not seen.rstrip().endswith((b"0", b"1", b"2", b"3")):
            assert time.monotonic() < deadline, seen
            try:
                seen += os.read(master, 4096)
            except OSError:
                break
        run.wait(timeout=30)
        os.close(master)
        counts.append(int(seen.split(b"got")[1].split()[0]))
    assert counts == [1, 1], f"SIGINTs CMD received per Ctrl-C: {counts}"


def test_two_signals_at_once_before_cmd_runs_still_clean_up(standin, private_dir):
    """SIGINT and SIGTERM together while the login is in flight (a runner that sends both,
    a closing terminal's SIGHUP with a Ctrl-C). The first handler raises Stop; the second
    signal, still pending, runs its handler — which raises Stop again — inside the
    `finally`, after SIGINT is ignored but before SIGTERM is: the clean-up is cut short,
    Stop escapes as a traceback, and the directory stays."""
    standin.delay = 6
    env = run_env(standin, private_dir)
    run = subprocess.Popen([str(BIN / "vm-tokend"), "run", "--", "true"], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    private = wait_for_daemon_socket(private_dir)
    try:
        os.kill(run.pid, signal.SIGTERM)
        os.kill(run.pid, signal.SIGINT)
        _, err = run.communicate(timeout=30)
        assert "Traceback" not in err, err
        assert run.returncode in (128 + signal.SIGINT, 128 + signal.SIGTERM), run.returncode
        assert settle(lambda: not private.exists() and not leftovers(str(private)), 10), \
            f"left behind: {private.exists()=}, processes {leftovers(str(private))}"
    finally:
        kill_leftovers(str(private))


def test_sigterm_while_the_password_command_runs_leaves_no_process(standin, private_dir):
    """The issue: "no process is left behind". A password command that hangs (a vault CLI
    waiting on the network) and a cancelled job: the daemon stops, trio kills the
    `/bin/sh -c` it ran, but that shell's children live on — though they are in the
    daemon's own process group, which `run` made and could end as a whole."""
    hang = private_dir / "hang-for-password.sh"
    hang.write_text("#!/bin/sh\nwhile :; do sleep 1; done\n")  # never answers
    hang.chmod(0o700)
    env = run_env(standin, private_dir)
    del env["VM_TOKEN_PASSWORD"]
    run = subprocess.Popen([str(BIN / "vm-tokend"), "run", "--password-command",
                            f"{hang}; true", "--", "true"], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    script = f"/bin/sh {hang}"  # the script's own process (its #! line), not run's argv
    try:
        assert settle(lambda: leftovers(script) != [], 30), "the password command never ran"
        run.send_signal(signal.SIGTERM)
        run.communicate(timeout=30)
        assert run.returncode == 128 + signal.SIGTERM
        assert settle(lambda: leftovers(script) == [], 5), \
            f"the password command outlives `vm-tokend run`: {leftovers(script)}"
    finally:
        kill_leftovers(script)


_SLOW_FORK = textwrap.dedent("""
    # `vm-tokend run` with the window between fork and exec of the daemon widened (as a
    # loaded CI machine does): the child's preexec_fn first says where it is, then waits.
    import sys, time
    from pathlib import Path
    from vm_tokend import private
    from vm_tokend.__main__ import main

    real = private.child_setup
    def slow_setup(*, die_with_parent):
        arm = real(die_with_parent=die_with_parent)
        def slow() -> None:
            if die_with_parent:
                Path(sys.argv[1]).touch()
                time.sleep(1.5)
            arm()
        return slow
    private.child_setup = slow_setup
    sys.exit(main(["run", "--", "true"]))
""")


def test_sigterm_while_the_daemon_is_being_forked_leaves_nothing(standin, private_dir):
    """A SIGTERM between fork and exec of the daemon: the handler raises Stop inside
    subprocess.Popen, so the child never reaches Children.processes and is never stopped.
    `run` removes the directory and exits; the child then sets PR_SET_PDEATHSIG — too late,
    its parent is gone and nothing checks getppid() — execs the daemon, which re-creates the
    private directory and serves on forever."""
    env = run_env(standin, private_dir)
    forking = private_dir / "forking"
    run = subprocess.Popen([sys.executable, "-c", _SLOW_FORK, str(forking)], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert settle(forking.exists, 30)
        [private] = private_dirs(private_dir)
        run.send_signal(signal.SIGTERM)
        run.communicate(timeout=30)
        assert run.returncode == 128 + signal.SIGTERM
        time.sleep(4)  # the child's preexec_fn ends, it execs the daemon, which starts
        assert not private.exists() and leftovers(str(private)) == [], \
            f"left behind: {private.exists()=}, processes {leftovers(str(private))}"
    finally:
        for private in private_dirs(private_dir):
            kill_leftovers(str(private))


# -- run / start: what the user is told --------------------------------------------------

@pytest.mark.parametrize("command", ["run", "start"])
def test_a_daemon_that_cannot_start_gives_its_reason(private_dir, command):
    """The issue: "a failure: one line, the daemon's reason". A daemon that exits at once
    (a bad setting, a socket path too long) has its stderr sent to /dev/null, so all the
    user learns is "vm-tokend exited with 2 before its first login"."""
    env = run_env_without_standin(private_dir)
    argv = [str(BIN / "vm-tokend"), command, "--api-url", "not-a-url", "--username", "u"]
    argv += ["--", "true"] if command == "run" else []
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 1, result
    [line] = result.stderr.splitlines()
    assert "api" in line.lower() or "url" in line.lower(), line
    assert private_dirs(private_dir) == []


def run_env_without_standin(private_dir: Path) -> dict[str, str]:
    from tests.conftest import clean_env

    env = clean_env(private_dir)
    env.update(VM_TOKEN_PASSWORD="pw", PATH=f"{BIN}:{env['PATH']}")
    return env


@pytest.mark.parametrize("argv", [
    ["run", "--prox", "--", "true"],
    ["start", "--js", "--lifetime", "30"],
    ["start", "--sh", "--life", "30"],
])
def test_an_abbreviated_option_of_run_or_start_is_not_handed_to_the_daemon(
        standin, private_dir, argv):
    """argparse accepts `--prox` for --proxy, `--life` for --lifetime, `--js` for --json
    (allow_abbrev), but `run`/`start` filter only the exact spellings out of the daemon's
    flags: the daemon gets `--prox` and exits 2 — "vm-tokend exited with 2 before its first
    login". Either the abbreviation works or it is a usage error; not a failed login."""
    env = run_env(standin, private_dir)
    result = subprocess.run([str(BIN / "vm-tokend"), *argv], env=env, capture_output=True,
                            text=True, timeout=60, check=False)
    try:
        assert result.returncode in (0, 2), result
        assert "before its first login" not in result.stderr, result.stderr
    finally:
        if argv[0] == "start" and result.returncode == 0:
            for private in private_dirs(private_dir):
                kill_leftovers(str(private))
