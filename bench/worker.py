"""One client process of the throughput benchmark: `python -m bench.worker SOCKET START S`.

Waits until START (Unix time) so that all workers begin together, asks for tokens for S
seconds, and prints JSON: its rate and every call's latency.
"""

from __future__ import annotations

import json
import sys
import time

import vm_token


def main() -> None:
    socket, start_at, seconds = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
    latencies = []
    with vm_token.Client(socket) as client:
        client.get_token()
        time.sleep(max(0.0, start_at - time.time()))
        started = time.perf_counter()
        deadline = started + seconds
        now = started
        while now < deadline:
            client.get_token()
            after = time.perf_counter()
            latencies.append(after - now)
            now = after
        elapsed = now - started
    print(json.dumps({"rate": len(latencies) / elapsed, "latencies": latencies}))


if __name__ == "__main__":
    main()
