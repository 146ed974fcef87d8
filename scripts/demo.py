"""`make demo`: the stand-in API, the daemon, and the commands a user would type.

Everything runs in a private temporary directory and is shut down at the end; the demo
fails (non-zero exit) if any step does not do what it shows.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]


def step(title: str) -> None:
    print(f"\n\033[1m== {title}\033[0m", flush=True)


def run(*args: str, env: dict[str, str]) -> str:
    print("$ " + " ".join(args), flush=True)
    result = subprocess.run(
        [str(BIN / args[0]), *args[1:]], env=env, capture_output=True, text=True, check=False,
        timeout=30,
    )
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    if result.returncode != 0:
        raise SystemExit(f"demo: `{' '.join(args)}` failed with exit code {result.returncode}")
    return result.stdout


def wait_for_socket(path: Path, proc: subprocess.Popen[bytes]) -> None:
    import vm_token

    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"demo: vm-tokend exited with {proc.returncode}")
        try:
            vm_token.get_token(socket=path, timeout=1)
            return
        except vm_token.Error:
            time.sleep(0.05)
    raise SystemExit("demo: vm-tokend did not start in time")


def device_login(env: dict[str, str]) -> None:
    """`vm-token login --device`, with a scripted user entering the code on the stand-in's
    page (in real life: any browser, on any device)."""
    import re
    import urllib.parse

    print("$ vm-token login --device", flush=True)
    login = subprocess.Popen([str(BIN / "vm-token"), "login", "--device"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert login.stderr is not None
    said = ""
    while "Waiting" not in said:
        line = login.stderr.readline()
        if not line:
            raise SystemExit("demo: vm-token login --device printed no code")
        said += line
        sys.stdout.write(line)
    found = re.search(r"visit (\S+) and enter the code\n\s+(\S+)", said)
    if found is None:
        raise SystemExit("demo: no verification address and code in vm-token's output")
    uri, code = found.groups()
    print(f"(the user opens {uri}, types {code}, logs in as demo and approves)", flush=True)
    form = urllib.parse.urlencode({"user_code": code, "username": "demo",
                                   "password": "demo-password", "action": "login"}).encode()
    with urllib.request.urlopen(uri, data=form, timeout=10):  # noqa: S310 - loopback
        pass
    out, err = login.communicate(timeout=30)
    sys.stdout.write(out + err)
    if login.returncode != 0:
        raise SystemExit(f"demo: vm-token login --device failed ({login.returncode})")


def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="vm-token-demo-"))
    standin = daemon = None
    try:
        step("Start the stand-in VideoManager API on loopback")
        standin = subprocess.Popen(
            # the stand-in is not installed (not in the wheel): it runs from the checkout
            [sys.executable, "-m", "standin"], stdout=subprocess.PIPE, text=True, cwd=ROOT,
        )
        assert standin.stdout is not None
        api_url = standin.stdout.readline().strip()
        print(f"stand-in API at {api_url} (user 'demo', password 'demo-password')")

        step("Start vm-tokend: it asks the API's WebFinger how to log in, finds OpenID "
             "Connect, logs in once, then keeps the token fresh in memory")
        env = {k: v for k, v in os.environ.items() if not k.startswith("VM_TOKEN_")}
        socket_path = workdir / "vm-token" / "socket"
        env.update({
            "XDG_CONFIG_HOME": str(workdir / "config"),
            "VM_TOKEN_SOCKET": str(socket_path),
            "VM_TOKEN_API_URL": api_url,
            "VM_TOKEN_USERNAME": "demo",
            "VM_TOKEN_PASSWORD": "demo-password",  # the stand-in's; never do this for real
        })
        print("$ vm-tokend &")
        daemon = subprocess.Popen([str(BIN / "vm-tokend")], env=env)
        wait_for_socket(socket_path, daemon)

        step("A token for the default VideoManager, as a script would get it")
        token = run("vm-token", "token", env=env).strip()

        step("The VideoManagers: with OpenID Connect one token serves them all")
        sales = run("vm-token", "token", "--vm", "Sales", env=env).strip()
        if sales != token:
            raise SystemExit("demo: OpenID Connect should give one token for every "
                             "VideoManager")
        print("(the same token as for Marketing)")
        run("vm-token", "list", env=env)

        step("The one token works against the API, for two VideoManagers")
        for path in ("", "/1001/videos", "/1002/videos"):
            request = urllib.request.Request(  # noqa: S310 - the stand-in on loopback
                api_url + path, headers={"Authorization": f"Bearer {token}"}
            )
            print(f'$ curl -H "Authorization: Bearer $(vm-token token)" {api_url}{path}')
            with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
                body = json.load(response)
                print(f"HTTP {response.status}: {json.dumps(body)[:100]}")
                if response.status != 200:
                    raise SystemExit("demo: the API did not accept the token")

        step("The daemon's state (never a secret in it)")
        run("vm-token", "status", env=env)

        step("Log out, and log in again with a device code: no password kept anywhere")
        run("vm-token", "logout", env=env)
        device_login(env)
        run("vm-token", "status", env=env)

        step("Shut down")
        print("$ kill -TERM <vm-tokend>")
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(timeout=10)
        daemon = None
        if code != 0 or socket_path.exists():
            raise SystemExit(f"demo: vm-tokend did not shut down cleanly (exit {code})")
        print("vm-tokend exited 0 and removed its socket")
        return 0
    finally:
        for proc in (daemon, standin):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
