"""OpenID Connect as the vendor speaks it: WebFinger, discovery and the grants, against the
stand-in over real HTTP on loopback (and its fault injection for every failure class)."""

from __future__ import annotations

import base64
import email.utils
import json
import time
from collections import Counter
from urllib.parse import parse_qs

import httpx
import pytest
import trio

from standin.server import OidcClient, StandIn
from tests.quick_standin import (  # noqa: F401 (fixtures)
    TLS,
    make_standin_fixture,
    one_key_fixture,
    standin_fixture,
    stopping_standins_fixture,
)
from vm_tokend.upstream import base as upstream
from vm_tokend.upstream.oidc import IssuerLink, OidcApi, TokenRejected, WebFinger, api_root

ISSUER_REL = "http://openid.net/specs/connect/1.0/issuer"


class Recorder:
    """Every request the client sent (httpx's own event hook: the server is still real)."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []

    async def __call__(self, request: httpx.Request) -> None:
        self.requests.append(request)

    def to(self, url: str) -> list[httpx.Request]:
        return [r for r in self.requests if str(r.url).split("?")[0] == url]


@pytest.fixture
def sent() -> Recorder:
    return Recorder()


@pytest.fixture
async def http(sent):
    async with httpx.AsyncClient(verify=TLS, event_hooks={"request": [sent]}) as client:
        yield client


def make_api(http, standin: StandIn, **options) -> OidcApi:
    return OidcApi(http, standin.url, IssuerLink.from_href(standin.discovery_url), **options)


@pytest.fixture
def api(http, standin) -> OidcApi:
    return make_api(http, standin)


def jwt(claims: dict) -> str:
    def part(data: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()
    return f"{part({'alg': 'none'})}.{part(claims)}.sig"


def form(request: httpx.Request) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(request.content.decode()).items()}


def jrd(*links: dict) -> bytes:
    return json.dumps({"subject": "x", "links": list(links)}).encode()


# -- small pure pieces ----------------------------------------------------------------------

@pytest.mark.parametrize(("api_url", "root"), [
    ("https://api.video-cdn.net/v1/vms", "https://api.video-cdn.net/v1/"),
    ("https://api.video-cdn.net/v1/vms/", "https://api.video-cdn.net/v1/"),
    ("https://videos.example.com/v1/vms", "https://videos.example.com/v1/"),
    ("http://127.0.0.1:8080/v1/vms", "http://127.0.0.1:8080/v1/"),
])
def test_api_root_is_the_webfinger_resource(api_url, root):
    assert api_root(api_url) == root


DOC = "/.well-known/openid-configuration"


@pytest.mark.parametrize(("href", "document", "issuer"), [
    # the vendor's form: the discovery document itself
    ("https://login.movingimage.com/auth/realms/platform" + DOC,
     "https://login.movingimage.com/auth/realms/platform" + DOC,
     "https://login.movingimage.com/auth/realms/platform"),
    # OpenID Connect Discovery's form: the issuer
    ("https://login.movingimage.com/auth/realms/platform",
     "https://login.movingimage.com/auth/realms/platform" + DOC,
     "https://login.movingimage.com/auth/realms/platform"),
    ("https://login.movingimage.com/auth/realms/platform/",
     "https://login.movingimage.com/auth/realms/platform" + DOC,
     "https://login.movingimage.com/auth/realms/platform"),
    ("http://127.0.0.1:9/auth/realms/platform",
     "http://127.0.0.1:9/auth/realms/platform" + DOC, "http://127.0.0.1:9/auth/realms/platform"),
    ("http://localhost:9/realms/x" + DOC, "http://localhost:9/realms/x" + DOC,
     "http://localhost:9/realms/x"),
])
def test_issuer_link_takes_both_href_forms(href, document, issuer):
    link = IssuerLink.from_href(href)
    assert (link.document_url, link.issuer) == (document, issuer)


@pytest.mark.parametrize("href", [
    "http://login.example.com/auth/realms/platform",
    "http://login.example.com/auth/realms/platform" + DOC,
    "http://10.0.0.1/auth/realms/platform",
    "http://localhost.example.com/auth/realms/platform",
    "http://127.0.0.1.nip.io/auth/realms/platform",
    "ftp://login.example.com/auth/realms/platform",
    "/auth/realms/platform",
])
def test_issuer_link_refuses_plain_http_off_this_machine(href):
    with pytest.raises(upstream.ClientRejected, match="is not an https URL: refusing"):
        IssuerLink.from_href(href)


# -- WebFinger ------------------------------------------------------------------------------

@pytest.mark.parametrize("form_", ["document", "issuer"])
async def test_webfinger_finds_the_issuer_in_either_href_form(make_standin, http, sent, form_):
    standin = make_standin(webfinger_href=form_)
    calls: Counter[str] = Counter()
    link = await WebFinger(http, calls).lookup(standin.url)
    assert link == IssuerLink(standin.discovery_url, standin.issuer)
    assert standin.counts["webfinger"] == 1 and calls == {"webfinger": 1}
    (request,) = sent.requests
    assert request.url.path == "/.well-known/webfinger"
    assert request.url.params["resource"] == standin.api_root
    assert request.headers["accept"] == "application/jrd+json"


async def test_webfinger_404_means_legacy(make_standin, http):
    standin = make_standin(legacy_only=True)
    assert await WebFinger(http, Counter()).lookup(standin.url) is None


@pytest.mark.parametrize("links", [
    [],
    [{"rel": "http://webfinger.net/rel/avatar", "href": "https://example.com/a.png"}],
    [{"rel": ISSUER_REL}],  # no href
    [{"rel": ISSUER_REL, "href": 17}],
    ["not a link"],
])
async def test_webfinger_without_an_issuer_link_means_legacy(standin, http, links):
    standin.rewrite = lambda endpoint, answer: ({**answer, "links": links}
                                                if endpoint == "webfinger" else answer)
    assert await WebFinger(http, Counter()).lookup(standin.url) is None
    assert standin.counts["webfinger"] == 1


async def test_webfinger_picks_the_issuer_link_among_others(standin, http):
    standin.rewrite = lambda endpoint, answer: {**answer, "links": [
        {"rel": "http://webfinger.net/rel/avatar", "href": "https://example.com/a.png"},
        *answer["links"]]}
    link = await WebFinger(http, Counter()).lookup(standin.url)
    assert link is not None and link.issuer == standin.issuer


async def test_webfinger_naming_a_plain_http_issuer_elsewhere_is_refused(standin, http):
    standin.rewrite = lambda endpoint, answer: {**answer, "links": [
        {"rel": ISSUER_REL, "href": "http://login.example.com/auth/realms/platform"}]}
    with pytest.raises(upstream.ClientRejected,
                       match="'?http://login.example.com/auth/realms/platform.*not an https"):
        await WebFinger(http, Counter()).lookup(standin.url)


@pytest.mark.parametrize(("status", "body"), [(503, "json"), (500, "html"), (502, "empty"),
                                              (429, "json")])
async def test_webfinger_server_errors_are_transient_never_a_guess(standin, http, status, body):
    standin.fail(status, body=body, retry_after="7", endpoints=("webfinger",))
    webfinger = WebFinger(http, Counter())
    with pytest.raises(upstream.TransientError) as info:
        await webfinger.lookup(standin.url)
    assert f"HTTP {status}" in str(info.value)
    assert info.value.retry_after == 7
    # Not cached: the next lookup asks again, and gets the real answer.
    standin.heal()
    assert await webfinger.lookup(standin.url) == IssuerLink(standin.discovery_url,
                                                             standin.issuer)
    assert standin.counts["webfinger"] == 2


@pytest.mark.parametrize("body", [b"<html>hello</html>", b"[1, 2]", b'"text"', b"\xff\xfe",
                                  b"[" * 100_000])
async def test_webfinger_garbage_is_transient(standin, http, body):
    standin.fail(200, body=body, endpoints=("webfinger",))
    with pytest.raises(upstream.TransientError, match="not JRD.*auth = \"legacy\""):
        await WebFinger(http, Counter()).lookup(standin.url)


async def test_webfinger_unreachable_is_transient(http):
    with pytest.raises(upstream.TransientError, match="cannot reach the API's WebFinger"):
        await WebFinger(http, Counter()).lookup("http://127.0.0.1:9/v1/vms")


async def test_webfinger_answer_is_cached_for_its_max_age(standin, http, mock_clock):
    webfinger = WebFinger(http, Counter())
    first = await webfinger.lookup(standin.url)
    mock_clock.jump(299)  # the stand-in says max-age=300
    assert await webfinger.lookup(standin.url) == first
    assert standin.counts["webfinger"] == 1
    mock_clock.jump(2)
    assert await webfinger.lookup(standin.url) == first
    assert standin.counts["webfinger"] == 2
    mock_clock.jump(100)
    await webfinger.lookup(standin.url)
    assert standin.counts["webfinger"] == 2


async def test_webfinger_no_link_is_cached_too(standin, http, mock_clock):
    standin.fail(200, body=jrd(), headers=(("Cache-Control", "max-age=60"),),
                 endpoints=("webfinger",))
    webfinger = WebFinger(http, Counter())
    assert await webfinger.lookup(standin.url) is None
    mock_clock.jump(59)
    assert await webfinger.lookup(standin.url) is None
    assert standin.counts["webfinger"] == 1
    standin.heal()
    mock_clock.jump(2)
    assert await webfinger.lookup(standin.url) is not None
    assert standin.counts["webfinger"] == 2


async def test_webfinger_honours_expires_and_no_store(standin, http, mock_clock):
    link = jrd({"rel": ISSUER_REL, "href": standin.discovery_url})
    expires = email.utils.formatdate(time.time() + 120, usegmt=True)
    standin.fail(200, body=link, headers=(("Expires", expires),), endpoints=("webfinger",))
    webfinger = WebFinger(http, Counter())
    await webfinger.lookup(standin.url)
    mock_clock.jump(100)
    await webfinger.lookup(standin.url)
    assert standin.counts["webfinger"] == 1
    mock_clock.jump(25)
    await webfinger.lookup(standin.url)
    assert standin.counts["webfinger"] == 2
    # no-store (and an Expires in the past) mean: ask every time
    for header in (("Cache-Control", "no-store"), ("Cache-Control", "no-cache, max-age=600"),
                   ("Expires", email.utils.formatdate(time.time() - 60, usegmt=True))):
        standin.fail(200, body=link, headers=(header,), endpoints=("webfinger",))
        mock_clock.jump(10_000)
        before = standin.counts["webfinger"]
        await webfinger.lookup(standin.url)
        await webfinger.lookup(standin.url)
        assert standin.counts["webfinger"] == before + 2, header


@pytest.mark.parametrize("control", ["max-age=600, no-store", "public, max-age=600, no-cache",
                                     "no-store, max-age=600"])
async def test_no_store_wins_wherever_it_stands(standin, http, mock_clock, control):
    # RFC 9111 5.2.2.5: no-store forbids keeping the answer, whatever max-age says.
    link = jrd({"rel": ISSUER_REL, "href": standin.discovery_url})
    standin.fail(200, body=link, headers=(("Cache-Control", control),),
                 endpoints=("webfinger",))
    webfinger = WebFinger(http, Counter())
    await webfinger.lookup(standin.url)
    mock_clock.jump(1)
    await webfinger.lookup(standin.url)
    assert standin.counts["webfinger"] == 2


async def test_webfinger_cache_is_per_api(make_standin, http):
    one, two = make_standin(), make_standin()
    webfinger = WebFinger(http, Counter())
    first = await webfinger.lookup(one.url)
    second = await webfinger.lookup(two.url)
    assert first is not None and second is not None and first.issuer != second.issuer
    assert second.issuer == two.issuer


# -- discovery ------------------------------------------------------------------------------

async def test_discovery_is_read_once_and_names_the_endpoints(api, standin):
    provider = await api.provider()
    assert provider.issuer == standin.issuer
    assert provider.token_endpoint == standin.token_endpoint
    assert provider.authorization_endpoint == f"{standin.issuer}/protocol/openid-connect/auth"
    assert provider.code_challenge_methods == ("S256",)
    await api.login(standin.username, standin.password)
    await api.login(standin.username, standin.password)
    assert standin.counts["discovery"] == 1 and standin.counts["oidc_login"] == 2


async def test_discovery_is_read_again_after_its_max_age(api, standin, mock_clock):
    await api.login(standin.username, standin.password)
    mock_clock.jump(299)
    await api.login(standin.username, standin.password)
    assert standin.counts["discovery"] == 1
    mock_clock.jump(2)
    await api.login(standin.username, standin.password)
    assert standin.counts["discovery"] == 2


@pytest.mark.parametrize(("status", "body", "expect"), [
    (404, "json", "could not be read: HTTP 404"),
    (503, "json", "could not be read: HTTP 503: Injected failure"),
    (502, "html", "could not be read: HTTP 502 (text/html body)"),
    (200, "garbage", "is not the expected JSON (application/json)"),
    (200, "html", "is not the expected JSON (text/html)"),
    (200, b'{"issuer": "x"}', "is not the expected JSON"),  # no token_endpoint
    (200, b'{"token_endpoint": "http://127.0.0.1/t"}', "is not the expected JSON"),
    (200, b"[]", "is not the expected JSON"),
])
async def test_discovery_failures_are_transient(api, standin, status, body, expect):
    standin.fail(status, body=body, endpoints=("discovery",))
    with pytest.raises(upstream.TransientError) as info:
        await api.login(standin.username, standin.password)
    assert expect in str(info.value)
    assert standin.discovery_url in str(info.value)
    assert standin.counts["token"] == 0
    standin.heal()  # and nothing bad was cached
    await api.login(standin.username, standin.password)
    assert standin.counts["discovery"] == 2


async def test_discovery_naming_another_issuer_is_refused(api, standin):
    standin.issuer_override = "https://login.example.com/auth/realms/platform"
    with pytest.raises(upstream.ClientRejected) as info:
        await api.login(standin.username, standin.password)
    message = str(info.value)
    assert "https://login.example.com/auth/realms/platform" in message
    assert standin.issuer in message and "refusing" in message
    assert standin.counts["token"] == 0  # the password never went anywhere


async def test_discovery_issuer_trailing_slash_is_the_same_issuer(api, standin):
    standin.issuer_override = standin.issuer + "/"
    grant = await api.login(standin.username, standin.password)
    assert standin.token_valid(grant.access_token)


async def test_plain_http_token_endpoint_elsewhere_is_refused(api, standin):
    standin.rewrite = lambda endpoint, answer: (
        {**answer, "token_endpoint": "http://login.example.com/token"}
        if endpoint == "discovery" else answer)
    with pytest.raises(upstream.ClientRejected,
                       match="token endpoint .*http://login.example.com/token.*not an https"):
        await api.login(standin.username, standin.password)
    assert standin.counts["token"] == 0


async def test_unreachable_identity_provider_is_transient(http):
    api = OidcApi(http, "http://127.0.0.1:9/v1/vms",
                  IssuerLink.from_href("http://127.0.0.1:9/auth/realms/platform"))
    with pytest.raises(upstream.TransientError, match="cannot reach the identity provider"):
        await api.login("demo", "pw")


# -- the password and refresh grants ----------------------------------------------------------

async def test_password_grant_as_the_vendor_sends_it(make_standin, http, sent):
    standin = make_standin(access_lifetime=300, refresh_lifetime=3600)
    api = make_api(http, standin)
    grant = await api.login(standin.username, standin.password)
    assert standin.token_valid(grant.access_token, "1001")
    assert standin.token_valid(grant.access_token, "1003")  # one token for every VideoManager
    assert grant.valid_for is None and grant.videomanagers == ()
    assert grant.lifetime == 300 - upstream.CLOCK_SLACK
    assert grant.refresh_lifetime == 3600 - upstream.CLOCK_SLACK
    assert grant.refresh_token is not None
    assert grant.access_token not in repr(grant) and grant.refresh_token not in repr(grant)
    (request,) = sent.to(standin.token_endpoint)
    assert request.method == "POST"
    assert request.headers["content-type"] == "application/x-www-form-urlencoded"
    assert "authorization" not in request.headers
    assert form(request) == {"grant_type": "password", "client_id": "anonymous",
                             "username": "demo", "password": "demo-password",
                             "scope": "openid"}
    assert standin.counts["oidc_login_ok"] == 1


async def test_refresh_grant_sends_the_refresh_token(api, standin, sent):
    first = await api.login(standin.username, standin.password)
    assert first.refresh_token is not None
    second = await api.refresh(first.refresh_token)
    assert standin.token_valid(second.access_token, "1002")
    assert second.access_token != first.access_token
    request = sent.to(standin.token_endpoint)[-1]
    assert form(request) == {"grant_type": "refresh_token", "client_id": "anonymous",
                             "refresh_token": first.refresh_token}
    assert standin.counts["oidc_refresh_ok"] == 1


async def test_rotation_gives_a_new_refresh_token_and_reuse_is_refused(make_standin, http):
    standin = make_standin(rotate_refresh_tokens=True)
    api = make_api(http, standin)
    first = await api.login(standin.username, standin.password)
    assert first.refresh_token is not None
    second = await api.refresh(first.refresh_token)
    assert second.refresh_token not in (None, first.refresh_token)
    with pytest.raises(upstream.RefreshRejected,
                       match="refused the refresh token: invalid_grant "
                             r"\(Maximum allowed refresh token reuse exceeded\)"):
        await api.refresh(first.refresh_token)


async def test_invalid_grant_on_password_means_credentials_rejected(api, standin):
    with pytest.raises(upstream.CredentialsRejected) as info:
        await api.login(standin.username, "wrong-horse-battery")
    message = str(info.value)
    assert "rejected the credentials for 'demo'" in message
    assert "invalid_grant (Invalid user credentials)" in message
    assert "wrong-horse-battery" not in message


@pytest.mark.parametrize(("break_it", "description"), [
    (lambda standin: standin.expire_refresh_tokens(), "Token is not active"),
    (lambda standin: standin.end_sessions(), "Session not active"),
])
async def test_invalid_grant_on_refresh_means_refresh_rejected(api, standin, break_it,
                                                                description):
    grant = await api.login(standin.username, standin.password)
    assert grant.refresh_token is not None
    break_it(standin)
    with pytest.raises(upstream.RefreshRejected) as info:
        await api.refresh(grant.refresh_token)
    assert str(info.value) == (f"the identity provider refused the refresh token: "
                               f"invalid_grant ({description})")
    assert grant.refresh_token not in str(info.value)


async def test_invalid_grant_echoing_the_password_is_scrubbed(api, standin):
    standin.fail(401, body=json.dumps({"error": "invalid_grant", "error_description":
                                       f"bad password {standin.password}"}).encode(),
                 endpoints=("token",))
    with pytest.raises(upstream.CredentialsRejected) as info:
        await api.login(standin.username, standin.password)
    assert standin.password not in str(info.value)
    assert "[redacted]" in str(info.value)


async def test_error_messages_are_bounded(api, standin):
    standin.fail(400, body=json.dumps({"error": "e" * 5000, "error_description": "d" * 50_000,
                                       }).encode(), endpoints=("token",))
    with pytest.raises(upstream.TransientError) as info:
        await api.login(standin.username, standin.password)
    assert str(info.value).startswith("the identity provider answered HTTP 400: eeee")
    assert len(str(info.value)) < 400
    standin.fail(401, body=json.dumps({"error": "invalid_grant",
                                       "error_description": "bad\n\x1b[31m" + "d" * 50_000,
                                       }).encode(), endpoints=("token",))
    with pytest.raises(upstream.CredentialsRejected) as rejected:
        await api.login(standin.username, standin.password)
    assert len(str(rejected.value)) < 400
    assert "\n" not in str(rejected.value) and "\x1b" not in str(rejected.value)


async def test_unknown_client_is_a_configuration_error(make_standin, http):
    standin = make_standin()
    api = make_api(http, standin, client_id="nobody")
    with pytest.raises(upstream.ClientRejected) as info:
        await api.login(standin.username, standin.password)
    assert str(info.value) == ("the identity provider refused the client 'nobody' "
                               "(oidc_client_id): invalid_client (Invalid client or Invalid "
                               "client credentials)")


async def test_client_without_the_password_grant_is_a_configuration_error(make_standin, http):
    standin = make_standin(clients=(OidcClient("web", grants=frozenset({"authorization_code"})),))
    api = make_api(http, standin, client_id="web")
    with pytest.raises(upstream.ClientRejected,
                       match="'web' \\(oidc_client_id\\): unauthorized_client"):
        await api.login(standin.username, standin.password)


async def test_unsupported_grant_type_is_a_configuration_error(api, standin):
    standin.fail(400, body=b'{"error": "unsupported_grant_type"}', endpoints=("token",))
    with pytest.raises(upstream.ClientRejected,
                       match="'anonymous' \\(oidc_client_id\\): unsupported_grant_type$"):
        await api.login(standin.username, standin.password)


async def test_invalid_client_on_refresh_is_a_configuration_error_too(api, standin):
    grant = await api.login(standin.username, standin.password)
    assert grant.refresh_token is not None
    standin.fail(401, body=b'{"error": "invalid_client"}', endpoints=("oidc_refresh",))
    with pytest.raises(upstream.ClientRejected, match="oidc_client_id"):
        await api.refresh(grant.refresh_token)


async def test_invalid_scope_names_oidc_scope(make_standin, http):
    standin = make_standin()
    api = make_api(http, standin, scope="openid videos:write")
    with pytest.raises(upstream.ClientRejected) as info:
        await api.login(standin.username, standin.password)
    assert "refused the scope 'openid videos:write' (oidc_scope): invalid_scope" in str(info.value)


async def test_other_scopes_are_sent_as_configured(make_standin, http, sent):
    standin = make_standin()
    api = make_api(http, standin, scope="openid offline_access")
    grant = await api.login(standin.username, standin.password)
    assert form(sent.to(standin.token_endpoint)[0])["scope"] == "openid offline_access"
    assert grant.refresh_lifetime is None  # an offline token: refresh_expires_in 0


@pytest.mark.parametrize(("status", "body", "retry_after", "expect"), [
    (503, "json", None, "the identity provider answered HTTP 503: Injected failure"),
    (502, "html", None, "the identity provider answered HTTP 502 (text/html body)"),
    (500, "garbage", None, "HTTP 500 (application/json body)"),
    (429, "json", "17", "HTTP 429"),
    (400, b'{"error": "invalid_request", "error_description": "Missing parameter"}', None,
     "the identity provider answered HTTP 400: invalid_request (Missing parameter)"),
    (400, b'{"error": "temporarily_unavailable"}', "5",
     "the identity provider answered HTTP 400: temporarily_unavailable"),
    (200, "garbage", None, "HTTP 200 with a body that is not the expected JSON"),
    (200, "empty", None, "HTTP 200 with a body that is not the expected JSON"),
    (200, b'{"access_token": "a b", "token_type": "Bearer"}', None, "not the expected JSON"),
    (200, b'{"access_token": "abc", "token_type": "mac"}', None, "not the expected JSON"),
    (200, b'{"token_type": "Bearer"}', None, "not the expected JSON"),
])
async def test_other_token_failures_are_transient(api, standin, status, body, retry_after,
                                                  expect):
    standin.fail(status, body=body, retry_after=retry_after, endpoints=("token",))
    with pytest.raises(upstream.TransientError) as info:
        await api.login(standin.username, standin.password)
    assert expect in str(info.value)
    assert standin.password not in str(info.value)
    assert info.value.retry_after == (float(retry_after) if retry_after else None)
    assert type(info.value) is upstream.TransientError


async def test_token_endpoint_that_moved_is_found_again(api, standin):
    grant = await api.login(standin.username, standin.password)
    assert grant.refresh_token is not None
    new = standin.move_token_endpoint()
    with pytest.raises(upstream.TransientError, match="HTTP 404"):
        await api.refresh(grant.refresh_token)
    assert standin.counts["token_gone"] == 1
    refreshed = await api.refresh(grant.refresh_token)  # the next attempt reads discovery
    assert standin.token_valid(refreshed.access_token)
    assert standin.counts["discovery"] == 2 and standin.counts["token_gone"] == 1
    assert (await api.provider()).token_endpoint == new
    await api.login(standin.username, standin.password)
    assert standin.counts["discovery"] == 2  # and the new document is cached again


# -- lifetimes ------------------------------------------------------------------------------

def rewrite_token_answer(standin: StandIn, **changes) -> None:
    def rewrite(endpoint: str, answer: dict) -> dict:
        if endpoint not in ("oidc_login", "oidc_refresh"):
            return answer
        answer = {**answer, **changes}
        return {k: v for k, v in answer.items() if v is not None}
    standin.rewrite = rewrite


@pytest.mark.parametrize(("changes", "lifetime"), [
    ({}, 299.0),
    ({"expires_in": 1000}, 299.0),  # the JWT says 300: the shorter wins
    ({"expires_in": 60}, 59.0),  # expires_in says less: the shorter wins
    ({"expires_in": None}, 299.0),  # only the JWT
    ({"expires_in": "300"}, 299.0),  # not a number: only the JWT
    ({"access_token": "opaque-token", "expires_in": 120}, 119.0),  # only expires_in
    ({"access_token": "opaque-token", "expires_in": None}, 42.0),  # neither: the default
    ({"access_token": "opaque-token", "expires_in": 0}, 42.0),
    ({"access_token": "opaque-token", "expires_in": 10**9}, upstream.MAX_LIFETIME),
])
async def test_access_lifetime_is_the_shorter_of_expires_in_and_exp(make_standin, http,
                                                                    changes, lifetime):
    standin = make_standin(access_lifetime=300)
    rewrite_token_answer(standin, **changes)
    api = make_api(http, standin, default_token_lifetime=42)
    grant = await api.login(standin.username, standin.password)
    assert grant.lifetime == lifetime


async def test_a_jwt_exp_shorter_than_expires_in_wins(make_standin, http):
    standin = make_standin()
    now = int(time.time())
    rewrite_token_answer(standin, access_token=jwt({"iat": now, "exp": now + 30}),
                         expires_in=300)
    grant = await make_api(http, standin).login(standin.username, standin.password)
    assert grant.lifetime == 29


async def test_lifetime_counts_from_when_the_request_was_sent(api, standin):
    await api.provider()
    standin.delay = 0.3
    before = trio.current_time()
    grant = await api.login(standin.username, standin.password)
    after = trio.current_time()
    assert after - before >= 0.3
    assert before <= grant.requested_at < before + 0.1


@pytest.mark.parametrize(("mode", "refresh_lifetime"), [
    ("lifetime", 3599.0),
    ("zero", None),  # Keycloak's offline tokens: unknown, not expired
    ("absent", 3599.0),  # no refresh_expires_in: the refresh token's own exp
])
async def test_refresh_expires_in_modes(make_standin, http, mode, refresh_lifetime):
    standin = make_standin(refresh_lifetime=3600)
    standin.refresh_expires_mode = mode
    grant = await make_api(http, standin).login(standin.username, standin.password)
    assert grant.refresh_lifetime == refresh_lifetime
    assert grant.refresh_token is not None
    again = await make_api(http, standin).refresh(grant.refresh_token)
    assert again.refresh_lifetime == refresh_lifetime


@pytest.mark.parametrize(("changes", "refresh_lifetime"), [
    ({"refresh_token": "opaque", "refresh_expires_in": None}, None),  # absent: unknown
    ({"refresh_token": "opaque", "refresh_expires_in": 0}, None),  # 0: unknown
    ({"refresh_token": "opaque", "refresh_expires_in": 1800}, 1799.0),
    ({"refresh_token": "opaque", "refresh_expires_in": -5}, None),
    ({"refresh_token": None, "refresh_expires_in": None}, None),  # none: keep the old one
])
async def test_refresh_lifetime_without_a_jwt(standin, http, changes, refresh_lifetime):
    rewrite_token_answer(standin, **changes)
    grant = await make_api(http, standin).login(standin.username, standin.password)
    assert grant.refresh_lifetime == refresh_lifetime
    assert grant.refresh_token == changes["refresh_token"]


# -- a confidential client ------------------------------------------------------------------

SECRET = "s3cr3t:value%20+/&x"  # every character RFC 6749 2.3.1 makes us encode


async def test_client_secret_goes_as_http_basic_only(make_standin, http, sent):
    standin = make_standin(clients=(OidcClient("vm-token", secret=SECRET),))
    api = make_api(http, standin, client_id="vm-token", client_secret=SECRET)
    grant = await api.login(standin.username, standin.password)
    assert grant.refresh_token is not None
    await api.refresh(grant.refresh_token)
    assert standin.counts["client_secret_basic"] == 2
    assert standin.counts["client_secret_post"] == 0
    requests = sent.to(standin.token_endpoint)
    assert len(requests) == 2
    for request in requests:
        assert request.headers["authorization"].startswith("Basic ")
        assert "client_secret" not in form(request)
        assert SECRET not in request.content.decode()
        assert SECRET not in str(request.url)
    basic = base64.b64decode(requests[0].headers["authorization"][6:]).decode()
    assert basic == "vm-token:s3cr3t%3Avalue%2520%2B%2F%26x"


async def test_wrong_client_secret_is_never_in_a_message(make_standin, http):
    standin = make_standin(clients=(OidcClient("vm-token", secret="the-right-one"),))
    api = make_api(http, standin, client_id="vm-token", client_secret=SECRET)
    with pytest.raises(upstream.ClientRejected, match="'vm-token' \\(oidc_client_id\\)") as info:
        await api.login(standin.username, standin.password)
    assert SECRET not in str(info.value)
    # An identity provider that echoes what it got: scrubbed.
    standin.fail(401, body=json.dumps({"error": "invalid_client",
                                       "error_description": f"secret {SECRET} is wrong"}
                                      ).encode(), endpoints=("token",))
    with pytest.raises(upstream.ClientRejected) as info:
        await api.login(standin.username, standin.password)
    assert SECRET not in str(info.value) and "[redacted]" in str(info.value)
    standin.fail(503, body=json.dumps({"message": f"oops {SECRET}"}).encode(),
                 endpoints=("token",))
    with pytest.raises(upstream.TransientError) as transient:
        await api.login(standin.username, standin.password)
    assert SECRET not in str(transient.value)


# -- the VideoManager list ------------------------------------------------------------------

async def test_videomanagers_from_the_api(api, standin, sent):
    grant = await api.login(standin.username, standin.password)
    listed = await api.videomanagers(grant.access_token)
    assert [(vm.id, vm.name) for vm in listed] == [("1001", "Marketing"), ("1002", "Sales"),
                                                   ("1003", "Support")]
    (request,) = sent.to(standin.url)
    assert request.method == "GET"
    assert request.headers["authorization"] == f"Bearer {grant.access_token}"


async def test_videomanager_list_with_a_rejected_token(api, standin):
    grant = await api.login(standin.username, standin.password)
    standin.revoke_access_tokens()
    with pytest.raises(TokenRejected, match="rejected the access token") as info:
        await api.videomanagers(grant.access_token)
    assert isinstance(info.value, upstream.TransientError)  # and so backed off from
    assert grant.access_token not in str(info.value)
    with pytest.raises(TokenRejected):
        await api.videomanagers("not-a-token")


async def test_videomanager_list_failures_are_transient(make_standin, http):
    standin = make_standin(videomanagers=())
    api = make_api(http, standin)
    grant = await api.login(standin.username, standin.password)
    with pytest.raises(upstream.TransientError, match="listed no VideoManagers"):
        await api.videomanagers(grant.access_token)
    elsewhere = OidcApi(http, standin.origin + "/v2/nothing", api.link)
    with pytest.raises(upstream.TransientError) as info:
        await elsewhere.videomanagers(grant.access_token)
    assert "cannot list the VideoManagers: HTTP 404: Not found" in str(info.value)
    assert not isinstance(info.value, TokenRejected)



def test_a_url_with_spaces_or_control_characters_is_refused():
    from vm_tokend.upstream.oidc import check_url
    for bad in ("https://login.example/x\nvm-tokend ERROR forged", "https://a b/x",
                "https://login.example/\x00"):
        with pytest.raises(upstream.ClientRejected, match="is not a URL"):
            check_url(bad, "the issuer")


def test_a_very_short_expires_in_stays_short():
    from vm_tokend.upstream.oidc import IssuerLink, OidcApi
    api = OidcApi(httpx.AsyncClient(), "https://api.example/v1/vms",
                  IssuerLink("https://login.example/.well-known/openid-configuration",
                             "https://login.example"))
    for expires_in, most in ((1, 1.0), (2, 1.0), (0.5, 0.5)):
        response = httpx.Response(200, json={"access_token": "opaque-token",
                                             "expires_in": expires_in})
        assert 0 < api.parse_grant(response, 0.0, ()).lifetime <= most


async def test_no_cache_discovery_is_read_at_most_once_a_minute_and_kept_when_it_fails(
        autojump_clock):
    from vm_tokend.upstream import oidc
    seen: Counter[str] = Counter()
    down: list[bool] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen[request.url.path] += 1
        if request.url.path.endswith("openid-configuration"):
            if down:
                return httpx.Response(503)
            return httpx.Response(200, headers={"Cache-Control": "no-cache"}, json={
                "issuer": "https://login.example", "token_endpoint":
                "https://login.example/token"})
        return httpx.Response(200, json={"access_token": "a.b.c", "expires_in": 300})

    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as http:
        api = oidc.OidcApi(http, "https://api.example/v1/vms", oidc.IssuerLink(
            "https://login.example/.well-known/openid-configuration", "https://login.example"))
        for _ in range(5):
            await api.refresh("r")
        assert seen["/.well-known/openid-configuration"] == 1
        await trio.sleep(oidc.MIN_DISCOVERY_CACHE + 1)
        down.append(True)  # the discovery URL fails; the token endpoint still works
        await api.refresh("r")
        assert seen["/.well-known/openid-configuration"] == 2
        assert seen["/token"] == 6
