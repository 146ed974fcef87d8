"""Counters of what clients asked the peer, for "exactly one refresh" kinds of assertions.

Every request to the token endpoint is counted by ``grant_type`` and, when refused, by the
OAuth ``error`` code of its JSON answer; the other endpoints by path group and status. The
counts live in the server process and are read (and reset) at ``/_peer/counts``.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse, QueryDict
from django.views.decorators.csrf import csrf_exempt

TOKEN_PATH = "/o/token/"

_lock = threading.Lock()
# Held for the whole of each token request and of a revocation, so that a revocation falls
# between two refreshes, never inside one: DOT re-reads the refresh token it validated with
# `select_for_update().get()`, and a token deleted in that window is an unhandled
# DoesNotExist (a 500) — a DOT race that Keycloak does not have, not what the tests are about.
token_requests = threading.Lock()
_grants: Counter[str] = Counter()
_errors: Counter[str] = Counter()
_grant_errors: Counter[str] = Counter()
_paths: Counter[str] = Counter()


def _path_group(path: str) -> str:
    if path.startswith("/v1/vms"):
        return "api"
    if path.startswith("/_peer/"):
        return "peer"
    return path


def snapshot() -> dict[str, Any]:
    with _lock:
        return {
            "token": {
                "requests": sum(_grants.values()),
                "grant_type": dict(_grants),
                "error": dict(_errors),
                "grant_type_error": dict(_grant_errors),
            },
            "paths": dict(_paths),
        }


def reset() -> None:
    with _lock:
        for counter in (_grants, _errors, _grant_errors, _paths):
            counter.clear()


class CountingMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        grant_type = None
        if request.path == TOKEN_PATH and request.method == "POST":
            # request.body, not request.POST: the body stays readable for DOT afterwards
            grant_type = QueryDict(request.body).get("grant_type") or "(none)"
        if grant_type is None:
            response = self.get_response(request)
        else:
            with token_requests:
                response = self.get_response(request)
        group = _path_group(request.path)
        with _lock:
            if group != "peer":
                _paths[f"{group} {response.status_code}"] += 1
            if grant_type is not None:
                _grants[grant_type] += 1
                if response.status_code >= 400:
                    error = _error_code(response)
                    _errors[error] += 1
                    _grant_errors[f"{grant_type} {error}"] += 1
        return response


def _error_code(response: HttpResponse) -> str:
    try:
        body = json.loads(response.content)
    except (ValueError, AttributeError):
        return f"(status {response.status_code})"
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return str(body["error"])
    return f"(status {response.status_code})"


@csrf_exempt
def revoke_refresh_tokens_view(request: HttpRequest) -> HttpResponse:
    """POST: delete every refresh token (their access tokens stay valid until they expire),
    between two token requests; answers how many were deleted."""
    if request.method != "POST":
        return HttpResponse(status=405)
    from oauth2_provider.models import get_refresh_token_model

    with token_requests:
        deleted, _ = get_refresh_token_model().objects.all().delete()
    return JsonResponse({"deleted": deleted})


@csrf_exempt
def counts_view(request: HttpRequest) -> HttpResponse:
    """GET: the counts; DELETE: reset them."""
    if request.method == "DELETE":
        reset()
        return HttpResponse(status=204)
    return JsonResponse(snapshot())
