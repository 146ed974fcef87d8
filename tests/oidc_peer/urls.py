"""URLs of the OIDC peer.

- ``/o/``: django-oauth-toolkit (token, authorize, device endpoints, OIDC discovery at
  ``/o/.well-known/openid-configuration``, JWKS, userinfo); the issuer is ``{origin}/o``.
- ``/.well-known/webfinger``: the vendor's WebFinger answer, pointing at that discovery.
- ``/accounts/login/``: Django's login page (username, password, submit).
- ``/v1/vms``, ``/v1/vms/<id>/videos``: the API's stand-in, protected by DOT access tokens.
- ``/_peer/counts``: test-only counters (GET; DELETE resets).
- ``/_peer/revoke-refresh-tokens``: test-only (POST): every refresh token is deleted.
"""

from __future__ import annotations

from django.contrib.auth import views as auth_views
from django.urls import include, path, re_path

from tests.oidc_peer import counting, views

urlpatterns = [
    # before DOT's include, so this view (DOT's, plus the device endpoint) answers discovery
    re_path(r"^o/\.well-known/openid-configuration/?$", views.DiscoveryView.as_view()),
    path("o/", include("oauth2_provider.urls", namespace="oauth2_provider")),
    path(".well-known/webfinger", views.webfinger),
    path("accounts/login/", auth_views.LoginView.as_view(), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("accounts/profile/", views.profile),
    path("v1/vms", views.vms),
    path("v1/vms/<str:vm_id>/videos", views.videos),
    path("_peer/counts", counting.counts_view),
    path("_peer/revoke-refresh-tokens", counting.revoke_refresh_tokens_view),
]
