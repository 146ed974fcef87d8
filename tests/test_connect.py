"""Choosing the way to log in (auth = auto | oidc | legacy, oidc_issuer) against stand-ins
over real HTTP, and noticing on reload that WebFinger now answers differently."""

from __future__ import annotations

from collections import Counter
from typing import Any

import httpx
import pytest

from standin.server import OidcClient, StandIn
from tests.quick_standin import (  # noqa: F401 (fixtures)
    TLS,
    make_standin_fixture,
    one_key_fixture,
    standin_fixture,
    stopping_standins_fixture,
)
from tests.test_settings import isolated  # noqa: F401 (an autouse fixture: no VM_TOKEN_* leaks in)
from vm_tokend import upstream
from vm_tokend.config.settings import Settings
from vm_tokend.upstream.connect import Connector
from vm_tokend.upstream.legacy import VideoManagerApi
from vm_tokend.upstream.oidc import OidcApi


@pytest.fixture
async def http():
    async with httpx.AsyncClient(verify=TLS) as client:
        yield client


class Setup:
    """A Connector over settings the test may change, as a reload does."""

    def __init__(self, http: httpx.AsyncClient, **settings: Any) -> None:
        self.settings = Settings(**settings)
        self.calls: Counter[str] = Counter()
        self.connector = Connector(http, lambda: self.settings, self.calls)

    def change(self, **settings: Any) -> None:
        self.settings = self.settings.model_copy(update=settings)


# -- what __call__ chooses ------------------------------------------------------------------

async def test_auto_with_legacy_only_api_is_legacy(make_standin, http):
    standin = make_standin(legacy_only=True)
    setup = Setup(http, api_url=standin.url, default_token_lifetime=120)
    backend = await setup.connector()
    assert isinstance(backend, VideoManagerApi)
    assert backend.kind == "legacy" and backend.api_url == standin.url
    assert backend.default_token_lifetime == 120
    assert setup.calls == {"webfinger": 1}  # it asked, and heard 404
    grant = await backend.login(standin.username, standin.password)
    assert standin.token_valid(grant.access_token, "1001")


@pytest.mark.parametrize("href", ["document", "issuer"])
async def test_auto_with_both_is_oidc_with_the_right_issuer(make_standin, http, href):
    standin = make_standin(webfinger_href=href)
    setup = Setup(http, api_url=standin.url)
    backend = await setup.connector()
    assert isinstance(backend, OidcApi)
    assert backend.kind == "oidc"
    assert backend.issuer == standin.issuer
    assert backend.link.document_url == standin.discovery_url
    assert backend.api_url == standin.url
    assert (backend.client_id, backend.scope) == ("anonymous", "openid")
    assert standin.counts["webfinger"] == 1 and setup.calls["webfinger"] == 1
    grant = await backend.login(standin.username, standin.password)
    assert standin.token_valid(grant.access_token, "1002")
    assert standin.counts["login"] == 0  # not the legacy endpoint


async def test_client_settings_reach_the_backend(make_standin, http):
    standin = make_standin(clients=(OidcClient("vm-token", secret="shh-secret"),))
    setup = Setup(http, api_url=standin.url, oidc_client_id="vm-token",
                  oidc_client_secret="shh-secret", oidc_scope="openid offline_access",
                  default_token_lifetime=77)
    backend = await setup.connector()
    assert isinstance(backend, OidcApi)
    assert (backend.client_id, backend.scope) == ("vm-token", "openid offline_access")
    assert backend.default_token_lifetime == 77
    grant = await backend.login(standin.username, standin.password)
    assert standin.token_valid(grant.access_token)
    assert standin.counts["client_secret_basic"] == 1
    assert setup.calls["discovery"] == 1  # the connector's counter is the backend's


async def test_auth_legacy_asks_no_webfinger(standin, http):
    setup = Setup(http, api_url=standin.url, auth="legacy")
    backend = await setup.connector()
    assert isinstance(backend, VideoManagerApi)
    assert standin.counts["webfinger"] == 0 and setup.calls["webfinger"] == 0
    await backend.login(standin.username, standin.password)
    assert standin.counts["login_ok"] == 1


