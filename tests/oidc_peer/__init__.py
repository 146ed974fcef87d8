"""A real OpenID Connect provider for interop tests: django-oauth-toolkit on loopback.

`settings` and `urls` make a small Django project; `runner` serves it in its own process
(``python -m tests.oidc_peer.runner serve``) and `fixture` gives tests an `oidc_peer`.
Nothing here is imported by vm-token itself; django-oauth-toolkit is a dev dependency only.
"""
