"""Profiles from the client side: `vm-token`, Client, AsyncClient, get_token, the httpx and
requests auth and git, against one real vm-tokend holding two profiles for two stand-ins."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections import Counter
from urllib.parse import urlsplit

import httpx
import pytest
import requests
import trio

import vm_token
from tests.e2e.test_cli import assert_one_line_error
from tests.e2e.test_git_and_scripts import HELPER, attributes, describe, git_credential

pytestmark = pytest.mark.timeout(60)


def netloc(standin) -> str:
    return urlsplit(standin.url).netloc


def work_env(work, **extra: str) -> dict[str, str]:
    """The daemon's environment for a second profile `work`, logged in to `work`."""
    return {"VM_TOKEN_PROFILES__WORK__API_URL": work.url,
            "VM_TOKEN_PROFILES__WORK__USERNAME": work.username,
            "VM_TOKEN_PROFILES__WORK__PASSWORD": work.password, **extra}


@pytest.fixture
def two(make_standin, start_daemon):
    """(daemon, home, work): the default profile on `home`, the profile `work` on `work`."""
    home = make_standin()
    work = make_standin(username="worker", videomanagers=[("2001", "Studio"),
                                                          ("2002", "Archive")])
    daemon = start_daemon(home, env=work_env(work))
    return daemon, home, work


def test_token_and_header_by_flag_and_by_environment(two):
    daemon, home, work = two
    plain = daemon.cli("token")
    assert plain.returncode == 0 and home.token_valid(plain.stdout.strip(), "1001")
    for args in (["token", "--profile", "work"], ["token", "--profile=work"],
                 ["token", "--vm", "Archive", "--profile", "work", "--min-ttl", "10"]):
        result = daemon.cli(*args)
        assert result.returncode == 0 and result.stderr == "", (args, result.stderr)
        token = result.stdout.strip()
        assert work.token_valid(token) and not home.token_valid(token), args
    assert work.token_valid(daemon.cli("token", "--vm", "Archive", "--profile", "work")
                            .stdout.strip(), "2002")
    header = daemon.cli("header", "--profile", "work").stdout
    assert header.startswith("Authorization: Bearer ")
    assert work.token_valid(header.split()[-1], "2001")
    # The shell's default: VM_TOKEN_PROFILE, read by the fast path and by argparse's.
    env = {**daemon.env, "VM_TOKEN_PROFILE": "work"}
    shell = subprocess.run([HELPER, "token"], env=env, capture_output=True, text=True,
                           timeout=15, check=False)
    assert work.token_valid(shell.stdout.strip(), "2001")
    as_json = subprocess.run([HELPER, "json"], env=env, capture_output=True, text=True,
                             timeout=15, check=False)
    data = json.loads(as_json.stdout)
    assert data["videomanager_name"] == "Studio" and work.token_valid(data["token"], "2001")
    # --profile beats the environment; an empty one is the daemon's default.
    for profile in ("default", ""):
        chosen = subprocess.run([HELPER, "token", "--profile", profile], env=env,
                                capture_output=True, text=True, timeout=15, check=False)
        assert home.token_valid(chosen.stdout.strip(), "1001"), profile
    # exec: the token and the API address of the profile.
    child = ("import os; "
             "print(os.environ['VM_TOKEN_API_URL'], os.environ['VM_TOKEN_VIDEOMANAGER_ID'])")
    ran = daemon.cli("exec", "--profile", "work", "--", sys.executable, "-c", child)
    assert ran.stdout.split() == [work.url, "2001"], ran.stderr


