"""The scenarios: what each one does to a layer, what it measures, and at which sizes."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from .big_room import ROOM_ROWS, big_room
from .errors import BenchError
from .harness import (
    SCENARIO_TIMEOUT_S,
    SEND_WINDOW,
    Row,
    Tally,
    drain,
    in_new_loop,
    message,
    open_layers,
    percentile,
    running,
    scaled,
    send_each,
    send_windowed,
    wait_done,
    warm_up,
)
from .layers import ChannelLayer, LayerFactory, Opened, Settings, close_layer
from .memory import MEMORY_ROWS, memory_footprint, memory_sizes
from .sync_native import sync_native_group_send

__all__ = ["SCENARIOS", "Row", "Scenario", "sizes"]

Send = Callable[[ChannelLayer, str, int], Coroutine[Any, Any, None]]

PING_PONG_EXCHANGES = 2000
#: channels-nats subscribes a plain channel on its first receive and drops what is
#: published before: the workers' pulls get this long to reach their layer.
PULL_SETTLE_S = 0.5
#: Warm-up round trips are not timed: they pay for connecting and the first allocations.
PING_PONG_WARMUP = 200
#: Sized so channels_redis (~1,000 Redis commands/s from one process) keeps the run < 2 min.
STREAM_MESSAGES = 5000
WORKER_MESSAGES = 5000
WORKER_COUNT = 4
FANOUT_MEMBERS = 200
FANOUT_INSTANCES = 4
FANOUT_SENDS = 100
SYNC_CALLS = 300
WORK_CHANNEL = "bench-work"
FANOUT_GROUP = "bench-fanout"
SYNC_GROUP = "bench-sync"


@dataclass(frozen=True, slots=True)
class Scenario:
    """A named measurement; ``run(opened, settings)`` returns one value per row."""

    name: str
    rows: tuple[Row, ...]
    run: Callable[[Opened, Settings], list[float]]


async def echo(layer: ChannelLayer, own: str, peer: str) -> None:
    while True:
        await layer.send(peer, await layer.receive(own))


async def round_trip(layer: ChannelLayer, own: str, peer: str, index: int) -> int:
    started = time.perf_counter_ns()
    await layer.send(peer, message(index))
    reply = await layer.receive(own)
    elapsed_ns = time.perf_counter_ns() - started
    if reply.get("i") != index:
        raise BenchError(f"round trip {index} got the reply to {reply.get('i')!r}")
    return elapsed_ns


async def ping_pong(factory: LayerFactory, scale: float) -> list[float]:
    """A sends to B's channel, B echoes to A's; p50 and p99 round trip in microseconds."""
    warmup, exchanges = scaled(PING_PONG_WARMUP, scale), scaled(PING_PONG_EXCHANGES, scale)
    async with open_layers(factory, 2) as (a, b):
        a_channel, b_channel = await a.new_channel(), await b.new_channel()
        async with running([echo(b, b_channel, a_channel)]):
            rtts_ns = [
                await round_trip(a, a_channel, b_channel, i) for i in range(warmup + exchanges)
            ]
    timed = sorted(rtts_ns[warmup:])
    return [percentile(timed, 0.50) / 1000, percentile(timed, 0.99) / 1000]


def stream(send: Send) -> Callable[[LayerFactory, float], Coroutine[Any, Any, list[float]]]:
    """One producer to one consumer's process-specific channel, sending with ``send``; msgs/s."""

    async def run(factory: LayerFactory, scale: float) -> list[float]:
        count = scaled(STREAM_MESSAGES, scale)
        async with open_layers(factory, 2) as (producer, consumer):
            channel = await consumer.new_channel()
            tally = Tally(count)
            await warm_up([producer], SEND_WINDOW)
            async with running([drain(consumer, channel, tally)]) as tasks:
                started = time.perf_counter()
                await send(producer, channel, count)
                await wait_done(tally, tasks)
        return tally.rate(started)

    return run


async def workers(factory: LayerFactory, scale: float) -> list[float]:
    """One producer, each send awaited, to a normal channel pulled by several workers;
    msgs/s, each once."""
    count = scaled(WORKER_MESSAGES, scale)
    async with open_layers(factory, WORKER_COUNT + 1) as (producer, *pullers):
        tally = Tally(count)
        async with running(drain(layer, WORK_CHANNEL, tally) for layer in pullers) as tasks:
            await asyncio.sleep(PULL_SETTLE_S)
            started = time.perf_counter()
            await send_each(producer, WORK_CHANNEL, count)
            await wait_done(tally, tasks)
    return tally.rate(started)