@pytest.mark.parametrize("auth", ["auto", "oidc"])
async def test_oidc_issuer_skips_webfinger(make_standin, http, auth):
    standin = make_standin()
    setup = Setup(http, api_url=standin.url, auth=auth, oidc_issuer=standin.issuer + "/")
    backend = await setup.connector()
    assert isinstance(backend, OidcApi)
    assert backend.issuer == standin.issuer
    assert backend.link.document_url == standin.discovery_url
    assert standin.counts["webfinger"] == 0 and setup.calls["webfinger"] == 0
    grant = await backend.login(standin.username, standin.password)
    assert standin.token_valid(grant.access_token)


async def test_oidc_issuer_elsewhere_than_the_api(make_standin, http):
    api, provider = make_standin(legacy_only=True), make_standin()
    setup = Setup(http, api_url=api.url, oidc_issuer=provider.issuer)
    backend = await setup.connector()
    assert isinstance(backend, OidcApi) and backend.issuer == provider.issuer
    assert provider.counts["webfinger"] == 0
    await backend.login(provider.username, provider.password)
    assert provider.counts["oidc_login_ok"] == 1


async def test_auth_oidc_without_a_link_is_a_configuration_error(make_standin, http):
    standin = make_standin(legacy_only=True)
    setup = Setup(http, api_url=standin.url, auth="oidc")
    with pytest.raises(upstream.ClientRejected) as info:
        await setup.connector()
    assert "auth is \"oidc\"" in str(info.value) and "set oidc_issuer" in str(info.value)
    assert standin.counts["login"] == 0


async def test_auth_oidc_with_a_link_is_oidc(make_standin, http):
    standin = make_standin()
    backend = await Setup(http, api_url=standin.url, auth="oidc").connector()
    assert isinstance(backend, OidcApi) and backend.issuer == standin.issuer


@pytest.mark.parametrize("auth", ["auto", "oidc"])
async def test_webfinger_trouble_is_transient_never_a_guess(standin, http, auth):
    standin.fail(503, retry_after="9", endpoints=("webfinger",))
    setup = Setup(http, api_url=standin.url, auth=auth)
    with pytest.raises(upstream.TransientError) as info:
        await setup.connector()
    assert info.value.retry_after == 9
    standin.heal()
    assert isinstance(await setup.connector(), OidcApi)  # asked again, not cached
    assert standin.counts["webfinger"] == 2


async def test_webfinger_unreachable_is_transient(http):
    setup = Setup(http, api_url="http://127.0.0.1:9/v1/vms")
    with pytest.raises(upstream.TransientError, match="cannot reach"):
        await setup.connector()


async def test_each_call_reads_the_current_settings(make_standin, http):
    standin = make_standin()
    setup = Setup(http, api_url=standin.url)
    assert isinstance(await setup.connector(), OidcApi)
    setup.change(auth="legacy")
    assert isinstance(await setup.connector(), VideoManagerApi)
    assert standin.counts["webfinger"] == 1


# -- changed(): what a reload asks ----------------------------------------------------------

async def test_changed_when_webfinger_answers_the_same(make_standin, http):
    standin = make_standin()
    setup = Setup(http, api_url=standin.url)
    assert await setup.connector.changed(setup.settings, "oidc", standin.issuer) is False
    assert await setup.connector.changed(setup.settings, "legacy", None) is True
    assert await setup.connector.changed(setup.settings, "oidc",
                                         "https://login.example.com/auth/realms/x") is True


async def test_changed_on_a_legacy_only_api(make_standin, http):
    standin = make_standin(legacy_only=True)
    setup = Setup(http, api_url=standin.url)
    assert await setup.connector.changed(setup.settings, "legacy", None) is False
    assert await setup.connector.changed(setup.settings, "oidc", "http://127.0.0.1/x") is True


