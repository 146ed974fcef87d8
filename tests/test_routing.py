"""Which profile a request is for (server/routing.py), without a socket or a session."""

from __future__ import annotations

import pytest

from tests.fakes import FakeBackend
from vm_token.errors import BadRequest, UnknownHost, UnknownProfile
from vm_tokend.keeper import Keeper
from vm_tokend.keeper.account import Account
from vm_tokend.server.routing import Routes


def routes_for(**profiles: tuple[frozenset[str], str | None]) -> Routes:
    keeper = Keeper()
    routes = Routes(keeper)
    for name, (hosts, user) in profiles.items():
        keeper.accounts[name] = Account(FakeBackend())
        routes.set(name, hosts, user)
    return routes


API = frozenset({"api.example"})


def test_a_named_profile_wins_and_must_exist():
    routes = routes_for(default=(API, None), work=(API, "me@work.example"))
    assert routes.profile({"profile": "work"}) == "work"
    assert routes.profile({}) is None  # the default one
    with pytest.raises(UnknownProfile):
        routes.profile({"profile": "nope"})
    with pytest.raises(BadRequest):
        routes.profile({"profile": 7})


def test_git_host_picks_the_profile_and_user_breaks_a_tie():
    routes = routes_for(default=(API, "me@home.example"), work=(API, "Me@Work.example"),
                        other=(frozenset({"api.other.example"}), None))
    assert routes.profile({"host": "api.other.example"}) == "other"
    assert routes.profile({"host": "API.example", "user": "me@work.EXAMPLE"}) == "work"
    assert routes.profile({"host": "api.example"}) == "default"  # a tie: the default
    assert routes.user("work") == "Me@Work.example" and routes.user(None) == "me@home.example"


def test_a_host_no_profile_serves_is_refused_with_the_ones_it_would_serve():
    routes = routes_for(default=(API, None))
    with pytest.raises(UnknownHost, match="gives tokens only for api.example"):
        routes.profile({"host": "evil.example"})
    # named, but not that profile's host
    with pytest.raises(UnknownHost):
        routes.profile({"profile": "default", "host": "evil.example"})


def test_plain_http_only_to_loopback():
    routes = routes_for(default=(frozenset({"127.0.0.1:8080", "api.example"}), None))
    assert routes.profile({"host": "127.0.0.1:8080", "protocol": "http"}) == "default"
    with pytest.raises(UnknownHost, match="only over https"):
        routes.profile({"host": "api.example", "protocol": "http"})


def test_a_forgotten_or_removed_profile_routes_nothing():
    routes = routes_for(default=(API, None), work=(frozenset({"api.work.example"}), None))
    routes.forget("work")
    with pytest.raises(UnknownHost):
        routes.profile({"host": "api.work.example"})
    routes.set("work", frozenset({"api.work.example"}), None)
    del routes.keeper.accounts["work"]  # the keeper no longer has it
    assert routes.for_host("api.work.example", "https") is None


def test_prefer_host_falls_back_to_the_default():
    routes = routes_for(default=(API, None), work=(frozenset({"api.work.example"}), None))
    assert routes.profile({"prefer_host": "api.work.example"}) == "work"
    assert routes.profile({"prefer_host": "elsewhere.example"}) is None
