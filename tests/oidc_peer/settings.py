"""Django settings of the OIDC peer, read from the environment the runner is given.

Environment (set by `tests.oidc_peer.fixture`):

- ``OIDC_PEER_DIR``: a private directory for the SQLite database (required).
- ``OIDC_PEER_RSA_KEY``: the PEM RSA private key that signs ID tokens, made per test run and
  never written to the repository (required for OIDC).
- ``OIDC_PEER_ORIGIN``: ``http://127.0.0.1:PORT``, known once the runner has bound its socket;
  the device grant's verification URI is made from it.
- ``OIDC_PEER_ACCESS_LIFETIME`` / ``OIDC_PEER_REFRESH_LIFETIME``: token lifetimes in seconds.
- ``OIDC_PEER_WEBFINGER_MAX_AGE``: the WebFinger answer's ``Cache-Control: max-age``.
- ``OIDC_PEER_ADVERTISE_DEVICE``: "1" (default) adds ``device_authorization_endpoint`` to the
  discovery document, which django-oauth-toolkit does not list on its own (see `views`).
- ``OIDC_PEER_SECRET_KEY``: Django's signing key (sessions, CSRF); random when unset.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA_DIR = Path(os.environ["OIDC_PEER_DIR"])
ORIGIN = os.environ.get("OIDC_PEER_ORIGIN", "http://127.0.0.1")

ACCESS_LIFETIME = int(os.environ.get("OIDC_PEER_ACCESS_LIFETIME", "300"))
REFRESH_LIFETIME = int(os.environ.get("OIDC_PEER_REFRESH_LIFETIME", "3600"))
WEBFINGER_MAX_AGE = int(os.environ.get("OIDC_PEER_WEBFINGER_MAX_AGE", "300"))
ADVERTISE_DEVICE = os.environ.get("OIDC_PEER_ADVERTISE_DEVICE", "1") == "1"

SECRET_KEY = os.environ.get("OIDC_PEER_SECRET_KEY") or secrets.token_urlsafe(32)
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "[::1]"]
ROOT_URLCONF = "tests.oidc_peer.urls"
WSGI_APPLICATION = None
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    # DOT's templates say {% load static %}; nothing serves the files (DEBUG is off)
    "django.contrib.staticfiles",
    "oauth2_provider",
]
STATIC_URL = "/static/"

MIDDLEWARE = [
    "tests.oidc_peer.counting.CountingMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    # CommonMiddleware sets Content-Length, without which Django's server closes every
    # connection after one answer (no keep-alive)
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
]

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [HERE / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
            ],
        },
    },
]

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": DATA_DIR / "peer.sqlite3",
        "OPTIONS": {
            # the server's threads and the fixture's ORM subprocess write concurrently:
            # WAL lets readers go on during a write, IMMEDIATE takes the write lock at BEGIN
            # (no "database is locked" on a read-to-write upgrade), timeout waits for it
            "timeout": 20,
            "transaction_mode": "IMMEDIATE",
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        },
    },
}

# The default PBKDF2 costs ~0.3 s per password check and per hashed client secret: far too
# slow for a test server. MD5 is what Django's own docs suggest for tests.
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

LOGIN_URL = "/accounts/login/"
LOGIN_REDIRECT_URL = "/accounts/profile/"

OAUTH2_PROVIDER = {
    "OIDC_ENABLED": True,
    "OIDC_RSA_PRIVATE_KEY": os.environ.get("OIDC_PEER_RSA_KEY", ""),
    "ACCESS_TOKEN_EXPIRE_SECONDS": ACCESS_LIFETIME,
    "ID_TOKEN_EXPIRE_SECONDS": ACCESS_LIFETIME,
    # DOT counts this from the expiry of the refresh token's access token (a sliding window)
    "REFRESH_TOKEN_EXPIRE_SECONDS": REFRESH_LIFETIME,
    "ROTATE_REFRESH_TOKEN": True,
    "REFRESH_TOKEN_REUSE_PROTECTION": True,
    # no grace: a reused refresh token fails at once, as with Keycloak's "Revoke Refresh Token"
    "REFRESH_TOKEN_GRACE_PERIOD_SECONDS": 0,
    "SCOPES": {
        "openid": "OpenID Connect",
        "profile": "Your name",
        "email": "Your e-mail address",
        "offline_access": "Stay logged in",
    },
    "DEFAULT_SCOPES": ["openid"],
    "PKCE_REQUIRED": True,
    # RFC 8252 loopback redirects: any port on 127.0.0.1 and [::1] is accepted by DOT; this
    # extends the same to "localhost" (RFC 8252 8.3 advises against that name, DOT too)
    "ALLOW_LOCALHOST_LOOPBACK": False,
    "OAUTH_DEVICE_VERIFICATION_URI": f"{ORIGIN}/o/device/",
    "DEVICE_FLOW_INTERVAL": int(os.environ.get("OIDC_PEER_DEVICE_INTERVAL", "1")),
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(name)s %(levelname)s %(message)s"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "loggers": {
        # the access log: one line per request, read when a test fails
        "django.server": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
        "django": {"handlers": ["stderr"], "level": "WARNING", "propagate": False},
        "oauth2_provider": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
    },
}