async def test_changed_sees_webfinger_change_once_its_cache_expires(make_standin, http,
                                                                    mock_clock):
    standin = make_standin()
    setup = Setup(http, api_url=standin.url)
    backend = await setup.connector()
    assert isinstance(backend, OidcApi)
    standin.legacy_only = True  # the vendor switched OpenID Connect off
    assert await setup.connector.changed(setup.settings, "oidc", backend.issuer) is False
    assert standin.counts["webfinger"] == 1  # within max-age=300: the cached answer
    mock_clock.jump(301)
    assert await setup.connector.changed(setup.settings, "oidc", backend.issuer) is True
    assert setup.calls["webfinger"] == 2
    assert isinstance(await setup.connector(), VideoManagerApi)


@pytest.mark.parametrize("settings", [{"auth": "legacy"},
                                      {"oidc_issuer": "https://login.example.com/realms/x"}])
async def test_changed_asks_nothing_when_webfinger_does_not_decide(standin, http, settings):
    setup = Setup(http, api_url=standin.url, **settings)
    for auth, issuer in (("legacy", None), ("oidc", "https://elsewhere.example.com/x")):
        assert await setup.connector.changed(setup.settings, auth, issuer) is False
    assert standin.counts["webfinger"] == 0 and setup.calls["webfinger"] == 0


@pytest.mark.parametrize(("status", "body"), [(503, "json"), (200, "garbage")])
async def test_changed_keeps_the_session_when_unsure(standin, http, status, body):
    standin.fail(status, body=body, endpoints=("webfinger",))
    setup = Setup(http, api_url=standin.url)
    assert await setup.connector.changed(setup.settings, "legacy", None) is False
    assert await setup.connector.changed(setup.settings, "oidc", "https://x.example/y") is False
    assert standin.counts["webfinger"] == 2


async def test_changed_keeps_the_session_when_webfinger_names_an_http_issuer(standin, http):
    standin.rewrite = lambda endpoint, answer: {**answer, "links": [
        {"rel": "http://openid.net/specs/connect/1.0/issuer",
         "href": "http://login.example.com/auth/realms/platform"}]}
    setup = Setup(http, api_url=standin.url)
    assert await setup.connector.changed(setup.settings, "oidc", standin.issuer) is False
    with pytest.raises(upstream.ClientRejected, match="not an https URL"):
        await setup.connector()


# -- key(): what a session's backend depends on ---------------------------------------------

BASE: dict[str, Any] = {"api_url": "https://api.video-cdn.net/v1/vms"}


@pytest.mark.parametrize("change", [
    {"api_url": "https://videos.example.com/v1/vms"},
    {"auth": "legacy"},
    {"auth": "oidc"},
    {"oidc_issuer": "https://login.example.com/realms/x"},
    {"oidc_client_id": "vm-token"},
    {"oidc_client_secret": "shh"},
    {"oidc_scope": "openid offline_access"},
    {"default_token_lifetime": 60.0},
])
def test_key_changes_with_what_the_backend_depends_on(change):
    assert Connector.key(Settings(**BASE)) != Connector.key(Settings(**{**BASE, **change}))


def test_key_changes_with_the_secret_value():
    one = Settings(**{**BASE, "oidc_client_secret": "first"})
    two = Settings(**{**BASE, "oidc_client_secret": "second"})
    assert Connector.key(one) != Connector.key(two)
    assert Connector.key(one) == Connector.key(Settings(**{**BASE,
                                                           "oidc_client_secret": "first"}))


@pytest.mark.parametrize("change", [
    {"username": "someone", "password": "pw"},
    {"default_videomanager": "Sales"},
    {"videomanagers": ["Sales"]},
    {"idle_timeout": 60.0},
    {"log_level": "debug"},
    {"max_backoff": 5.0},
])
def test_key_ignores_what_a_session_can_change_in_place(change):
    assert Connector.key(Settings(**BASE)) == Connector.key(Settings(**{**BASE, **change}))


def test_standin_fixture_is_the_full_service(standin: StandIn):
    assert standin.legacy_only is False  # the tests above rely on it
