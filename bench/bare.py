"""The floor: a bare trio server on a Unix socket that reads each framed msgpack request,
decodes it, and answers with a canned reply of the same size as vm-tokend's.

No peer check, no limits, no dispatch, no keeper: whatever vm-tokend costs beyond this is
its own. Run as `python -m bench.bare SOCKET REPLY_HEX`.
"""

from __future__ import annotations

import socket
import sys

import msgpack
import trio

RECEIVE = 65536


async def _serve_one(stream: trio.SocketStream, reply: bytes) -> None:
    buffer = bytearray()
    try:
        while True:
            while len(buffer) < 4:
                data = await stream.receive_some(RECEIVE)
                if not data:
                    return
                buffer += data
            end = 4 + int.from_bytes(buffer[:4], "big")
            while len(buffer) < end:
                data = await stream.receive_some(RECEIVE)
                if not data:
                    return
                buffer += data
            msgpack.unpackb(bytes(buffer[4:end]), raw=False)
            del buffer[:end]
            await stream.send_all(reply)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return
    finally:
        await stream.aclose()


async def serve(path: str, reply: bytes) -> None:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(path)
    sock.listen(512)
    listener = trio.SocketListener(sock)

    async def handler(stream: trio.SocketStream) -> None:
        await _serve_one(stream, reply)

    print("ready", flush=True)
    await trio.serve_listeners(handler, [listener])


def main() -> None:
    trio.run(serve, sys.argv[1], bytes.fromhex(sys.argv[2]))


if __name__ == "__main__":
    main()
