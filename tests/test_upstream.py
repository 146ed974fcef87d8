"""The API client against the stand-in over real HTTP, and against hostile answers."""

from __future__ import annotations

import base64
import json
import time

import httpx
import pytest

from vm_tokend import upstream
from vm_tokend.upstream import VideoManagerApi, parse_retry_after, token_lifetime


def jwt(claims: dict) -> str:
    def part(data: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()
    return f"{part({'alg': 'none'})}.{part(claims)}.sig"


@pytest.fixture
async def api(standin):
    async with httpx.AsyncClient() as http:
        yield VideoManagerApi(http, standin.url)


async def test_login_and_refresh(api, standin):
    grant = await api.login(standin.username, standin.password)
    assert grant.valid_for == "1001"
    assert [vm.name for vm in grant.videomanagers] == ["Marketing", "Sales", "Support"]
    assert grant.lifetime == standin.access_lifetime - upstream.CLOCK_SLACK
    assert standin.token_valid(grant.access_token, "1001")
    assert "accessToken" not in repr(grant) and grant.access_token not in repr(grant)
    sales = await api.refresh(grant.refresh_token, "1002")
    assert sales.valid_for == "1002" and standin.token_valid(sales.access_token, "1002")
    assert api.calls == {"login": 1, "refresh": 1}


async def test_rejections(api, standin):
    with pytest.raises(upstream.CredentialsRejected, match="HTTP 401: Invalid username"):
        await api.login(standin.username, "wrong")
    grant = await api.login(standin.username, standin.password)
    standin.forbidden.add("1003")
    with pytest.raises(upstream.Forbidden, match="1003.*HTTP 403"):
        await api.refresh(grant.refresh_token, "1003")
    standin.expire_refresh_tokens()
    with pytest.raises(upstream.RefreshRejected):
        await api.refresh(grant.refresh_token, "1002")


@pytest.mark.parametrize(("status", "body", "expect"), [
    (503, "json", "HTTP 503: Injected failure"),
    (502, "html", "HTTP 502 (text/html body)"),
    (200, "garbage", "not the expected JSON"),
    (200, "empty", "not the expected JSON"),
    (500, "garbage", "HTTP 500 (application/json body)"),
])
async def test_garbage_and_server_errors_are_transient(api, standin, status, body, expect):
    standin.fail(status, body=body)
    with pytest.raises(upstream.TransientError) as info:
        await api.login(standin.username, standin.password)
    assert expect in str(info.value)


async def test_retry_after_is_passed_on(api, standin):
    standin.fail(429, retry_after="17")
    with pytest.raises(upstream.TransientError) as info:
        await api.login(standin.username, standin.password)
    assert info.value.retry_after == 17


async def test_unreachable_api_is_transient():
    async with httpx.AsyncClient() as http:
        api = VideoManagerApi(http, "http://127.0.0.1:9/v1/vms")
        with pytest.raises(upstream.TransientError, match="cannot reach the API"):
            await api.login("u", "p")


async def test_total_timeout(standin, monkeypatch, autojump_clock):
    monkeypatch.setattr(upstream, "TOTAL_TIMEOUT", 0.2)
    standin.delay = 1.0

    async with httpx.AsyncClient() as http:
        api = VideoManagerApi(http, standin.url)
        with pytest.raises(upstream.TransientError, match="within 0.2 s"):
            await api.login(standin.username, standin.password)


async def test_secrets_echoed_by_the_server_are_scrubbed():
    def echo(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, json={"message": f"bad request: {request.content.decode()}"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(echo)) as http:
        api = VideoManagerApi(http, "http://127.0.0.1/v1/vms")
        with pytest.raises(upstream.TransientError) as info:
            await api.login("user", "pa55word-secret")
        assert "pa55word-secret" not in str(info.value) and "[redacted]" in str(info.value)
        with pytest.raises(upstream.TransientError) as info:
            await api.refresh("refresh-secret-xyz", "1")
        assert "refresh-secret-xyz" not in str(info.value)


def test_token_lifetime_rules():
    now = 1_800_000_000.0
    # exp - iat, whatever our wall clock says
    assert token_lifetime(jwt({"iat": 100, "exp": 400}), 300, now) == 300 - upstream.CLOCK_SLACK
    # no iat: exp - now
    assert token_lifetime(jwt({"exp": now + 60}), 300, now) == 60 - upstream.CLOCK_SLACK
    # not a JWT, or no exp: the default
    assert token_lifetime("opaque-token", 300, now) == 300
    assert token_lifetime(jwt({"sub": "x"}), 123, now) == 123
    # dead on arrival by its own claims: the default, not a refresh storm
    assert token_lifetime(jwt({"exp": now - 10}), 300, now) == 300


def test_retry_after_forms():
    now = time.time()
    assert parse_retry_after("120", now) == 120
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now + 30))
    assert parse_retry_after(date, now) == pytest.approx(30, abs=1.5)
    assert parse_retry_after("99999", now) == upstream.MAX_RETRY_AFTER
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after(None, now) is None
