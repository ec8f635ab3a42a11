"""Group memberships survive a daemon restart, even on the memory backend.

A daemon on ``memory://`` forgets every group when it restarts; the layer says its
consumers' ``group_add`` calls again after reconnecting, so a consumer that stays
connected keeps receiving its groups' messages.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from tests.waits import IN_FLIGHT_S, QUIET_S, RECONNECT_TIMEOUT_S, assert_nothing_within

#: Pause between group_sends while the consumer's layer reconnects.
GROUP_SEND_INTERVAL_S = 0.2


async def test_consumer_keeps_its_groups_across_a_daemon_restart(
    own_broker: Any, make_own_layer: Any, unique: Callable[[str], str]
) -> None:
    """1. A consumer joins a group and waits in ``receive``.
    2. The daemon restarts.
    3. A sender group_sends until the consumer gets one: it must, within the deadline.
    4. A group_discard after that is honoured (the re-join did not outlive it)."""
    consumer, sender = make_own_layer(), make_own_layer()
    channel = await consumer.new_channel()
    group = unique("room")
    await consumer.group_add(group, channel)
    waiting = asyncio.create_task(consumer.receive(channel))
    await asyncio.sleep(IN_FLIGHT_S)  # let the receive reach the daemon
    await asyncio.to_thread(own_broker.restart)

    async def send_until_received() -> dict[str, Any]:
        n = 0
        while not waiting.done():
            # The sender's own connection may be being re-established.
            with contextlib.suppress(ConnectionError):
                await sender.group_send(group, {"n": n})
            n += 1
            await asyncio.wait([waiting], timeout=GROUP_SEND_INTERVAL_S)
        message: dict[str, Any] = waiting.result()
        return message

    message = await asyncio.wait_for(send_until_received(), RECONNECT_TIMEOUT_S)
    assert "n" in message
    while True:  # drain what the retries left
        try:
            await asyncio.wait_for(consumer.receive(channel), QUIET_S)
        except TimeoutError:
            break
    await consumer.group_discard(group, channel)
    await sender.group_send(group, {"after": "discard"})
    await assert_nothing_within(consumer, channel, 1.0)
