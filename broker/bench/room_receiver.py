"""One receiving process of the big room: its share of the room's channels, each in the
group, each timing every message from its send (in the message) to its receive.

Runs in a process of its own (``multiprocessing``, spawned), as a Daphne process would;
it talks to the bench over one pipe: "ready" once its members are in the group, then
its ``Received`` when every message arrived or the time is up.
"""

from __future__ import annotations

import asyncio
import time
from array import array
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from .errors import describe
from .layers import ChannelLayer, LayerSpec, close_layer

__all__ = ["ROOM_GROUP", "Received", "receive_room"]

ROOM_GROUP = "bench-room"
#: group_adds in flight at once while the room fills.
JOIN_WINDOW = 100


@dataclass(slots=True)
class Received:
    """What one process saw: latencies in seconds, and how the deliveries went."""

    expected: int
    latencies_s: array[float] = field(default_factory=lambda: array("d"))
    duplicates: int = 0
    #: ``time.monotonic()`` of the last delivery (the clock every process shares here).
    last_at: float = 0.0
    error: str | None = None


async def join(layer: ChannelLayer, count: int) -> list[str]:
    channels = [await layer.new_channel() for _ in range(count)]
    for start in range(0, count, JOIN_WINDOW):
        window = channels[start : start + JOIN_WINDOW]
        await asyncio.gather(*(layer.group_add(ROOM_GROUP, channel) for channel in window))
    return channels


async def listen(
    layer: ChannelLayer, channel: str, sends: int, received: Received, done: asyncio.Event
) -> None:
    seen = bytearray(sends)
    while True:
        message = await layer.receive(channel)
        now = time.monotonic()
        if seen[message["k"]]:
            received.duplicates += 1
            continue
        seen[message["k"]] = 1
        received.latencies_s.append(now - message["t"])
        received.last_at = now
        if len(received.latencies_s) == received.expected:
            done.set()


async def serve_room(
    spec: LayerSpec, count: int, sends: int, timeout_s: float, pipe: Connection
) -> Received:
    received = Received(count * sends)
    layer = spec()
    try:
        channels = await join(layer, count)
        done = asyncio.Event()
        tasks = [
            asyncio.create_task(listen(layer, channel, sends, received, done))
            for channel in channels
        ]
        pipe.send("ready")
        waiter = asyncio.create_task(done.wait())
        await asyncio.wait([waiter, *tasks], timeout=timeout_s, return_when="FIRST_COMPLETED")
        crashed = [task.exception() for task in tasks if task.done() and not task.cancelled()]
        if crashed and crashed[0] is not None:
            received.error = f"a receive failed: {describe(crashed[0])}"
        for task in [waiter, *tasks]:
            task.cancel()
        await asyncio.gather(waiter, *tasks, return_exceptions=True)
    finally:
        await close_layer(layer)
    return received


def receive_room(
    path: str, kwargs: dict[str, Any], count: int, sends: int, timeout_s: float, pipe: Connection
) -> None:
    """The process' main: join ``count`` channels to the room, receive, report."""
    try:
        received = asyncio.run(serve_room(LayerSpec(path, kwargs), count, sends, timeout_s, pipe))
    except Exception as exc:  # reported to the bench, which fails the scenario with it
        received = Received(count * sends, error=describe(exc))
    pipe.send(received)
    pipe.close()