async def fan_out(factory: LayerFactory, scale: float) -> list[float]:
    """group_sends to a group spread over several instances; deliveries/s."""
    sends = scaled(FANOUT_SENDS, scale)
    per_instance = FANOUT_MEMBERS // FANOUT_INSTANCES
    async with open_layers(factory, FANOUT_INSTANCES + 1) as (sender, *hosts):
        members = [
            (layer, await layer.new_channel()) for layer in hosts for _ in range(per_instance)
        ]
        for layer, channel in members:
            await layer.group_add(FANOUT_GROUP, channel)
        await prime(sender, members)
        tally = Tally(len(members) * sends)
        # Member j's k-th message is delivery j * sends + k, so each is counted exactly once.
        loops = (drain(layer, ch, tally, j * sends) for j, (layer, ch) in enumerate(members))
        async with running(loops) as tasks:
            started = time.perf_counter()
            for k in range(sends):
                await sender.group_send(FANOUT_GROUP, message(k))
            await wait_done(tally, tasks)
        for layer, channel in members:
            await layer.group_discard(FANOUT_GROUP, channel)
    return tally.rate(started)


async def prime(sender: ChannelLayer, members: Sequence[tuple[ChannelLayer, str]]) -> None:
    """One untimed group_send every member receives: consumers already past their first
    receive, as on a live site. channels_postgres drops what reaches a channel before
    that channel's first receive in a process (it claims the channel then)."""
    receives = [asyncio.create_task(layer.receive(channel)) for layer, channel in members]
    await asyncio.sleep(0.5)  # let every receive reach its layer before the send
    await sender.group_send(FANOUT_GROUP, {"type": "bench.prime"})
    async with asyncio.timeout(SCENARIO_TIMEOUT_S):
        await asyncio.gather(*receives)


def sync_calls(factory: LayerFactory, calls: int) -> float:
    """Seconds for ``calls`` async_to_sync(group_send) calls, each on a loop of its own."""
    from asgiref.sync import async_to_sync

    layer = factory()
    started = time.perf_counter()
    for _ in range(calls):
        async_to_sync(layer.group_send)(SYNC_GROUP, {"type": "x"})
    elapsed_s = time.perf_counter() - started
    async_to_sync(close_layer)(layer)
    return elapsed_s


def sync_group_send(opened: Opened, settings: Settings) -> list[float]:
    """group_send from a plain thread with no event loop, as a Celery task or view does."""
    factory, calls = opened.factory, scaled(SYNC_CALLS, settings.scale)
    outcome: list[float | BaseException] = []

    def call() -> None:
        try:
            outcome.append(sync_calls(factory, calls))
        except BaseException as exc:  # handed to the caller's thread below
            outcome.append(exc)

    thread = threading.Thread(target=call, name="bench-sync", daemon=True)
    thread.start()
    thread.join(SCENARIO_TIMEOUT_S)
    if not outcome:
        raise BenchError(f"not done after {SCENARIO_TIMEOUT_S:.0f} s")
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return [calls / outcome[0]]


SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        "ping-pong",
        (Row("ping-pong p50", "us", False), Row("ping-pong p99", "us", False)),
        in_new_loop(ping_pong),
    ),
    Scenario("stream", (Row("stream", "msg/s", True),), in_new_loop(stream(send_each))),
    Scenario("workers", (Row(f"workers x{WORKER_COUNT}", "msg/s", True),), in_new_loop(workers)),
    Scenario(
        "fan-out", (Row(f"fan-out x{FANOUT_MEMBERS}", "deliveries/s", True),), in_new_loop(fan_out)
    ),
    Scenario("sync", (Row("sync group_send", "calls/s", True),), sync_group_send),
    Scenario(
        "stream-windowed",
        (
            Row(
                f"stream windowed x{SEND_WINDOW} (pipelined, not application-like)",
                "msg/s",
                True,
            ),
        ),
        in_new_loop(stream(send_windowed)),
    ),
    Scenario("big-room", ROOM_ROWS, big_room),
    Scenario("memory", MEMORY_ROWS, memory_footprint),
    Scenario(
        "sync-native",
        (Row("broker.layer.sync group_send", "calls/s", True),),
        sync_native_group_send,
    ),
)


def sizes(settings: Settings) -> dict[str, int]:
    """The message and call counts the scenarios use, as the report shows them."""
    scale = settings.scale
    return {
        "ping_pong_exchanges": scaled(PING_PONG_EXCHANGES, scale),
        "ping_pong_warmup": scaled(PING_PONG_WARMUP, scale),
        "stream_messages": scaled(STREAM_MESSAGES, scale),
        "worker_messages": scaled(WORKER_MESSAGES, scale),
        "fanout_group_sends": scaled(FANOUT_SENDS, scale),
        "sync_calls": scaled(SYNC_CALLS, scale),
        "big_room_channels": settings.room_channels,
        "big_room_processes": settings.room_processes,
        "big_room_group_sends": settings.room_sends,
        **memory_sizes(settings.memory_scale),
    }
