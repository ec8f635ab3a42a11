"""Our CPU time per operation against a plain asyncio echo's per round trip, measured in
turns: the regression guard's numbers (tests/bench), quick enough for every test run.

CPU time, not wall time: on a machine shared with other work, waiting for a core
stretches every wake-up, and ours has more of them per operation than an echo has, so
wall-time ratios swing with the load (2x between runs here). CPU time counts the work
done, both sides of the socket (this process, and the daemon or the echo server read
by pid). Each ratio is the echo's CPU per round trip over ours per operation: above 1
would mean cheaper than one plain loopback round trip.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable

from .harness import Tally, drain, message, open_layers, running, wait_done
from .layers import LayerFactory
from .loopback import round_trips
from .usage import cpu_ns

__all__ = ["GUARD_RATIOS", "guard_ratios"]

GUARD_RATIOS = ("ping_pong", "send", "fan_out")
#: Per round; a round is about a second of work on this machine.
ECHO_ROUND_TRIPS = 1000
PING_PONGS = 300
SENDS = 600
FAN_OUT_MEMBERS = 50
FAN_OUT_SENDS = 40
GROUP = "bench-guard"

#: CPU nanoseconds of this process and the server it talks to, so far.
Clock = Callable[[], int]


def clock_with(pid: int) -> Clock:
    def read() -> int:
        return time.process_time_ns() + (cpu_ns(pid) or 0)

    return read


async def echo_cost(port: int, clock: Clock) -> float:
    started = clock()
    await round_trips(port, ECHO_ROUND_TRIPS)
    return (clock() - started) / ECHO_ROUND_TRIPS


async def ping_pong_cost(factory: LayerFactory, clock: Clock) -> float:
    """A sends to B, B's loop sends it back to A; CPU per exchange."""
    async with open_layers(factory, 2) as (a, b):
        a_channel, b_channel = await a.new_channel(), await b.new_channel()

        async def echo() -> None:
            while True:
                await b.send(a_channel, await b.receive(b_channel))

        async with running([echo()]):
            started = clock()
            for index in range(PING_PONGS):
                await a.send(b_channel, message(index))
                await a.receive(a_channel)
            return (clock() - started) / PING_PONGS


async def send_cost(factory: LayerFactory, clock: Clock) -> float:
    """One send awaited at a time to a channel another instance drains; CPU per message."""
    async with open_layers(factory, 2) as (producer, consumer):
        channel = await consumer.new_channel()
        tally = Tally(SENDS)
        async with running([drain(consumer, channel, tally)]) as tasks:
            started = clock()
            for index in range(SENDS):
                await producer.send(channel, message(index))
            await wait_done(tally, tasks)
            return (clock() - started) / SENDS


async def fan_out_cost(factory: LayerFactory, clock: Clock) -> float:
    """group_sends to members on two instances, each member's receive loop running as a
    consumer's does; CPU per group_send, all its deliveries included."""
    async with open_layers(factory, 3) as (sender, *hosts):
        members = [(hosts[i % 2], await hosts[i % 2].new_channel()) for i in range(FAN_OUT_MEMBERS)]
        for layer, channel in members:
            await layer.group_add(GROUP, channel)
        tally = Tally(FAN_OUT_MEMBERS * FAN_OUT_SENDS)
        loops = [
            drain(layer, ch, tally, j * FAN_OUT_SENDS) for j, (layer, ch) in enumerate(members)
        ]
        async with running(loops) as tasks:
            started = clock()
            for index in range(FAN_OUT_SENDS):
                await sender.group_send(GROUP, message(index))
            await wait_done(tally, tasks)
            return (clock() - started) / FAN_OUT_SENDS


def guard_ratios(
    factory: LayerFactory, daemon_pid: int, echo: tuple[int, int], rounds: int
) -> dict[str, float]:
    """Median over ``rounds`` of each round's echo CPU per round trip / ours per operation,
    the echo measured right before ours in each round; ``echo`` is (port, pid)."""
    echo_port, echo_pid = echo
    ours, theirs = clock_with(daemon_pid), clock_with(echo_pid)
    measured: dict[str, list[float]] = {name: [] for name in GUARD_RATIOS}
    costs = {"ping_pong": ping_pong_cost, "send": send_cost, "fan_out": fan_out_cost}
    for _ in range(rounds):
        for name, cost in costs.items():
            echo_ns = asyncio.run(echo_cost(echo_port, theirs))
            measured[name].append(echo_ns / asyncio.run(cost(factory, ours)))
    return {name: statistics.median(values) for name, values in measured.items()}