def test_an_unknown_profile_is_a_one_line_error_everywhere(two):
    daemon, _, _ = two
    for args in (["token", "--profile", "nope"], ["header", "--profile=nope"],
                 ["json", "--profile", "nope"], ["list", "--profile", "nope"],
                 ["status", "--profile", "nope"], ["--profile", "nope", "list"]):
        result = daemon.cli(*args)
        assert_one_line_error(result, 1, "(unknown_profile)", "nope", "default, work")
    env = {**daemon.env, "VM_TOKEN_PROFILE": "nope"}
    for command in ("token", "list"):
        result = subprocess.run([HELPER, command], env=env, capture_output=True, text=True,
                                timeout=15, check=False)
        assert_one_line_error(result, 1, "(unknown_profile)")
    # `profiles` lists them whatever the environment names.
    listed = subprocess.run([HELPER, "profiles"], env=env, capture_output=True, text=True,
                            timeout=15, check=False)
    assert listed.returncode == 0 and len(listed.stdout.splitlines()) == 2


def test_client_async_client_and_get_token(two, monkeypatch):
    daemon, home, work = two
    monkeypatch.delenv("VM_TOKEN_PROFILE", raising=False)
    with vm_token.Client(daemon.socket, profile="work") as client:
        assert client.profile == "work"
        first = client.get_token()  # the pre-encoded request, with the profile in it
        assert work.token_valid(first.access_token, "2001") and first.videomanager_name == "Studio"
        assert client.get_token() == first
        assert work.token_valid(client.get_token("Archive", min_ttl=5).access_token, "2002")
        assert {vm.name for vm in client.list_videomanagers()} == {"Studio", "Archive"}
        assert {vm.profile for vm in client.list_videomanagers()} == {"work"}
        assert client.status()["username"] == "worker"
    with vm_token.Client(daemon.socket) as client:
        assert client.profile is None
        assert home.token_valid(client.get_token().access_token, "1001")
        # Without a profile, list covers every profile, each VideoManager naming its own.
        assert Counter(vm.profile for vm in client.list_videomanagers()) == {
            "default": 3, "work": 2}
    token = vm_token.get_token(socket=daemon.socket, profile="work")
    assert work.token_valid(token.access_token, "2001")
    # VM_TOKEN_PROFILE, read when a client is made; profile="" overrides it.
    monkeypatch.setenv("VM_TOKEN_PROFILE", "work")
    with vm_token.Client(daemon.socket) as client:
        assert work.token_valid(client.get_token().access_token, "2001")
    assert work.token_valid(vm_token.get_token(socket=daemon.socket).access_token, "2001")
    with vm_token.Client(daemon.socket, profile="") as client:
        assert home.token_valid(client.get_token().access_token, "1001")
    monkeypatch.setenv("VM_TOKEN_PROFILE", "")  # empty: as if unset
    assert home.token_valid(vm_token.get_token(socket=daemon.socket).access_token, "1001")

    async def under(run_sleep) -> list[str]:
        async with vm_token.AsyncClient(daemon.socket, profile="work") as client:
            tokens = [(await client.get_token()).access_token,
                      (await client.get_token("Archive")).access_token]
            assert (await client.status())["username"] == "worker"
        monkeypatch.setenv("VM_TOKEN_PROFILE", "work")
        async with vm_token.AsyncClient(daemon.socket) as client:
            tokens.append((await client.get_token()).access_token)
        monkeypatch.delenv("VM_TOKEN_PROFILE")
        async with vm_token.AsyncClient(daemon.socket) as client:
            tokens.append((await client.get_token()).access_token)
        await run_sleep(0)
        return tokens

    for tokens in (trio.run(under, trio.sleep), asyncio.run(under(asyncio.sleep))):
        assert work.token_valid(tokens[0], "2001") and work.token_valid(tokens[1], "2002")
        assert work.token_valid(tokens[2], "2001") and home.token_valid(tokens[3], "1001")


def test_unknown_profile_from_the_libraries(two):
    daemon, _, _ = two
    with pytest.raises(vm_token.UnknownProfile, match="nope"):
        vm_token.Client(daemon.socket, profile="nope").get_token()
    with vm_token.Client(daemon.socket, profile="nope") as client:
        with pytest.raises(vm_token.UnknownProfile):
            client.get_token("Sales", min_ttl=1)
        with pytest.raises(vm_token.UnknownProfile):
            client.list_videomanagers()
    with pytest.raises(vm_token.UnknownProfile):
        vm_token.get_token(socket=daemon.socket, profile="nope")

    async def ask() -> None:
        async with vm_token.AsyncClient(daemon.socket, profile="nope") as client:
            with pytest.raises(vm_token.UnknownProfile) as caught:
                await client.get_token()
            assert caught.value.code == "unknown_profile"

    trio.run(ask)
    asyncio.run(ask())


