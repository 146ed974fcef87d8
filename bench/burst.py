"""1,000 clients at once, each connecting and asking for one token: all must be served."""

from __future__ import annotations

from pathlib import Path

import trio

from vm_token import _minipack, protocol

CLIENTS = 1000


async def _one(path: Path, frame: bytes, latencies: list[float], failures: list[str]) -> None:
    started = trio.current_time()
    try:
        with trio.fail_after(30):
            stream = await trio.open_unix_socket(str(path))
            async with stream:
                await stream.send_all(frame)
                buffer = b""
                while len(buffer) < 4 or len(buffer) < 4 + int.from_bytes(buffer[:4], "big"):
                    data = await stream.receive_some()
                    if not data:
                        raise ConnectionError("closed without a reply")
                    buffer += data
        reply = _minipack.unpackb(buffer[4:])
        if reply.get("ok") is not True or not reply.get("token"):
            raise ValueError(f"not a token: {reply.get('error')}")
    except (OSError, ValueError, trio.TooSlowError, trio.BrokenResourceError) as exc:
        failures.append(f"{type(exc).__name__}: {exc}")
        return
    latencies.append(trio.current_time() - started)


async def _burst(path: Path, clients: int) -> tuple[list[float], list[str]]:
    frame = protocol.encode_frame({"v": protocol.PROTOCOL_VERSION, "op": protocol.GET})
    latencies: list[float] = []
    failures: list[str] = []
    async with trio.open_nursery() as nursery:
        for _ in range(clients):
            nursery.start_soon(_one, path, frame, latencies, failures)
    return latencies, failures


def burst(path: Path, clients: int = CLIENTS) -> dict[str, float]:
    latencies, failures = trio.run(_burst, path, clients)
    latencies.sort()
    return {
        "served": len(latencies),
        "failed": len(failures),
        "p50": latencies[len(latencies) // 2] if latencies else float("nan"),
        "p99": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
        if latencies else float("nan"),
    }
