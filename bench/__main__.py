"""`make bench`: run every benchmark against the stand-in and print the results."""

from __future__ import annotations

import os
import platform
import sys

from bench import harness, startup


def main() -> int:
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}, {platform.platform()}")
    with harness.daemon() as running:
        print(f"\n== start-up, medians of {startup.RUNS} interleaved runs")
        lines, met = startup.report(startup.measure(running))
        print("\n".join(lines))
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
