"""Another client of a daemon, as a process of its own: it PINGs the daemon every
``PING_EVERY_S`` until its stdin closes (``MIN_PINGS`` at least), then prints its slowest
round trip.

A process, not a thread of the test: the test's own work during an attack (encoding
100,000 frames, reading as many answers) holds the GIL, and a thread of it would time
that as the daemon's. ``python -m tests.broker.daemon.ping_probe HOST PORT`` prints
``ready`` once past HELLO, then ``{"slowest_s": ..., "pings": ...}`` at the end.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from protocol import FrameDecoder, Ping, Pong, Welcome, encode_frame
from tests.broker.raw_client import hello

#: Pause between two PINGs: fifty a second sample a stall of 50 ms.
PING_EVERY_S = 0.02
#: PINGs made at least, however soon stdin closes: a short attack is sampled too.
MIN_PINGS = 10


async def probe(host: str, port: int) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    decoder = FrameDecoder()

    async def next_frame() -> object:
        while (frame := decoder.next_frame()) is None:
            data = await reader.read(65536)
            if not data:
                raise ConnectionError("the daemon closed the probe's connection")
            decoder.receive_data(data)
        return frame

    writer.write(hello())
    assert isinstance(await next_frame(), Welcome)
    stdin_closed = asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    print("ready", flush=True)
    slowest, pings = 0.0, 0
    while not stdin_closed.done() or pings < MIN_PINGS:
        started = time.perf_counter()
        writer.write(encode_frame(Ping(pings + 1)))
        pong = await next_frame()
        slowest = max(slowest, time.perf_counter() - started)
        assert pong == Pong(pings + 1), pong
        pings += 1
        await asyncio.sleep(PING_EVERY_S)
    writer.close()
    print(json.dumps({"slowest_s": slowest, "pings": pings}), flush=True)


if __name__ == "__main__":
    asyncio.run(probe(sys.argv[1], int(sys.argv[2])))