def test_profiles_command_and_grouped_status(two):
    daemon, home, work = two
    assert daemon.cli("token", "--profile", "work").returncode == 0
    profiles = daemon.cli("profiles")
    assert profiles.returncode == 0, profiles.stderr
    lines = profiles.stdout.splitlines()
    assert [line.split() for line in lines] == [
        ["*", "default", netloc(home), "demo", "legacy", "logged_in"],
        ["work", netloc(work), "worker", "legacy", "logged_in"],
    ]
    assert lines[1].startswith("  work ")  # aligned under the default's name
    data = json.loads(daemon.cli("profiles", "--json").stdout)
    assert [(p["name"], p["default"], p["api_host"], p["username"]) for p in data] == [
        ("default", True, netloc(home), "demo"), ("work", False, netloc(work), "worker")]
    status = daemon.cli("status")
    assert status.returncode == 0, status.stderr
    text = status.stdout
    assert text.startswith("vm-tokend ")
    default_block = text.split("\nprofile default (the default):\n")[1].split("\n\n")[0]
    work_block = text.split("\nprofile work:\n")[1]
    assert f"  API:      {home.url}\n  state:    logged_in as demo\n  auth:     legacy\n" \
        in default_block + "\n"
    assert "  * 1001  Marketing  (token valid" in default_block
    assert f"  API:      {work.url}\n  state:    logged_in as worker\n" in work_block
    assert "  * 2001  Studio  (token valid" in work_block
    assert "      2002  Archive  (no token held)" in work_block
    assert "Marketing" not in work_block
    for secret in (*home.issued, *work.issued, home.password, work.password):
        assert secret not in text
    # One profile asked for: today's layout, for that profile.
    narrowed = daemon.cli("status", "--profile", "work").stdout.splitlines()
    assert narrowed[1:4] == ["profile:  work", f"API:      {work.url}",
                             "state:    logged_in as worker"]
    # list: a profile column, only when there are several.
    listing = daemon.cli("list").stdout.splitlines()
    assert [line[:17] for line in listing] == [
        "* default  1001  ", "  default  1002  ", "  default  1003  ",
        "* work     2001  ", "  work     2002  "]
    assert daemon.cli("list", "--profile", "work").stdout.splitlines()[1] == \
        "  2002  Archive  (no token held)"
    rows = json.loads(daemon.cli("list", "--json").stdout)
    assert [(r["profile"], r["id"]) for r in rows][-1] == ("work", "2002")


def test_single_profile_output_has_no_profile_column(standin, start_daemon):
    daemon = start_daemon(standin)
    assert daemon.cli("list").stdout.splitlines()[0].startswith("* 1001  Marketing  (")
    assert "profile" not in daemon.cli("list", "--json").stdout
    status = daemon.cli("status").stdout
    assert "profile" not in status
    assert status.splitlines()[1] == f"API:      {standin.url}"
    assert daemon.cli("profiles").stdout.split() == [
        "*", "default", netloc(standin), "demo", "legacy", "logged_in"]


