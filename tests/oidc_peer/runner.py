"""Serve the OIDC peer on 127.0.0.1, or migrate a database for it.

    python -m tests.oidc_peer.runner serve --user NAME --password-env VAR [--ready-file F]
    python -m tests.oidc_peer.runner migrate

``migrate`` alone makes a database that the fixture copies for each server, so that each
start skips most of the migrations' cost (``serve`` migrates what is left, usually nothing).

``serve`` binds port 0 first (so the settings know the origin), migrates the fresh SQLite
database, creates the user and the applications, writes the origin to ``--ready-file`` and
prints ``serving http://127.0.0.1:PORT``, then serves with Django's threaded WSGI server
(HTTP/1.1 keep-alive, a thread per connection) until killed.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from pathlib import Path

# The applications the runner creates: client ids the fixture and tests name.
PASSWORD_CLIENT_ID = "anonymous"
CODE_CLIENT_ID = "vm-token-code"
DEVICE_CLIENT_ID = "vm-token-device"
# RFC 8252 7.3: DOT accepts any port at request time for a registered http://127.0.0.1 or
# http://[::1] redirect URI; path and query must match exactly.
DEFAULT_REDIRECT_URIS = ("http://127.0.0.1/", "http://127.0.0.1/callback",
                         "http://[::1]/callback")


def _setup_django() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.oidc_peer.settings")
    import django

    django.setup()


def _seed(username: str, password: str, redirect_uris: list[str]) -> None:
    from django.contrib.auth import get_user_model
    from oauth2_provider.models import get_application_model

    user_model = get_user_model()
    user_model.objects.create_user(username=username, password=password,
                                   email=f"{username}@example.invalid")
    application = get_application_model()
    common = {"client_type": application.CLIENT_PUBLIC, "client_secret": "",
              "algorithm": application.RS256_ALGORITHM}
    # Each DOT application has one grant type; refresh_token works for all of them.
    application.objects.create(
        client_id=PASSWORD_CLIENT_ID, name="vm-token (password)",
        authorization_grant_type=application.GRANT_PASSWORD, **common)
    application.objects.create(
        client_id=CODE_CLIENT_ID, name="vm-token (browser)",
        authorization_grant_type=application.GRANT_AUTHORIZATION_CODE,
        redirect_uris=" ".join(redirect_uris),
        # like a first-party Keycloak client: the login page, then straight back (no consent)
        skip_authorization=True, **common)
    application.objects.create(
        client_id=DEVICE_CLIENT_ID, name="vm-token (device)",
        authorization_grant_type=application.GRANT_DEVICE_CODE, **common)




def _exit_with_parent() -> None:
    """End the server when the process that started it is gone (a killed pytest)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def serve(args: argparse.Namespace) -> None:
    from django.core.servers.basehttp import ThreadedWSGIServer, WSGIRequestHandler

    class Server(ThreadedWSGIServer):
        # many clients may connect at once; socketserver's default backlog is 5
        request_queue_size = 128

    _exit_with_parent()
    httpd = Server(("127.0.0.1", 0), WSGIRequestHandler)
    origin = f"http://127.0.0.1:{httpd.server_port}"
    os.environ["OIDC_PEER_ORIGIN"] = origin
    _setup_django()

    from django.core.management import call_command
    from django.core.wsgi import get_wsgi_application

    call_command("migrate", verbosity=0, interactive=False)
    password = os.environ[args.password_env]
    _seed(args.user, password, args.redirect_uri or list(DEFAULT_REDIRECT_URIS))
    httpd.set_app(get_wsgi_application())
    if args.ready_file:
        ready = Path(args.ready_file)
        tmp = ready.with_suffix(".tmp")
        tmp.write_text(origin)
        tmp.rename(ready)  # atomic: the fixture never reads half a line
    print(f"serving {origin}", flush=True)
    httpd.serve_forever()


def migrate(_args: argparse.Namespace) -> None:
    _setup_django()
    from django.core.management import call_command

    call_command("migrate", verbosity=0, interactive=False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.oidc_peer.runner")
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser("serve")
    p_serve.add_argument("--user", required=True)
    p_serve.add_argument("--password-env", required=True,
                         help="the environment variable holding the user's password")
    p_serve.add_argument("--redirect-uri", action="append",
                         help="a redirect URI of the code-flow application (repeatable)")
    p_serve.add_argument("--ready-file")
    p_serve.set_defaults(func=serve)
    sub.add_parser("migrate").set_defaults(func=migrate)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
