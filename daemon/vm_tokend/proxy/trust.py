"""What the proxy trusts for an API origin: what the daemon trusts for it."""

from __future__ import annotations

import ssl
from pathlib import Path

from ..config.settings import ConfigError, load_config
from .routes import Refusal, Upstream

__all__ = ["tls_context"]


def tls_context(origin: str, flags: dict[str, object]) -> ssl.SSLContext | None:
    """What the proxy trusts for an API origin (read when it first goes there): what the
    daemon trusts for it, the `ca_bundle` of the profiles with that API, or the system's
    CAs when none names one. Certificates are always verified. Fails closed: when the
    configuration, or a bundle a profile of that API names, cannot be read, the system's
    CAs are not trusted instead (a bundle is often there to trust *fewer*: a private CA)
    — Refusal, the proxy's own 502, and nothing is sent."""
    if not origin.startswith("https:"):
        return None  # plain http (loopback only): nothing to trust
    try:
        settings, profiles = load_config(flags, strict=False)
    except ConfigError as exc:
        raise Refusal(502, "upstream_unavailable", f"cannot tell which CAs to trust for "
                      f"{origin}, so nothing was sent: {exc}") from None
    bundles = {str(profile.ca_bundle) for profile in profiles.valid.values()
               if profile.ca_bundle is not None
               and Upstream.from_api_url(profile.api_url).origin == origin}
    # a profile that fails validation (its ca_bundle was removed, say) may still be served
    # by a daemon that read it before: its bundle counts, read or refused like the others
    for name in profiles.errors:
        table = settings.profiles.get(name)
        if not isinstance(table, dict):
            continue
        api_url, bundle = table.get("api_url", settings.api_url), \
            table.get("ca_bundle", settings.ca_bundle)
        try:
            same = isinstance(api_url, str) and \
                Upstream.from_api_url(api_url.strip()).origin == origin
        except ValueError:  # not even a URL: no API the daemon could be serving
            same = False
        if same and bundle is not None:
            bundles.add(str(Path(str(bundle)).expanduser()))
    context: ssl.SSLContext | None = None  # None: no bundle, the system's CAs
    for bundle in sorted(bundles):  # profiles on one API may name different bundles
        try:
            if context is None:
                context = ssl.create_default_context(cafile=bundle)
            else:
                context.load_verify_locations(cafile=bundle)
        except (OSError, ssl.SSLError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror \
                else type(exc).__name__
            raise Refusal(502, "upstream_unavailable", f"cannot read the CA bundle {bundle} "
                          f"({reason}) that a profile names for {origin}; nothing was sent, "
                          "and the system's CAs are not trusted instead") from None
    return context
