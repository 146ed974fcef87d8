"""The floor of a relay: a trio process on a Unix socket that opens a TCP connection to
the stand-in for each client and copies bytes both ways, 1 MiB per read and a 4 MiB send
buffer, as the proxy does, and nothing else: no HTTP, no token, no h11. Whatever
`vm-tokend proxy` costs beyond this is its own; this costs what any trio process in the
middle does (a read and a write of every byte, and a third process on two cores). Run as
`python -m bench.bare_relay SOCKET HOST PORT`.
"""

from __future__ import annotations

import socket
import sys

import trio

RECEIVE = 1 << 20  # as the proxy's reads
SNDBUF = 4 << 20  # as the proxy's send buffer towards a client (http11.STREAM_SNDBUF)


async def _copy(source: trio.abc.Stream, sink: trio.abc.Stream) -> None:
    try:
        while data := await source.receive_some(RECEIVE):
            await sink.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def _relay(client: trio.SocketStream, host: str, port: int) -> None:
    client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)
    async with client, await trio.open_tcp_stream(host, port) as api:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_copy, api, client)
            await _copy(client, api)


async def main(path: str, host: str, port: int) -> None:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(path)
    sock.listen(64)
    listener = trio.SocketListener(sock)
    async with trio.open_nursery() as nursery:
        while True:
            nursery.start_soon(_relay, await listener.accept(), host, port)


if __name__ == "__main__":
    trio.run(main, sys.argv[1], sys.argv[2], int(sys.argv[3]))
