"""The API client against the stand-in over real HTTP, and against hostile answers."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator

import httpx
import pytest
import trio

from vm_tokend.upstream import base as upstream
from vm_tokend.upstream.base import parse_retry_after, token_lifetime
from vm_tokend.upstream.legacy import VideoManagerApi


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
    assert standin.counts["login"] == 1 and standin.counts["refresh"] == 1


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


def test_retry_after_accepts_only_ascii_digits_or_a_date():
    now = time.time()
    for odd in ("²", "١٢", "1e3", "-1", "5.5", "0x10", "Fri, 99 Foo 99999 99:99:99 GMT",
                "Mon, 01 Jan 99999 00:00:00 GMT"):
        assert parse_retry_after(odd, now) is None, odd
    assert parse_retry_after(" 5 ", now) == 5
    assert parse_retry_after("99999999999999999999999", now) == upstream.MAX_RETRY_AFTER
    assert parse_retry_after("Fri, 31 Dec 1999 23:59:59 GMT", now) == 0


@pytest.mark.parametrize("retry_after", ["²", "١٢", "1e3"])
async def test_odd_retry_after_is_a_plain_transient_error(api, standin, retry_after):
    standin.fail(503, retry_after=retry_after)
    with pytest.raises(upstream.TransientError) as info:
        await api.login(standin.username, standin.password)
    assert info.value.retry_after is None


@pytest.mark.parametrize("body", [
    b"[" * 100_000,
    b'{"message": ' + b"[" * 100_000,
    b'{"accessToken": "a.b.c", "videoManagerList": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
], ids=["array", "message", "list"])
@pytest.mark.parametrize("status", [200, 503])
async def test_json_nested_too_deep_is_not_the_expected_json(api, standin, body, status):
    standin.fail(status, body=body)
    with pytest.raises(upstream.TransientError) as info:
        await api.login(standin.username, standin.password)
    assert ("not the expected JSON" in str(info.value)) == (status == 200)


async def test_a_jwt_nested_too_deep_falls_back_to_the_default_lifetime():
    deep = base64.urlsafe_b64encode(b"[" * 100_000).rstrip(b"=").decode()
    assert token_lifetime(f"x.{deep}.y", 300, time.time()) == 300


async def test_refresh_answer_without_refresh_token_is_accepted(api, standin):
    grant = await api.login(standin.username, standin.password)
    standin.rewrite = lambda endpoint, answer: {k: v for k, v in answer.items()
                                                if k != "refreshToken"}
    sales = await api.refresh(grant.refresh_token, "1002")
    assert sales.refresh_token is None and standin.token_valid(sales.access_token, "1002")


@pytest.mark.parametrize(("change", "expect"), [
    (lambda a: {**a, "accessToken": 42}, "not the expected JSON"),
    (lambda a: {**a, "accessToken": "x" * (upstream.MAX_TOKEN + 1)}, "not the expected JSON"),
    (lambda a: {**a, "accessToken": "tök.en"}, "not the expected JSON"),
    (lambda a: {**a, "accessToken": "a.b\r\nX-Injected: 1"}, "not the expected JSON"),
    (lambda a: {**a, "accessToken": "a b"}, "not the expected JSON"),
    (lambda a: {k: v for k, v in a.items() if k != "videoManagerList"},
     "not the expected JSON"),
    (lambda a: {**a, "videoManagerList": []}, "listed no VideoManagers"),
    (lambda a: {**a, "videoManagerList": [{"id": {"x": 1}, "name": "n"}]},
     "not the expected JSON"),
    (lambda a: {**a, "videoManagerList": [{"id": "9" * 65, "name": "n"}]},
     "not the expected JSON"),
    (lambda a: {**a, "validForVideoManager": [1]}, "not the expected JSON"),
    (lambda a: [a], "not the expected JSON"),
], ids=["token-type", "token-size", "token-ascii", "token-crlf", "token-space", "no-list",
        "empty-list", "id-type", "id-size", "valid-for-type", "not-a-map"])
async def test_malformed_login_answers_are_transient(api, standin, change, expect):
    standin.rewrite = lambda endpoint, answer: change(answer)
    with pytest.raises(upstream.TransientError, match=expect):
        await api.login(standin.username, standin.password)


async def test_login_answer_is_taken_as_it_comes_within_bounds(api, standin):
    standin.rewrite = lambda endpoint, answer: {
        **answer, "validForVideoManager": "42",
        "videoManagerList": [{"id": 7, "name": "x\x00" * 300_000}, {"id": "8"}]}
    grant = await api.login(standin.username, standin.password)
    assert grant.valid_for == "42"  # not listed: the keeper picks another default
    assert [vm.id for vm in grant.videomanagers] == ["7", "8"]
    assert len(grant.videomanagers[0].name) == upstream.MAX_NAME
    assert grant.videomanagers[0].name.isprintable()
    assert grant.videomanagers[1].name == "8"


@pytest.mark.parametrize(("status", "body", "error"), [
    (403, "html", upstream.TransientError),
    (403, "garbage", upstream.TransientError),
    (403, "empty", upstream.TransientError),
    (403, "json", upstream.CredentialsRejected),
    (401, "html", upstream.CredentialsRejected),
])
async def test_a_proxy_403_page_is_not_a_rejection(api, standin, status, body, error):
    standin.fail(status, body=body)
    with pytest.raises(error):
        await api.login(standin.username, standin.password)


async def test_lifetime_counts_from_when_the_request_was_sent(api, standin):
    standin.delay = 0.3
    sent = trio.current_time()
    grant = await api.login(standin.username, standin.password)
    answered = trio.current_time()
    assert answered - sent >= 0.3
    assert sent <= grant.requested_at < sent + 0.1  # when we asked, not when it answered


@pytest.mark.parametrize("endpoint", ["login", "refresh"])
async def test_a_content_type_echoing_what_we_sent_is_not_repeated(api, standin, endpoint):
    grant = await api.login(standin.username, standin.password)
    secret = standin.password if endpoint == "login" else grant.refresh_token
    for value in (f"text/{secret}", f"text/{secret.upper()}", "text/" + "x" * 90_000):
        standin.fail(503, body=b"<html>", headers=[("Content-Type", value)])
        with pytest.raises(upstream.TransientError) as info:
            if endpoint == "login":
                await api.login(standin.username, standin.password)
            else:
                await api.refresh(grant.refresh_token, "1002")
        message = str(info.value)
        assert secret.lower() not in message.lower() and len(message) < 300
        assert "an unexpected content type" in message


async def test_an_answer_larger_than_the_limit_is_not_kept(monkeypatch):
    monkeypatch.setattr(upstream, "MAX_RESPONSE", 64 * 1024)
    big = b"[" + b"1," * 100_000 + b"1]"

    async def chunked() -> AsyncIterator[bytes]:
        for start in range(0, len(big), 4096):
            yield big[start:start + 4096]

    def answer(request: httpx.Request) -> httpx.Response:
        # With a length the body is not read; without one (chunked) it is not kept.
        if request.url.path.endswith("login"):
            return httpx.Response(200, content=big)
        return httpx.Response(200, content=chunked())

    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as http:
        api = VideoManagerApi(http, "http://127.0.0.1/v1/vms")
        with pytest.raises(upstream.TransientError, match="more than 65536 bytes"):
            await api.login("user", "pw")
        with pytest.raises(upstream.TransientError, match="more than 65536 bytes"):
            await api.refresh("rt", "1")


async def test_a_login_answer_without_a_refresh_token_is_not_the_expected_json(api, standin):
    standin.rewrite = lambda endpoint, answer: {k: v for k, v in answer.items()
                                                if k != "refreshToken"}
    with pytest.raises(upstream.TransientError, match="not the expected JSON"):
        await api.login(standin.username, standin.password)


@pytest.mark.parametrize("listed", [[], [{"id": {"x": 1}}], "garbage"])
async def test_a_refresh_answers_list_is_not_read(api, standin, listed):
    grant = await api.login(standin.username, standin.password)
    standin.rewrite = lambda endpoint, answer: {**answer, "videoManagerList": listed}
    sales = await api.refresh(grant.refresh_token, "1002")
    assert standin.token_valid(sales.access_token, "1002")


def test_secrets_are_scrubbed_as_forms_and_urls_encode_them_too():
    secret = "p@ss w0rd&x=1/é"
    from urllib.parse import quote, quote_plus
    text = f"got password={quote_plus(secret)} and {quote(secret, safe='')} and {secret}"
    scrubbed = upstream.scrub(text, (secret,))
    assert scrubbed.count("[redacted]") == 3
    assert "w0rd" not in scrubbed
