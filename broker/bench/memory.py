"""The memory scenario: what the daemon's memory backend holds per channel and per
group membership, read from its RSS while it holds many of each.

Full size is 1,000,000 channels, each with one waiting message of about 130 bytes (a
normal channel: nobody receives), and 10,000,000 memberships (each channel in 10
groups of 1,000). ``--memory-scale`` takes a fraction of both. The connections that
made the memberships stay open while RSS is read, as a site's consumers do: so the cost
per membership includes the daemon's count of each connection's memberships (for
``--max-memberships``) as well as the backend's entry.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence

from .errors import BenchError, NotApplicable
from .harness import Row, message, open_layers
from .layers import ChannelLayer, LayerFactory, LayerSpec, Opened, Settings
from .progress import progress
from .usage import rss_bytes

__all__ = ["MEMORY_ROWS", "memory_footprint", "memory_sizes"]

MEMORY_CHANNELS = 1_000_000
MEMBERSHIPS_PER_CHANNEL = 10
GROUP_MEMBERS = 1_000
#: Connections filling the daemon at once, and calls in flight on each: filling is not
#: what is measured, so it is pipelined.
WRITERS = 4
WRITE_WINDOW = 256
#: The daemon's default --max-expiry: the full size fills for longer than the bench's 60 s.
MESSAGE_EXPIRY_S = 86_400
#: Channels received from at the end, to check that their messages are the ones sent.
CHECKED_CHANNELS = 100

MEMORY_ROWS = (
    Row("memory: daemon RSS holding it all", "MiB", False),
    Row("memory: per channel with a waiting message", "bytes", False),
    Row("memory: per group membership", "bytes", False),
)

Call = Callable[[ChannelLayer, int], Awaitable[None]]


def memory_sizes(memory_scale: float) -> dict[str, int]:
    channels = max(1000, round(MEMORY_CHANNELS * memory_scale))
    return {"memory_channels": channels, "memory_memberships": channels * MEMBERSHIPS_PER_CHANNEL}


def channel_name(index: int) -> str:
    return f"bench-memory.{index}"


async def fill(layers: Sequence[ChannelLayer], count: int, call: Call) -> None:
    """``call(layer, i)`` for every i below ``count``, spread over ``layers``."""

    async def write(layer: ChannelLayer, first: int) -> None:
        indices = range(first, count, len(layers))
        for start in range(0, len(indices), WRITE_WINDOW):
            window = indices[start : start + WRITE_WINDOW]
            await asyncio.gather(*(call(layer, i) for i in window))

    await asyncio.gather(*(write(layer, first) for first, layer in enumerate(layers)))


async def check_messages(layer: ChannelLayer, channels: int) -> None:
    for index in range(0, channels, max(1, channels // CHECKED_CHANNELS)):
        received = await asyncio.wait_for(layer.receive(channel_name(index)), 10)
        if received.get("i") != index:
            raise BenchError(f"{channel_name(index)} held message {received.get('i')!r}")


async def measure(factory: LayerFactory, pid: int, channels: int, memberships: int) -> list[float]:
    groups = max(MEMBERSHIPS_PER_CHANNEL, memberships // GROUP_MEMBERS)

    async def send(layer: ChannelLayer, i: int) -> None:
        await layer.send(channel_name(i), message(i))

    async def join(layer: ChannelLayer, m: int) -> None:
        channel = channel_name(m // MEMBERSHIPS_PER_CHANNEL)
        await layer.group_add(f"bench-memory-group.{m % groups}", channel)

    async with open_layers(lasting(factory), WRITERS) as layers:
        empty = rss_bytes(pid) or 0
        started = time.monotonic()
        await fill(layers, channels, send)
        with_channels, sent = rss_bytes(pid) or 0, time.monotonic()
        await fill(layers, memberships, join)
        with_groups, joined = rss_bytes(pid) or 0, time.monotonic()
        await check_messages(layers[0], channels)
    progress(
        f"  memory: {channels:,} sends in {sent - started:.0f} s,"
        f" {memberships:,} group_adds in {joined - sent:.0f} s"
    )
    per_channel = (with_channels - empty) / channels
    return [with_groups / 2**20, per_channel, (with_groups - with_channels) / memberships]


def lasting(factory: LayerFactory) -> LayerFactory:
    """Layers whose messages outlive the filling, which takes minutes at full size."""
    if not isinstance(factory, LayerSpec):
        return factory
    return LayerSpec(factory.path, {**factory.kwargs, "expiry": MESSAGE_EXPIRY_S})


def memory_footprint(opened: Opened, settings: Settings) -> list[float]:
    """Daemon RSS holding it all (MiB), bytes per channel, bytes per membership; on a
    daemon started for it, like the target's."""
    if opened.fresh_memory_daemon is None:
        raise NotApplicable("measures a daemon the bench starts on memory://")
    sizes = memory_sizes(settings.memory_scale)
    with opened.fresh_memory_daemon() as fresh:
        if fresh.server_pid is None:
            raise NotApplicable("the daemon's process cannot be read")
        counts = sizes["memory_channels"], sizes["memory_memberships"]
        return asyncio.run(measure(fresh.factory, fresh.server_pid, *counts))
