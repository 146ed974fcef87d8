"""The peer's own views: WebFinger as the vendor answers it, and the API's stand-in.

`/v1/vms` and `/v1/vms/<id>/videos` play the VideoManager Pro API as a resource server that
accepts django-oauth-toolkit's access tokens: tests prove with them that the tokens a client
was handed are the ones the server accepts.
"""

from __future__ import annotations

import json
from typing import Any

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import reverse
from oauth2_provider.oauth2_backends import get_oauthlib_core
from oauth2_provider.views import ConnectDiscoveryInfoView

ISSUER_REL = "http://openid.net/specs/connect/1.0/issuer"
REALM = "oidc-peer"

# Every user of the peer sees the same three VideoManagers.
VIDEOMANAGERS = [
    {"id": "1001", "name": "Marketing"},
    {"id": "1002", "name": "Sales"},
    {"id": "1003", "name": "Support"},
]


def _origin(request: HttpRequest) -> str:
    return request.build_absolute_uri("/").rstrip("/")


def webfinger(request: HttpRequest) -> HttpResponse:
    """The JRD the vendor serves for its API root (issue 10, "Facts").

    Only the API root ``{origin}/v1/`` (with its trailing slash) is known, as a strict server
    would answer: anything else is 404, a missing ``resource`` 400.
    """
    resource = request.GET.get("resource")
    if not resource:
        return JsonResponse({"message": "resource is required"}, status=400)
    subject = f"{_origin(request)}/v1/"
    if resource != subject:
        return JsonResponse({"message": "unknown resource"}, status=404)
    # DOT serves its discovery document at .../.well-known/openid-configuration (without a
    # trailing slash; it also answers with one, a deprecated form): the href is the document,
    # as the vendor's is, not the issuer.
    discovery = request.build_absolute_uri(reverse("oauth2_provider:oidc-connect-discovery-info"))
    jrd = {
        "subject": subject,
        "properties": {
            f"{subject}keycloak/realm": REALM,
            f"{subject}keycloak/auth-server-url": f"{_origin(request)}/o/",
        },
        "links": [{"rel": ISSUER_REL, "href": discovery}],
    }
    response = JsonResponse(jrd, content_type="application/jrd+json")
    response["Cache-Control"] = f"max-age={settings.WEBFINGER_MAX_AGE}"
    response["Access-Control-Allow-Origin"] = "*"
    return response


class DiscoveryView(ConnectDiscoveryInfoView):
    """DOT's own discovery document, plus the device endpoint DOT serves but does not list.

    django-oauth-toolkit 3.4 implements RFC 8628 (``/o/device-authorization/``) yet neither
    its OIDC discovery document nor its RFC 8414 metadata names it; Keycloak lists it as
    ``device_authorization_endpoint``. Off with ``OIDC_PEER_ADVERTISE_DEVICE=0``.
    """

    def get(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        response = super().get(request, *args, **kwargs)
        if settings.ADVERTISE_DEVICE and response.status_code == 200:
            data = json.loads(response.content)
            data["device_authorization_endpoint"] = request.build_absolute_uri(
                reverse("oauth2_provider:device-authorization"))
            response.content = json.dumps(data).encode()
            response["Content-Length"] = str(len(response.content))
        return response


def _unauthorized(message: str) -> JsonResponse:
    response = JsonResponse({"message": message}, status=401)
    response["WWW-Authenticate"] = 'Bearer error="invalid_token"'
    return response


def _bearer_user(request: HttpRequest) -> Any:
    """The user of a valid DOT access token in the Authorization header, or None."""
    if not request.headers.get("Authorization", "").startswith("Bearer "):
        return None
    valid, oauth_request = get_oauthlib_core().verify_request(request, scopes=[])
    if not valid or oauth_request is None:
        return None
    return oauth_request.user


def vms(request: HttpRequest) -> HttpResponse:
    """``GET /v1/vms``: the user's VideoManagers."""
    if request.method != "GET":
        return JsonResponse({"message": "method not allowed"}, status=405)
    if _bearer_user(request) is None:
        return _unauthorized("Unauthorized: a valid access token is required")
    return JsonResponse(VIDEOMANAGERS, safe=False)


def videos(request: HttpRequest, vm_id: str) -> HttpResponse:
    """``GET /v1/vms/<id>/videos``: one made-up video per VideoManager of the user."""
    if request.method != "GET":
        return JsonResponse({"message": "method not allowed"}, status=405)
    user = _bearer_user(request)
    if user is None:
        return _unauthorized("Unauthorized: a valid access token is required")
    if vm_id not in {vm["id"] for vm in VIDEOMANAGERS}:
        return JsonResponse({"message": f"Access denied to VideoManager {vm_id}"}, status=403)
    video = {"id": f"video-{vm_id}-1", "title": f"Welcome to VideoManager {vm_id}"}
    return JsonResponse({"total": 1, "videos": [video], "user": user.get_username()})


@login_required
def profile(request: HttpRequest) -> HttpResponse:
    """Where a plain login (no ``next``) lands: says who is logged in."""
    return HttpResponse(f"<!DOCTYPE html><title>Logged in</title>"
                        f"<p id=\"user\">Logged in as {request.user.get_username()}</p>")