def test_git_fill_for_each_host_gives_that_hosts_token(two):
    daemon, home, work = two
    for standin, vm in ((home, "1001"), (work, "2001"), (home, "1001")):
        fill = git_credential(daemon, "fill", describe(standin))
        assert fill.returncode == 0, fill.stderr
        answer = attributes(fill.stdout)
        assert answer["username"] == standin.username
        assert standin.token_valid(answer["password"], vm)
    # useHttpPath: the VideoManager of the path, in the host's profile.
    fill = git_credential(daemon, "fill", describe(work, "v1/vms/2002/videos"),
                          "credential.useHttpPath=true")
    assert work.token_valid(attributes(fill.stdout)["password"], "2002")
    # A rejected token of the second host is replaced there.
    first = attributes(git_credential(daemon, "fill", describe(work)).stdout)
    reject = git_credential(daemon, "reject", describe(work).rstrip("\n")
                            + f"\nusername={first['username']}\npassword={first['password']}\n\n")
    assert reject.returncode == 0, reject.stderr
    second = attributes(git_credential(daemon, "fill", describe(work)).stdout)
    assert second["password"] != first["password"]
    assert work.token_valid(second["password"], "2001")
    # The shell's VM_TOKEN_PROFILE does not apply to git: its host says which profile.
    env = {**daemon.env, "VM_TOKEN_PROFILE": "work"}
    got = subprocess.run([HELPER, "get"], input=describe(home), env=env, capture_output=True,
                         text=True, timeout=15, check=False)
    assert home.token_valid(attributes(got.stdout)["password"], "1001")


def test_git_username_chooses_between_two_profiles_on_one_host(make_standin, start_daemon):
    home = make_standin()
    work = make_standin(username="worker", videomanagers=[("2001", "Studio")])
    # The work profile also answers for home's host: two profiles on one host.
    daemon = start_daemon(home, env=work_env(
        work, VM_TOKEN_PROFILES__WORK__CREDENTIAL_HOSTS=netloc(home)))
    plain = attributes(daemon.cli("get", input=describe(home)).stdout)
    assert home.token_valid(plain["password"], "1001")  # no username: the default profile
    for user in ("worker", "WORKER"):
        text = describe(home).rstrip("\n") + f"\nusername={user}\n\n"
        got = attributes(daemon.cli("get", input=text).stdout)
        assert work.token_valid(got["password"], "2001"), user
        assert got["username"] == "worker"
        fill = git_credential(daemon, "fill", text)
        assert work.token_valid(attributes(fill.stdout)["password"], "2001")
    # git's erase carries the user too: the token is replaced in work's profile.
    text = describe(home).rstrip("\n") + "\nusername=worker\n\n"
    before = attributes(daemon.cli("get", input=text).stdout)["password"]
    erase = daemon.cli("erase", input=text.rstrip("\n") + f"\npassword={before}\n\n")
    assert erase.returncode == 0 and erase.stderr == ""
    after = attributes(daemon.cli("get", input=text).stdout)["password"]
    assert after != before and work.token_valid(after, "2001")
    # --profile, before or after the operation, as for --socket.
    for args in (["--profile", "work", "get"], ["get", "--profile=work"],
                 [f"--socket={daemon.socket}", "--profile=work", "get"]):
        result = subprocess.run([HELPER, *args], input=describe(home), env=daemon.env,
                                capture_output=True, text=True, timeout=15, check=False)
        assert result.returncode == 0, (args, result.stderr)
        assert work.token_valid(attributes(result.stdout)["password"], "2001"), args
    unknown = subprocess.run([HELPER, "get", "--profile", "nope"], input=describe(home),
                             env=daemon.env, capture_output=True, text=True, timeout=15,
                             check=False)
    assert (unknown.returncode, unknown.stdout) == (0, "")  # git: nothing, one line why
    assert unknown.stderr.count("\n") == 1 and "(unknown_profile)" in unknown.stderr


def test_git_with_profile_still_answers_only_that_profiles_hosts(two):
    daemon, _, work = two
    result = subprocess.run([HELPER, "--profile", "work", "get"],
                            input="protocol=https\nhost=evil.example\n\n", env=daemon.env,
                            capture_output=True, text=True, timeout=15, check=False)
    for token in work.issued:
        assert token not in result.stdout
    assert result.stdout == ""


def _hook(seen: list[tuple[str, str]]):
    def on_request(request: httpx.Request) -> None:
        seen.append((request.url.netloc.decode(),
                     request.headers["Authorization"].removeprefix("Bearer ")))
    return on_request


