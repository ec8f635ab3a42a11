"""Contract behaviour 14: messages wait for a reader until ``expiry``, then are dropped.

Real time with the contract's numbers (``expiry=3``). The timelines of one test run
side by side, so each test takes one timeline's length (about 4.5 s).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from tests.waits import QUIET_S

#: (send times in seconds from the start, the 1-based messages the reader then sees)
TIMELINES = [
    ((0.0, 2.0, 4.0), [2, 3]),  # the first is 4 s old when read: expired
    ((0.0, 1.0, 2.0), [1, 2, 3]),  # the oldest is 2 s old: all valid
]


async def drain(layer: Any, channel: str, sent_all: asyncio.Event) -> list[int]:
    """Everything the channel yields until all is sent and it stays quiet for ``QUIET_S``."""
    got: list[int] = []
    while True:
        try:
            message = await asyncio.wait_for(layer.receive(channel), QUIET_S)
        except TimeoutError:
            if sent_all.is_set():
                return got
            continue
        got.append(message["n"])


async def run_timeline(
    deliver: Callable[[dict[str, Any]], Awaitable[None]],
    reader: Any,
    channel: str,
    offsets_s: tuple[float, ...],
) -> list[int]:
    """Send at the given times; the reader starts at the last one, as its send starts.

    Starting the reader with the last send (not after it returns) keeps a slow send
    from ageing the earlier messages past their expiry before anyone reads.
    """
    loop = asyncio.get_running_loop()
    start = loop.time()
    sent_all = asyncio.Event()
    reading: asyncio.Task[list[int]] | None = None
    for n, offset in enumerate(offsets_s, start=1):
        await asyncio.sleep(max(0.0, start + offset - loop.time()))
        if n == len(offsets_s):
            reading = asyncio.create_task(drain(reader, channel, sent_all))
        await deliver({"n": n})
    sent_all.set()
    assert reading is not None
    return await reading


@pytest.mark.parametrize("via", ["send", "group_send"])
async def test_message_not_read_within_expiry_is_dropped(
    make_layer: Any, unique: Callable[[str], str], via: str
) -> None:
    """Behaviour 14, on a normal and a process-specific channel, through ``via``.

    1. Sends at 0, 2, 4 s with ``expiry=3``: the reader then sees the 2nd and 3rd only.
    2. Sends at 0, 1, 2 s: the reader sees all three, in order.
    """
    reader, sender = make_layer(expiry=3), make_layer(expiry=3)
    scenarios = []
    for offsets, expected in TIMELINES:
        for channel in (unique("queue"), await reader.new_channel()):
            if via == "send":
                deliver = functools.partial(sender.send, channel)
            else:
                group = unique("room")
                await reader.group_add(group, channel)
                deliver = functools.partial(sender.group_send, group)
            scenarios.append((channel, offsets, expected, deliver))
    results = await asyncio.gather(
        *(
            run_timeline(deliver, reader, channel, offsets)
            for channel, offsets, _, deliver in scenarios
        )
    )
    for (channel, offsets, expected, _), got in zip(scenarios, results, strict=True):
        assert got == expected, f"sends at {offsets} s on {channel}"
