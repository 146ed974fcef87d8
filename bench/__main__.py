"""`make bench`: every benchmark against the stand-in, one table, each figure next to the
limit it is compared with in the same run. Exits 1 if a target is missed.
"""

from __future__ import annotations

import os
import platform
import sys

from bench import (
    burst,
    coldstart,
    harness,
    idle,
    memory,
    profiles,
    proxy,
    roundtrip,
    startup,
    upstream_load,
)

Row = tuple[str, str, str, str, bool]


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:.0f} µs"


def main() -> int:
    harness.raise_fd_limit()
    rows: list[Row] = []
    with harness.daemon() as running:
        idle_rss = memory.idle_rss(running.process.pid)
        print("1/8 start-up ...", file=sys.stderr)
        times = startup.measure(running)
        base, ours = times["python -I -c pass"], times["vm-token token"]
        git = times.get("git credential-cache get")
        rows.append((
            "1. `vm-token token`, wall time (median of "
            f"{startup.RUNS} interleaved runs)",
            _ms(ours),
            f"`python -I -c pass` {_ms(base)}"
            + (f"; `git credential-cache get` {_ms(git)}" if git else ""),
            f"{ours / base:.2f} × interpreter (≤ {startup.TARGET})",
            ours / base <= startup.TARGET,
        ))
        print("2/8 library round trip ...", file=sys.stderr)
        reply = roundtrip.canned_reply(running.socket)
        with harness.bare_server(reply) as bare:
            single, floor = roundtrip.single_process(running.socket, bare)
            rows.append((
                "2. `Client.get_token()` calls/s, one process",
                f"{single:,.0f}/s", f"bare trio + msgpack server {floor:,.0f}/s",
                f"{single / floor:.2f} (≥ 0.8)", single / floor >= 0.8,
            ))
            print("2b/8 library against a raw client ...", file=sys.stderr)
            ours, raw, ratio = roundtrip.against_raw_client(running.socket)
            rows.append((
                "2b. `Client.get_token()` vs raw socket+msgpack client, same daemon",
                f"{ours:,.0f}/s", f"blocking `socket` + C msgpack {raw:,.0f}/s",
                f"{ratio:.2f} (≥ {roundtrip.RAW_FLOOR})", ratio >= roundtrip.RAW_FLOOR,
            ))
            print("2c/8 the same with three profiles configured ...", file=sys.stderr)
            compared = profiles.compare(running)
            slower = compared["time_three"] / compared["time_one"]
            rows.append((
                "1c. `vm-token token` with three profiles configured (median, interleaved)",
                _ms(compared["time_three"]), f"one profile {_ms(compared['time_one'])}",
                f"{slower:.2f} × (≤ {1 + profiles.NOISE:.2f}: no slower)",
                slower <= 1 + profiles.NOISE,
            ))
            kept = compared["rate_three"] / compared["rate_one"]
            rows.append((
                "2c. `Client.get_token()` calls/s with three profiles configured",
                f"{compared['rate_three']:,.0f}/s",
                f"one profile {compared['rate_one']:,.0f}/s",
                f"{kept:.2f} (≥ {1 - profiles.NOISE:.2f}: no slower)",
                kept >= 1 - profiles.NOISE,
            ))
            print("3/8 four client processes ...", file=sys.stderr)
            multi = roundtrip.multi_process(running.socket, bare)
            ratio = multi["ours"] / multi["floor"]
            rows.append((
                f"3. throughput, {roundtrip.WORKERS} client processes",
                f"{multi['ours']:,.0f}/s (p50 {_us(multi['p50'])}, "
                f"p99 {_us(multi['p99'])})",
                f"bare server {multi['floor']:,.0f}/s",
                f"{ratio:.2f} (≥ 0.7)", ratio >= 0.7,
            ))
            print("4/8 1,000 connections at once ...", file=sys.stderr)
            results, floors = [], []
            for _ in range(3):
                results.append(burst.burst(running.socket))
                floors.append(burst.burst(bare))
            worst = max(results, key=lambda r: r["p99"])
            floor_p99 = max(r["p99"] for r in floors)
            failed = sum(int(r["failed"]) for r in results)
            rows.append((
                f"4. {burst.CLIENTS:,} connections at once, one request each (worst of 3)",
                f"{int(worst['served'])} served, p50 {_ms(worst['p50'])}, "
                f"p99 {_ms(worst['p99'])}",
                f"bare server p99 {_ms(floor_p99)}",
                f"{failed} failed; p99 ≤ 100 ms",
                failed == 0 and worst["p99"] <= 0.1,
            ))
        print("4b/8 the API proxy ...", file=sys.stderr)
        with proxy.proxy(running) as (path, process):
            small = proxy.small_gets(running, path)
            ratio = small["proxied"] / small["direct"]
            rows.append((
                f"4b. small GETs, {proxy.CLIENTS} keep-alive clients, through `vm-tokend proxy`",
                f"{small['proxied']:,.0f}/s (p50 +{_us(small['added_p50'])})",
                f"straight to the stand-in with the header {small['direct']:,.0f}/s",
                f"{ratio:.2f} (≥ {proxy.SMALL_FLOOR})", ratio >= proxy.SMALL_FLOOR,
            ))
            bulk = proxy.bulk(running, path, process)
            up = bulk["up_direct"] / bulk["up_proxied"]
            down = bulk["down_direct"] / bulk["down_proxied"]
            rows.append((
                "4c. 1 GiB upload and download (curl) through the proxy",
                f"up {proxy.BULK / bulk['up_proxied'] / 2**20:,.0f} MiB/s, down "
                f"{proxy.BULK / bulk['down_proxied'] / 2**20:,.0f} MiB/s; proxy peak RSS "
                f"{bulk['peak_rss']:.0f} MiB",
                f"straight: up {proxy.BULK / bulk['up_direct'] / 2**20:,.0f} MiB/s, down "
                f"{proxy.BULK / bulk['down_direct'] / 2**20:,.0f} MiB/s; down through a "
                f"bare trio relay {proxy.BULK / bulk['down_bare'] / 2**20:,.0f} MiB/s "
                f"({bulk['down_direct'] / bulk['down_bare']:.2f} × straight)",
                f"{up:.2f} / {down:.2f} (≥ {proxy.BULK_FLOOR}); RSS ≤ {proxy.RSS_LIMIT:.0f}",
                min(up, down) >= proxy.BULK_FLOOR and bulk["peak_rss"] <= proxy.RSS_LIMIT,
            ))
        print("5/8 memory ...", file=sys.stderr)
        mem = memory.measure(running.process.pid, running.socket)
        growth = mem["end_rss"] - mem["half_rss"]
        rows.append((
            f"5. daemon memory: at idle after start → after all of the above and "
            f"{memory.REQUESTS:,} more requests",
            f"RSS {idle_rss:.1f} → {mem['end_rss']:.1f} MiB, "
            f"peak {mem['peak_rss']:.1f} MiB",
            f"growth over the second {memory.REQUESTS // 2:,}: {growth:+.2f} MiB",
            "≤ 60 MiB, flat (< 1 MiB growth)",
            mem["peak_rss"] <= 60 and growth < 1.0,
        ))
    print("6/8 cold start ...", file=sys.stderr)
    cold = coldstart.measure()
    rows.append((
        f"6. cold start to the first token (median of {coldstart.RUNS})",
        _ms(cold), "—", "≤ 1.5 s", cold <= 1.5,
    ))
    print("7/8 upstream load, one simulated hour ...", file=sys.stderr)
    for rate in (1, 1000):
        sim = upstream_load.simulate(rate)
        rows.append((
            f"7. upstream calls in one hour, {rate:,} requests/s, 3 VideoManagers, "
            "5-minute tokens",
            f"{sim['calls']} ({sim['per_videomanager']} per VideoManager at most)",
            f"a script logging in per run: {rate * 3600:,} (1 login per run)",
            "≤ 19 per VideoManager", sim["per_videomanager"] <= 19,
        ))
    for rate in (1, 1000):
        sim = upstream_load.simulate(rate, oidc=True)
        rows.append((
            f"7. OpenID Connect: token-endpoint calls in one hour, {rate:,} requests/s, "
            "3 VideoManagers, rotating refresh tokens",
            f"{sim['token_calls']} for all 3 (+ {sim['listings']} VideoManager list); "
            f"{sim['reused']} refresh tokens reused",
            f"a script logging in per run: {rate * 3600:,}",
            "≤ 19, none reused", sim["token_calls"] <= 19 and sim["reused"] == 0,
        ))

    print(f"8/8 wake-ups at rest, {idle.WINDOW:.0f} s ...", file=sys.stderr)
    woke = idle.measure()
    rows.append((
        "8. wake-ups per minute at rest, logged in (no watchdog; with systemd's 30 s "
        "watchdog)",
        f"{woke.quiet:.0f}/min; {woke.watchdog:.0f}/min for {woke.pings:.0f} pings and "
        f"{woke.other_messages:.0f} other messages",
        f"`ssh-agent -D` {woke.ssh_agent:.0f}/min" if woke.ssh_agent is not None
        else "ssh-agent (0/min) is not installed here",
        "≤ 2/min; with the watchdog, its 4 pings and nothing else",
        woke.quiet <= 2 and woke.watchdog <= woke.pings + 2 and woke.other_messages == 0,
    ))

    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}, {platform.platform()}\n")
    print("| benchmark | vm-token | compared with (same run) | ratio / target | met |")
    print("|---|---|---|---|---|")
    for what, value, limit, target, met in rows:
        print(f"| {what} | {value} | {limit} | {target} | {'yes' if met else '**NO**'} |")
    return 0 if all(row[4] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
