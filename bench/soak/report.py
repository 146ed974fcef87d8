"""The soak's summary: one Markdown table of what was served, injected and called, and one
of the processes' resources first and last; and the check that those stayed flat."""

from __future__ import annotations

from collections import Counter

import vm_token
from bench.soak.clients import KINDS
from bench.soak.ledger import Ledger
from bench.soak.world import Sample, World

__all__ = ["check_flat", "progress", "table", "upstream_calls"]

# How much a resource may move between the first sample (after a minute of warm-up) and
# the last and still count as flat. Memory: the allocator's arenas settle over minutes;
# a leak of even 100 bytes per request would pass 10 % within the default run (~15,000
# requests, 1.5 MB). fds and tasks: what a connection or a VideoManager kept at the
# moment of the sample can add (three VideoManagers per profile change every 150 s).
RSS_GROWTH = 0.10
FDS_GROWTH = 4
TASKS_GROWTH = 6
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


def check_flat(samples: list[Sample], ledger: Ledger) -> None:
    if len(samples) < 2:
        return
    first, last = samples[0], samples[-1]
    for name in first.rss_kib:
        if last.rss_kib[name] > first.rss_kib[name] * (1 + RSS_GROWTH):
            ledger.violate("flat", f"{name} RSS {first.rss_kib[name]} -> "
                           f"{last.rss_kib[name]} KiB")
        if last.fds[name] > first.fds[name] + FDS_GROWTH:
            ledger.violate("flat", f"{name} fds {first.fds[name]} -> {last.fds[name]}")
        if last.tasks[name] > first.tasks[name] + TASKS_GROWTH:
            ledger.violate("flat", f"{name} tasks {first.tasks[name]} -> {last.tasks[name]}")


def progress(sample: Sample, minutes: float, ledger: Ledger, injected: Counter[str]) -> str:
    served = sum(n for (_, code), n in ledger.outcomes.items() if code == "ok")
    rss = ", ".join(f"{name} {kib / 1024:.1f} MiB" for name, kib in sample.rss_kib.items())
    broken = sum(ledger.broken.values())
    return (f"soak: minute {sample.minute:g}/{minutes:g}: {served:,} served, "
            f"{sum(injected.values())} faults, RSS {rss}, "
            f"{'no invariant broken' if not broken else f'{broken} BROKEN'}")


def table(minutes: float, seed: int, world: World, ledger: Ledger, injected: Counter[str],
          samples: list[Sample], calls: dict[str, int]) -> str:
    lines = [f"### `make soak`: {minutes:g} minutes, seed {seed}", "",
             "| | served | errors, by code |", "|---|---:|---|"]
    for kind, count in KINDS:
        served = ledger.outcomes[kind, "ok"]
        errors = ", ".join(f"{code} {n:,}" for (k, code), n in sorted(ledger.outcomes.items())
                           if k == kind and code != "ok") or "none"
        lines.append(f"| {NAMES[kind]} ×{count} | {served:,} | {errors} |")
    total = sum(n for (_, code), n in ledger.outcomes.items() if code == "ok")
    lines.append(f"| **all** | **{total:,}** | |")
    lines += ["", "| | |", "|---|---|",
              f"| tokens tried against the API | {ledger.tokens_checked:,}, of which "
              f"{ledger.revoked_unreported:,} refused: revoked before anyone reported them |",
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
               f"calls-per-window ({ledger.calm_checked} calm stretches), never-a-dead-token, "
               "min-ttl, expires-at, served-once-healthy, right-videomanager, alive, flat")
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
    return "\n".join(lines)


def _answers(world: World) -> str:
    total: Counter[str] = Counter()
    for switch in world.switches.values():
        total.update(switch.answers)
    return ", ".join(f"{kind} {n:,}" for kind, n in sorted(total.items())) or "none"
