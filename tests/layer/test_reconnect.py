"""Contract behaviour 26: the daemon restarts, or the connection is cut, under a waiting consumer.

Each test has a daemon of its own (``own_broker``) to stop, kill and start again on
the same port. The memory backend is not durable: what it held before a restart is
gone, so only other backends must keep the messages accepted before it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from tests.waits import IN_FLIGHT_S, RECONNECT_TIMEOUT_S, receive


def is_durable(backend_url: str) -> bool:
    return not backend_url.startswith("memory://")


@pytest.mark.parametrize("cut", ["restart", "kill"])
async def test_layer_reconnects_after_daemon_restart_and_later_messages_arrive(
    own_broker: Any,
    make_own_layer: Any,
    unique: Callable[[str], str],
    backend_url: str,
    cut: str,
) -> None:
    """Behaviour 26.

    1. A consumer waits in ``receive`` on its own channel and on a normal channel;
       a message waits, unread, on another normal channel.
    2. The daemon stops (SIGTERM, or SIGKILL to cut the connection) and starts again
       on the same port.
    3. A sender's next messages reach both waiting receives, with no call from the
       test to reconnect anything.
    4. A durable backend still holds the message accepted before the restart.
    """
    consumer, sender = make_own_layer(), make_own_layer()
    specific = await consumer.new_channel()
    queue, parked = unique("queue"), unique("parked")
    await sender.send(parked, {"before": "restart"})
    waiting_specific = asyncio.create_task(consumer.receive(specific))
    waiting_queue = asyncio.create_task(consumer.receive(queue))
    await asyncio.sleep(IN_FLIGHT_S)  # let both receives reach the daemon
    assert not waiting_specific.done() and not waiting_queue.done()

    if cut == "restart":
        await asyncio.to_thread(own_broker.restart)
    else:
        await asyncio.to_thread(own_broker.kill)
        await asyncio.to_thread(own_broker.start)

    await asyncio.wait_for(sender.send(specific, {"after": "specific"}), RECONNECT_TIMEOUT_S)
    await asyncio.wait_for(sender.send(queue, {"after": "queue"}), RECONNECT_TIMEOUT_S)
    assert await asyncio.wait_for(waiting_specific, RECONNECT_TIMEOUT_S) == {"after": "specific"}
    assert await asyncio.wait_for(waiting_queue, RECONNECT_TIMEOUT_S) == {"after": "queue"}
    if is_durable(backend_url):
        assert await receive(consumer, parked, RECONNECT_TIMEOUT_S) == {"before": "restart"}


async def test_layer_keeps_working_across_two_restarts(
    own_broker: Any, make_own_layer: Any, unique: Callable[[str], str]
) -> None:
    """Behaviour 26, repeated: an idle layer finds the daemon again each time it is used."""
    layer = make_own_layer()
    channel = unique("queue")
    for round_ in range(3):
        await asyncio.wait_for(layer.send(channel, {"round": round_}), RECONNECT_TIMEOUT_S)
        assert await receive(layer, channel, RECONNECT_TIMEOUT_S) == {"round": round_}
        await asyncio.to_thread(own_broker.restart)
