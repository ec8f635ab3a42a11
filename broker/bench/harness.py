"""What the scenarios are built from: layer instances, receive loops, numbered messages,
the tally of their deliveries, and the time bound on each scenario."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import BenchError, Unverified, describe
from .layers import ChannelLayer, LayerFactory, Opened, Settings, close_layer
from .progress import progress

__all__ = [
    "SCENARIO_TIMEOUT_S",
    "Row",
    "SEND_WINDOW",
    "Tally",
    "drain",
    "in_new_loop",
    "message",
    "open_layers",
    "percentile",
    "running",
    "scaled",
    "send_each",
    "send_windowed",
    "wait_done",
    "warm_up",
]

#: Sends in flight at once: keeps the pipe busy without becoming an unbounded burst.
SEND_WINDOW = 64
#: A hung layer must fail its scenario, not the run; a healthy default scenario takes < 15 s.
SCENARIO_TIMEOUT_S = 30.0
#: About the size of a chat message; envelope-only messages would flatter per-byte costs.
BODY = "x" * 100
WARM_UP_GROUP = "bench-warm-up"


@dataclass(frozen=True, slots=True)
class Row:
    """One measured number of a scenario: a table row."""

    label: str
    unit: str
    is_higher_better: bool


class Tally:
    """Which of ``expected`` numbered deliveries arrived, how often, and when the last did."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.seen = bytearray(expected)
        self.count = 0
        self.duplicates = 0
        self.finished_at = 0.0
        self.done = asyncio.Event()

    def record(self, index: int) -> None:
        if self.seen[index]:
            self.duplicates += 1
            return
        self.seen[index] = 1
        self.count += 1
        if self.count == self.expected:
            self.finished_at = time.perf_counter()
            self.done.set()

    def rate(self, started: float) -> list[float]:
        """Distinct deliveries per second since ``started``; ``Unverified`` if any repeated."""
        rate = [self.expected / (self.finished_at - started)]
        if self.duplicates:
            raise Unverified(f"{self.duplicates} of {self.expected} delivered twice", rate)
        return rate


def percentile(ordered: Sequence[float], fraction: float) -> float:
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def scaled(count: int, scale: float) -> int:
    # Two at least, so a percentile or a rate is still defined at tiny scales.
    return max(2, round(count * scale))


def message(index: int) -> dict[str, Any]:
    return {"type": "bench.message", "i": index, "text": BODY}


@contextlib.asynccontextmanager
async def open_layers(factory: LayerFactory, count: int) -> AsyncIterator[list[ChannelLayer]]:
    """``count`` separate instances for the body, closed after it."""
    layers = [factory() for _ in range(count)]
    try:
        await warm_up(layers)
        yield layers
    finally:
        for layer in layers:
            await close_layer(layer)


@contextlib.asynccontextmanager
async def running(
    loops: Iterable[Coroutine[Any, Any, None]],
) -> AsyncIterator[list[asyncio.Task[None]]]:
    """Run receive loops during the body, then cancel them; a loop that had crashed fails it."""
    tasks = [asyncio.create_task(loop) for loop in loops]
    try:
        yield tasks
    except BaseException as exc:
        failure = await stop_loops(tasks)
        # A body that hung is best explained by a dead loop; any other error explains itself.
        if failure is not None and isinstance(exc, asyncio.CancelledError | TimeoutError):
            raise BenchError(f"a receive loop failed: {describe(failure)}") from failure
        raise
    failure = await stop_loops(tasks)
    if failure is not None:
        raise BenchError(f"a receive loop failed: {describe(failure)}") from failure


async def stop_loops(tasks: Sequence[asyncio.Task[None]]) -> BaseException | None:
    """Cancel ``tasks``; return the error of one that had failed before it was cancelled."""
    crashed = [task for task in tasks if task.done() and not task.cancelled()]
    for task in tasks:
        task.cancel()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    # Errors raised while being cancelled are teardown noise (channels_redis may raise a
    # socket timeout instead of CancelledError): the measurement is complete by then.
    noisy = [outcome for outcome in outcomes if isinstance(outcome, Exception)]
    if len(noisy) > len(crashed):
        progress(f"  teardown: a cancelled receive raised {describe(noisy[-1])}")
    return next((exc for t in crashed if (exc := t.exception()) is not None), None)


async def warm_up(layers: Sequence[ChannelLayer], concurrency: int = 1) -> None:
    """Connect before the clock starts: layers connect lazily, on their first calls.

    ``concurrency`` calls at once let a pooled client (channels_redis) open as many
    connections as a window of sends will use.
    """
    calls = [layer for layer in layers for _ in range(concurrency)]
    await asyncio.gather(*(layer.group_discard(WARM_UP_GROUP, WARM_UP_GROUP) for layer in calls))


async def drain(layer: ChannelLayer, channel: str, tally: Tally, offset: int = 0) -> None:
    while True:
        received = await layer.receive(channel)
        tally.record(offset + received["i"])


async def wait_done(tally: Tally, tasks: Sequence[asyncio.Task[None]]) -> None:
    """Wait until every delivery arrived, a receive loop died, or the time is up."""
    waiter = asyncio.create_task(tally.done.wait())
    await asyncio.wait([waiter, *tasks], timeout=SCENARIO_TIMEOUT_S, return_when="FIRST_COMPLETED")
    waiter.cancel()
    if not tally.done.is_set():
        seen = f"after {tally.count} of {tally.expected} deliveries ({tally.duplicates} repeated)"
        dead = [task for task in tasks if task.done() and not task.cancelled()]
        if dead and (exc := dead[0].exception()) is not None:
            raise BenchError(f"a receive loop failed {seen}: {describe(exc)}") from exc
        raise BenchError(f"timed out {seen}")


async def send_each(layer: ChannelLayer, channel: str, count: int) -> None:
    """Send ``count`` numbered messages one after the other, each ``send`` awaited before
    the next, as a consumer's code does."""
    for index in range(count):
        await layer.send(channel, message(index))


async def send_windowed(layer: ChannelLayer, channel: str, count: int) -> None:
    """Send ``count`` numbered messages, at most ``SEND_WINDOW`` in flight: pipelined,
    which no application code does (each of its sends is awaited)."""
    for start in range(0, count, SEND_WINDOW):
        end = min(start + SEND_WINDOW, count)
        await asyncio.gather(*(layer.send(channel, message(i)) for i in range(start, end)))


def in_new_loop(
    body: Callable[[LayerFactory, float], Coroutine[Any, Any, list[float]]],
) -> Callable[[Opened, Settings], list[float]]:
    """Run ``body`` on a fresh event loop, bounded in time (``wait_done`` has its own bound)."""

    def run(opened: Opened, settings: Settings) -> list[float]:
        async def bounded() -> list[float]:
            async with asyncio.timeout(SCENARIO_TIMEOUT_S * 1.5):
                return await body(opened.factory, settings.scale)

        return asyncio.run(bounded())

    return run
