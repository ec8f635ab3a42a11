"""Contract behaviour 19: a cancelled receive loses no message and duplicates none.

Channels cancels the pending ``receive`` every time a consumer exits, so this is the
common case, not a corner.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from tests.waits import DELIVERY_TIMEOUT_S, QUIET_S

#: 100 cancels after 0, 0.1, ... 9.9 ms: across the whole life of a receive request.
CANCEL_DELAYS_S = [i * 0.0001 for i in range(100)]
MESSAGES = 100


async def cancel_after(layer: Any, channel: str, delay_s: float) -> dict[str, Any] | None:
    """Start a receive, cancel it after ``delay_s``; return what it got, if it won the race."""
    task = asyncio.create_task(layer.receive(channel))
    await asyncio.sleep(delay_s)
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=DELIVERY_TIMEOUT_S)
    assert done, f"receive did not end within {DELIVERY_TIMEOUT_S} s of cancel()"
    if task.cancelled():
        return None
    message: dict[str, Any] = task.result()  # any other exception fails the test here
    return message


@pytest.mark.parametrize("kind", ["normal", "specific"])
async def test_cancelled_receive_loses_no_message(
    make_layer: Any, unique: Callable[[str], str], kind: str
) -> None:
    """Behaviour 19.

    1. A sender puts 100 messages on the channel, spread over the run.
    2. Meanwhile 100 receives are cancelled after 0, 0.1, ... 9.9 ms; those that
       finished first keep their message.
    3. Draining the channel then yields every other message, exactly once each.
    """
    layer, sender = make_layer(capacity=MESSAGES), make_layer(capacity=MESSAGES)
    channel = await layer.new_channel() if kind == "specific" else unique("queue")

    async def send_all() -> None:
        for n in range(MESSAGES):
            await sender.send(channel, {"n": n})
            await asyncio.sleep(0.0005)

    sending = asyncio.create_task(send_all())
    received: list[int] = []
    for delay in CANCEL_DELAYS_S:
        message = await cancel_after(layer, channel, delay)
        if message is not None:
            received.append(message["n"])
    await asyncio.wait_for(sending, DELIVERY_TIMEOUT_S * 2)
    while len(received) < MESSAGES:
        try:
            drained = await asyncio.wait_for(layer.receive(channel), DELIVERY_TIMEOUT_S)
        except TimeoutError:
            missing = sorted(set(range(MESSAGES)) - set(received))
            pytest.fail(f"lost {len(missing)} message(s): {missing}")
        received.append(drained["n"])
    try:
        extra = await asyncio.wait_for(layer.receive(channel), QUIET_S)
    except TimeoutError:
        extra = None
    assert extra is None, f"duplicate delivered after draining: {extra!r}"
    assert sorted(received) == list(range(MESSAGES)), "a message arrived twice"
    assert received == sorted(received), "one writer, one reader: order must be kept"


async def test_a_group_message_handed_to_a_cancelled_receive_is_not_lost(
    make_layer: Any, unique: Callable[[str], str]
) -> None:
    """A fan-out for a channel with nothing buffered goes straight to its waiting
    receive (no buffer made for it).

    1. A receive waits on a member's channel; a group_send reaches the member's layer,
       which hands the message to that receive.
    2. The receive is cancelled before its task runs again (the consumer exited).
    3. The next receive of the channel gets the message, once.
    """
    layer, sender = make_layer(), make_layer()
    group, channel = unique("room"), await layer.new_channel()
    await layer.group_add(group, channel)
    waiters = layer._client().inbox.waiters  # the member's receivers, by channel
    task = asyncio.create_task(layer.receive(channel))
    async with asyncio.timeout(DELIVERY_TIMEOUT_S):
        while not waiters.get(channel):  # until the receive waits
            await asyncio.sleep(0)
        await sender.group_send(group, {"n": 1})
        while waiters.get(channel):  # until the message is handed to it
            await asyncio.sleep(0)
    task.cancel()  # its task has not run since: it ends cancelled, the message given back
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await asyncio.wait_for(layer.receive(channel), DELIVERY_TIMEOUT_S) == {"n": 1}
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(layer.receive(channel), QUIET_S)