def test_one_httpx_client_sends_each_host_its_own_token(two, monkeypatch):
    daemon, home, work = two
    # The shell's profile does not matter: the request's host says which.
    monkeypatch.setenv("VM_TOKEN_PROFILE", "work")
    seen: list[tuple[str, str]] = []
    auth = vm_token.VideoManagerAuth(socket=daemon.socket)
    with httpx.Client(auth=auth, event_hooks={"request": [_hook(seen)]}) as client:
        for standin, path, vm in ((home, "/1002/videos", "1002"), (work, "/2001/videos", "2001"),
                                  (home, "", "1001"), (work, "/2002/videos", "2002")):
            response = client.get(f"{standin.url}{path}")
            assert response.status_code == 200, (standin.url, path)
            host, token = seen[-1]
            assert host == netloc(standin)
            assert standin.token_valid(token, vm)
        # A revoked token of the second host: one 401, reported to work's profile, a new one.
        refreshes = work.counts["refresh"]
        work.revoke_access_tokens()
        assert client.get(f"{work.url}/2001/videos").status_code == 200
        assert work.counts["refresh"] == refreshes + 1
        assert client.get(f"{home.url}/1001/videos").status_code == 200

    # No more revocations here: fresh tokens reported again and again within seconds are
    # what makes the daemon back off (issue 9), and that is not what this test is about.
    async def both() -> list[int]:
        codes = []
        async with httpx.AsyncClient(auth=vm_token.VideoManagerAuth(socket=daemon.socket)) \
                as client:
            for url in (f"{home.url}/1003/videos", f"{work.url}/2002/videos"):
                codes.append((await client.get(url)).status_code)
        return codes

    assert trio.run(both) == [200, 200]
    assert asyncio.run(both()) == [200, 200]
    # profile= fixes one: its hosts get its token, another profile's host none (issue 15).
    fixed = vm_token.VideoManagerAuth(socket=daemon.socket, profile="work")
    with httpx.Client(auth=fixed) as client:
        assert client.get(f"{work.url}/2001/videos").status_code == 200
        response = client.get(home.url)
        assert response.status_code == 401 and "Authorization" not in response.request.headers


def test_requests_auth_picks_the_profile_by_host(two):
    daemon, home, work = two
    with requests.Session() as session:
        session.auth = vm_token.RequestsAuth(socket=daemon.socket)
        for standin, path, vm in ((home, "/1001/videos", "1001"),
                                  (work, "/2002/videos", "2002")):
            response = session.get(f"{standin.url}{path}", timeout=10)
            assert response.status_code == 200
            token = response.request.headers["Authorization"].removeprefix("Bearer ")
            assert standin.token_valid(token, vm)
        work.revoke_access_tokens()
        retried = session.get(f"{work.url}/2001/videos", timeout=10)
        assert retried.status_code == 200 and len(retried.history) == 1
        fixed = session.get(home.url, timeout=10,
                            auth=vm_token.RequestsAuth(socket=daemon.socket, profile="work"))
        assert fixed.status_code == 401 and "Authorization" not in fixed.request.headers


def test_the_fast_path_with_a_profile_imports_almost_nothing(two):
    daemon, home, work = two
    code = (
        "import io, sys\n"
        "from vm_token.cli import main\n"
        "assert main(['token', '--profile', 'work']) == 0\n"
        f"sys.stdin = io.TextIOWrapper(io.BytesIO({describe(work)!r}.encode()))\n"
        "assert main(['--profile=work', 'get']) == 0\n"
        "heavy = {'argparse', 'socket', 'struct', 'msgpack', 're', 'typing', 'json',\n"
        "         'datetime', 'threading', 'trio', 'httpx', 'pydantic', 'dataclasses'}\n"
        "print(sorted(heavy & set(sys.modules)), file=sys.stderr)\n"
    )
    env = {**daemon.env, "VM_TOKEN_PROFILE": "work"}
    result = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True,
                            text=True, env=env, timeout=15, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "[]"
    token, answer = result.stdout.split("\n", 1)
    assert work.token_valid(token, "2001")
    assert work.token_valid(attributes(answer)["password"], "2001")
