"""The own channels one connection holds messages of in the daemon are bounded
(``--max-channels``): pushed and not yet acknowledged, or waiting to be pushed. Past the
bound the daemon keeps nothing of the others but a flag; storage keeps their messages,
and the daemon asks storage for them again once the client has read half of what it held.

Issue 14 asked for channels per client to be bounded on their own: before, a client that
never acknowledged made the daemon keep a count for every channel of its own that storage
had a message for (and Redis or PostgreSQL storage has no --max-memory).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

from protocol import Ack, Push, SendMany
from tests.broker.daemon.attack import Client, flags, limit_hits
from tests.waits import QUIET_S

#: The bound of these tests, and the channels a sender fills: three times as many.
MAX_CHANNELS = 10
CHANNELS = 30


async def pushed_channels(reader: Client, count: int) -> list[str]:
    """The channels of the next PUSH frames, until ``count`` channels came; then fail if
    any more come within ``QUIET_S``."""
    channels: list[str] = []
    while len(channels) < count:
        push = await reader.next_frame()
        assert isinstance(push, Push), push
        channels += push.channels
    try:
        more = await asyncio.wait_for(reader.next_frame(), QUIET_S)
    except TimeoutError:
        return channels
    raise AssertionError(f"pushed past --max-channels: {more!r} after {channels}")


async def test_own_channels_stop_at_max_channels_and_the_rest_wait_in_storage(
    broker_factory: Callable[..., Any],
) -> None:
    """30 of a reader's own channels get a message each: 10 are pushed; the other 20 wait
    in storage. Once the reader acknowledges half of those 10, the daemon takes in more,
    and so on: every message arrives once, and never more than 10 channels are held."""
    broker = broker_factory(extra_args=flags(max_channels=MAX_CHANNELS))
    reader, sender = await Client.connect(broker.address), await Client.connect(broker.address)
    await reader.hello()
    await sender.hello()
    own = [reader.own(f"c{index}.{uuid.uuid4().hex[:6]}") for index in range(CHANNELS)]
    sender.send(SendMany(1, tuple((channel, b"m") for channel in own)))
    assert (await sender.next_frame()).request_id == 1  # type: ignore[attr-defined]

    got = await pushed_channels(reader, MAX_CHANNELS)
    held = list(got)
    while len(got) < CHANNELS:
        # Read half of what is held: the daemon then takes in as many again.
        read, held = held[: MAX_CHANNELS // 2], held[MAX_CHANNELS // 2 :]
        reader.send(Ack(tuple((channel, 1) for channel in read)))
        more = await pushed_channels(reader, min(MAX_CHANNELS - len(held), CHANNELS - len(got)))
        got += more
        held += more
    reader.close()
    sender.close()

    assert sorted(got) == sorted(own)  # each once
    assert limit_hits(broker)["max-channels"] >= 1
    broker.wait_for_log(lambda line: "--max-channels" in line and "wait in storage" in line)
