"""The invariants the soak checks at the end, from the stand-ins' own request logs and the
processes' logs: what no single client could see."""

from __future__ import annotations

import math
from pathlib import Path

from bench.soak.faults import AUTH_GRANTS, FaultSwitch
from bench.soak.ledger import SLACK, Ledger
from bench.soak.world import ACCESS_LIFETIME, IDLE_TIMEOUT, MAX_BACKOFF, World

__all__ = ["check_after"]

LOGINS = frozenset({"login", "oidc_login"})
# A request already on its way when a 429 was answered may arrive just after it: the
# legacy login refreshes each VideoManager on its own; and the hold is timed in the
# soak's process, busy with 30 clients. Short enough that a retry at once would not pass.
IN_FLIGHT = 0.5
# A run this long has calm stretches for each profile (the storm moves every 150 s); a
# shorter one may not, and then calls-per-window is reported as not checked.
CALM_NEEDED_FROM = 6 * 60.0
# The shortest refresh interval the daemon plans: 2/3 of the lifetime less its 5 % jitter.
REFRESH_EVERY = ACCESS_LIFETIME * (2 / 3 - 0.05)


def check_after(world: World, ledger: Ledger, warm_until: float, ended: float) -> None:
    long_run = ended - warm_until >= CALM_NEEDED_FROM
    for name, profile in world.by_name.items():
        standin, switch = profile.standin, world.switches[name]
        reused = standin.counts["refresh_reused"]
        if reused:
            ledger.violate("refresh-token-reuse",
                           f"{name}: {reused} refresh token(s) sent a second time")
        _retry_after(name, switch, ledger)
        _no_timed_relogin(name, standin.requests, ledger)
        _calls_per_window(world, name, ledger, warm_until, ended)
        if long_run and not ledger.calm_checked[name]:
            ledger.violate("calls-per-window", f"{name}: no calm stretch to count calls in")
    _no_secret_in_logs(world, ledger)


def _retry_after(name: str, switch: FaultSwitch, ledger: Ledger) -> None:
    requests = [t for t, what in switch.standin.requests if what in AUTH_GRANTS]
    for answered, seconds in switch.holds:
        early = [t for t in requests if answered + IN_FLIGHT < t < answered + seconds - 0.5]
        if early:
            ledger.violate("retry-after", f"{name}: a call {early[0] - answered:.1f} s "
                           f"after a Retry-After of {seconds} s")


def _no_timed_relogin(name: str, requests: list[tuple[float, str]], ledger: Ledger) -> None:
    """While a changed password is not yet in the daemon's settings, one login at most
    (the one that finds it rejected)."""
    for window in ledger.windows:
        if window.profile != name or window.kind != "password" or window.end is None:
            continue
        end = window.end
        tries = [t for t, what in requests if what in LOGINS and window.start < t < end]
        if len(tries) > 1:
            ledger.violate("no-timed-relogin",
                           f"{name}: {len(tries)} logins with a rejected password in "
                           f"{end - window.start:.0f} s")


def _calls_per_window(world: World, name: str, ledger: Ledger, warm_until: float,
                      ended: float) -> None:
    """In each stretch of at least 1.5 token lifetimes with no fault and no revocation,
    no more upstream calls than the refresh schedule needs: one per refresh interval per
    VideoManager kept (legacy) or for all (OpenID Connect), and one more each."""
    troubles = [(w.start, w.healthy_from(MAX_BACKOFF)) for w in ledger.windows
                if w.profile == name]  # from its start: a fault may make calls it answers
    troubles += [(t, t + ACCESS_LIFETIME + MAX_BACKOFF + SLACK)
                 for t, p, _ in ledger.events if p == name]  # tokens it killed are replaced
    calm, start = [], warm_until
    for begin, finish in sorted(troubles):
        if begin > start:
            calm.append((start, min(begin, ended)))
        start = max(start, finish)
    if start < ended:
        calm.append((start, ended))
    # every call the stand-in logs: grants, WebFinger, discovery, keys (not the OIDC
    # VideoManager list, which it serves as an API request)
    requests = [t for t, _ in world.by_name[name].standin.requests]
    for begin, finish in calm:
        length = finish - begin
        if length < 1.5 * ACCESS_LIFETIME:
            continue
        per_key = math.ceil(length / REFRESH_EVERY) + 1
        if name == "oidc":
            keys = 1
        else:  # the VideoManagers asked for in it, or kept from before it
            keys = sum(1 for (p, _), times in world.asks.items() if p == name and any(
                begin - IDLE_TIMEOUT - SLACK <= t <= finish for t in times))
        bound = keys * per_key + 1
        calls = sum(1 for t in requests if begin <= t < finish)
        ledger.calm_checked[name] += 1
        if calls > bound:
            ledger.violate("calls-per-window", f"{name}: {calls} upstream calls in "
                           f"{length:.0f} calm seconds, at most {bound} expected")


def _no_secret_in_logs(world: World, ledger: Ledger) -> None:
    text = "".join(Path(world.workdir, log).read_text(errors="replace")
                   for log in ("daemon.log", "proxy.log"))
    secrets = list(world.passwords)
    for profile in world.by_name.values():
        secrets += profile.standin.issued
    leaked = sum(1 for secret in secrets if secret in text)
    if leaked:
        ledger.violate("no-secret-in-logs", f"{leaked} token(s) or passwords in the logs")
