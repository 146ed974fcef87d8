"""What the proxy trusts for an API: what the daemon trusts for it.

The daemon's `get` answers, with each token, the API it is for and the CA bundle that
API's certificate is checked against (the profile's `ca_bundle`, from whichever source
the daemon read it: file, environment, flags). The proxy checks the same way, never by
its own reading of the configuration, which may differ from the daemon's.
"""

from __future__ import annotations

import ssl

from .routes import Refusal

__all__ = ["tls_context"]


def tls_context(origin: str, ca_bundle: str | None) -> ssl.SSLContext | None:
    """The TLS context for `origin` (None for plain http): the system's CAs, or only
    those of `ca_bundle`. Certificates are always verified. Fails closed: a bundle that
    cannot be read is a Refusal (the proxy's own 502, nothing sent), never the system's
    CAs instead — a bundle is often there to trust *fewer* (a private CA)."""
    if not origin.startswith("https:"):
        return None  # plain http (loopback only): nothing to trust
    try:
        return ssl.create_default_context(cafile=ca_bundle) if ca_bundle is not None \
            else ssl.create_default_context()
    except (OSError, ssl.SSLError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror \
            else type(exc).__name__
        raise Refusal(502, "upstream_unavailable",
                      f"cannot read the CA bundle {ca_bundle} ({reason}) that the profile "
                      f"names for {origin}; nothing was sent, and the system's CAs are not "
                      "trusted instead") from None
