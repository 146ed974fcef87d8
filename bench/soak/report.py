"""The soak's summary: one Markdown table of what was served, injected and called, and one
of the processes' resources first and last; and the check that those stayed flat."""

from __future__ import annotations

import statistics
from collections import Counter

import vm_token
from bench.soak.clients import KINDS
from bench.soak.ledger import Ledger
from bench.soak.world import Sample, World

__all__ = ["check_flat", "progress", "table", "upstream_calls"]

# How much a resource may move between the start (the median of the first three samples,
# after a minute of warm-up) and the end (of the last three) and still count as flat.
# Memory: the allocator's arenas settle over minutes; a leak of 200 bytes per request
# would pass 5 % within the default run (~10,000 requests). Tasks and fds are judged net
# of the connections kept in pools, which come and go with the load: the daemon's clients
# (the library's, the proxy's pool of up to 32 per profile), the daemon's and the proxy's
# connections to the APIs. What is left is each process's own — slots, sessions,
# listeners — and may move by a VideoManager or two kept at the moment of the sample
# (three in use change every 150 s).
RSS_GROWTH = 0.05
OWN_GROWTH = 3
THREADS_GROWTH = 2
NAMES = {"token": "`vm-token token`", "library": "library (`Client.get_token`)",
         "git": "git's credential helper", "curl": "curl through the proxy",
         "node": "Node `http` through the proxy"}


def upstream_calls(world: World) -> dict[str, int]:
    """What the daemon says it called (`status`), before it stops."""
    try:
        with vm_token.Client(world.socket, timeout=10) as client:
            return {k: int(v) for k, v in client.status()["upstream_calls"].items()}
    except vm_token.Error:
        return {}


def own(sample: Sample) -> dict[str, dict[str, int]]:
    """What is judged flat: each process's resources net of its connections in pools."""
    return {"vm-tokend": {"RSS": sample.rss_kib["vm-tokend"],
                          "fds": (sample.fds["vm-tokend"] - sample.connections
                                  - sample.pooled["vm-tokend"]),
                          "tasks": sample.tasks["vm-tokend"] - sample.connections,
                          "threads": sample.threads["vm-tokend"]},
            "proxy": {"RSS": sample.rss_kib["proxy"],
                      "fds": sample.fds["proxy"] - sample.pooled["proxy"],
                      "tasks": sample.tasks["proxy"], "threads": sample.threads["proxy"]}}


def check_flat(samples: list[Sample], ledger: Ledger) -> None:
    if len(samples) < 2:
        return
    ends = 3 if len(samples) >= 6 else 1
    first = [own(sample) for sample in samples[:ends]]
    last = [own(sample) for sample in samples[-ends:]]
    for name in first[0]:
        for what, allowed in (("RSS", None), ("fds", OWN_GROWTH), ("tasks", OWN_GROWTH),
                              ("threads", THREADS_GROWTH)):
            a = statistics.median(s[name][what] for s in first)
            b = statistics.median(s[name][what] for s in last)
            limit = a * (1 + RSS_GROWTH) if allowed is None else a + allowed
            if b > limit:
                ledger.violate("flat", f"{name} {what} {a:g} -> {b:g} (at most {limit:g}; "
                               "fds and tasks net of the connections in pools)")


def progress(sample: Sample, minutes: float, ledger: Ledger, injected: Counter[str]) -> str:
    served = sum(n for (_, code), n in ledger.outcomes.items() if code == "ok")
    rss = ", ".join(f"{name} {kib / 1024:.1f} MiB" for name, kib in sample.rss_kib.items())
    broken = sum(ledger.broken.values())
    return (f"soak: minute {sample.minute:g}/{minutes:g}: {served:,} served, "
            f"{sum(injected.values())} faults, RSS {rss}, "
            f"{'no invariant broken' if not broken else f'{broken} BROKEN'}")


def table(minutes: float, seed: int, world: World, ledger: Ledger, injected: Counter[str],
          samples: list[Sample], calls: dict[str, int]) -> str:
    with ledger.lock:  # a client still busy past the run may yet write
        outcomes = Counter(ledger.outcomes)
    lines = [f"### `make soak`: {minutes:g} minutes, seed {seed}", "",
             "| | served | errors, by code |", "|---|---:|---|"]
    for kind, count in KINDS:
        served = outcomes[kind, "ok"]
        errors = ", ".join(f"{code} {n:,}" for (k, code), n in sorted(outcomes.items())
                           if k == kind and code != "ok") or "none"
        lines.append(f"| {NAMES[kind]} ×{count} | {served:,} | {errors} |")
    total = sum(n for (_, code), n in outcomes.items() if code == "ok")
    lines.append(f"| **all** | **{total:,}** | |")
    lines += ["", "| | |", "|---|---|",
              f"| tokens tried against the API | {ledger.tokens_checked:,}, of which "
              f"{ledger.revoked_unreported:,} refused: revoked before anyone reported them; "
              f"{ledger.expired_in_transit:,} expired between hand-out and the API |",
              "| faults injected | " + (", ".join(f"{kind} {n}" for kind, n in
                                                  sorted(injected.items())) or "none")
              + "; answers they made: " + _answers(world) + " |"]
    shown = ", ".join(f"{k} {v:,}" for k, v in sorted(calls.items())) or "none"
    lines.append(f"| upstream calls, as vm-tokend counts them | {shown} |")
    for name, profile in world.by_name.items():
        seen = Counter(what for _, what in profile.standin.requests)
        shown = ", ".join(f"{k} {v:,}" for k, v in sorted(seen.items()))
        lines.append(f"| requests its API saw, profile `{name}` | {shown} |")
    checked = ("no-secret-in-logs, refresh-token-reuse, retry-after, no-timed-relogin, "
               "calls-per-window (calm stretches counted: " + (", ".join(
                   f"{name} {ledger.calm_checked[name]}" for name in world.by_name)) +
               "), never-a-dead-token, "
               "min-ttl, expires-at (library answers), served-once-healthy, "
               "no-delay-when-healthy, right-videomanager, alive, flat")
    if ledger.broken:
        broken = "; ".join(f"**{name}** ×{n}: " + " / ".join(ledger.examples[name])
                           for name, n in ledger.broken.items())
        lines.append(f"| invariants | BROKEN: {broken} |")
    else:
        lines.append(f"| invariants | all held: {checked} |")
    if samples:
        first, last = samples[0], samples[-1]
        lines += ["", f"| sampled each minute, minute {first.minute:g} → {last.minute:g} "
                  "| vm-tokend | proxy |", "|---|---:|---:|"]
        for label, of in (("RSS (MiB)", "rss_kib"), ("open fds", "fds"),
                          ("trio tasks", "tasks"), ("threads", "threads")):
            cells = []
            for name in ("vm-tokend", "proxy"):
                a, b = getattr(first, of)[name], getattr(last, of)[name]
                cells.append(f"{a / 1024:.1f} → {b / 1024:.1f}" if of == "rss_kib"
                             else f"{a} → {b}")
            lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
        lines.append(f"| of the fds, connections kept in pools (to the daemon, to the "
                     f"APIs) | {first.connections + first.pooled['vm-tokend']} → "
                     f"{last.connections + last.pooled['vm-tokend']} | "
                     f"{first.pooled['proxy']} → {last.pooled['proxy']} |")
    return "\n".join(lines)


def _answers(world: World) -> str:
    total: Counter[str] = Counter()
    for switch in world.switches.values():
        total.update(switch.answers)
    return ", ".join(f"{kind} {n:,}" for kind, n in sorted(total.items())) or "none"
