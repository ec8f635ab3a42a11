"""Numbered messages through a daemon that goes away, and the checks on what came out.

The restart and crash tests send ``{"n": 0}``, ``{"n": 1}``... and read them back on
the other side. What they share: a send retried as an application would while the
daemon or its storage is away (or the channel is full while its reader reconnects),
readers that keep what arrives (and when), and the check that every message came once,
in order.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Collection, Iterable
from types import TracebackType
from typing import Any

import pytest
from channels.exceptions import ChannelFull

from broker.layer import BrokerUnavailable
from tests.waits import QUIET_S, RECOVERY_TIMEOUT_S, RETRY_S

__all__ = ["Readers", "assert_once_in_order", "send_until_accepted"]


async def send_until_accepted(sender: Any, channel: str, message: dict[str, Any]) -> list[float]:
    """Send, retrying while the daemon refuses with BrokerUnavailable, or the channel is
    full, as an application that must not drop a message would; return how long each
    BrokerUnavailable attempt took (empty: accepted at once).

    Full is what a sender meets after an outage: its next send reconnects at once, while
    a reader waiting in ``receive()`` reconnects after the layer's backoff (up to 3 s),
    and meanwhile the sender fills the channel's 100 places in about a second. A channel
    that stays full for ``RECOVERY_TIMEOUT_S`` (its reader never came back, or capacity
    leaked) fails the test."""
    refused: list[float] = []
    full_since: float | None = None
    while True:
        started = time.monotonic()
        try:
            await sender.send(channel, message)
            return refused
        except BrokerUnavailable:
            refused.append(time.monotonic() - started)
        except ChannelFull:
            full_since = started if full_since is None else full_since
            if started - full_since > RECOVERY_TIMEOUT_S:
                pytest.fail(f"{channel} stayed full for {RECOVERY_TIMEOUT_S} s")
        await asyncio.sleep(RETRY_S)


class Readers:
    """One task per (layer, channel) pair, receiving until the block ends.

    ``got[channel]`` lists the ``n`` of each message in the order it came; layers
    reading the same channel share its list. ``arrived_at[channel][n]`` is when ``n``
    first came (``time.monotonic()``). ``pace_s`` slows each reader down, so that a
    backlog builds up behind it.
    """

    def __init__(self, pairs: Iterable[tuple[Any, str]], *, pace_s: float = 0.0) -> None:
        self._pairs = list(pairs)
        self._pace_s = pace_s
        self.got: dict[str, list[int]] = {channel: [] for _, channel in self._pairs}
        self.arrived_at: dict[str, dict[int, float]] = {channel: {} for channel in self.got}
        self._tasks: list[asyncio.Task[None]] = []
        self._expected: set[int] | None = None
        self._all_came = asyncio.Event()

    async def __aenter__(self) -> Readers:
        self._tasks = [asyncio.create_task(self._read(*pair)) for pair in self._pairs]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _read(self, layer: Any, channel: str) -> None:
        while True:
            n = (await layer.receive(channel))["n"]
            self.got[channel].append(n)
            self.arrived_at[channel].setdefault(n, time.monotonic())
            self._note_progress()
            if self._pace_s:
                await asyncio.sleep(self._pace_s)

    def _note_progress(self) -> None:
        expected = self._expected
        if expected is not None and all(
            expected <= times.keys() for times in self.arrived_at.values()
        ):
            self._all_came.set()

    async def wait_for_all(self, count: int, timeout_s: float = RECOVERY_TIMEOUT_S) -> None:
        """Wait until every channel got messages 0 to ``count`` - 1, then ``QUIET_S``
        more, in which a duplicate would show up; fail the test after ``timeout_s``."""
        self._expected = set(range(count))
        self._all_came.clear()  # a later wait is for more
        self._note_progress()
        try:
            await asyncio.wait_for(self._all_came.wait(), timeout_s)
        except TimeoutError:
            missing = {
                ch: sorted(self._expected - times.keys()) for ch, times in self.arrived_at.items()
            }
            ended = [
                task.exception() for task in self._tasks if task.done() and not task.cancelled()
            ]
            pytest.fail(f"not delivered within {timeout_s} s: {missing}; readers ended: {ended}")
        await asyncio.sleep(QUIET_S)


def assert_once_in_order(received: list[int], count: int, may_repeat: Collection[int] = ()) -> None:
    """``received`` is 0 to ``count`` - 1, in order, each once. Only a message in
    ``may_repeat`` (a send retried after it may have been stored) may come again, and
    only right after itself: a retry follows the send it repeats."""
    repeated = {n for previous, n in itertools.pairwise(received) if n == previous}
    if not repeated <= set(may_repeat):
        pytest.fail(f"sent once, came twice: {sorted(repeated - set(may_repeat))}")
    if [n for n, _ in itertools.groupby(received)] != list(range(count)):
        missing = sorted(set(range(count)) - set(received))
        pytest.fail(f"not each of {count} once in order (missing {missing}): {received}")
