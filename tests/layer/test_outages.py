"""Calls through a daemon outage: receives wait for it, other calls fail fast.

``receive()`` (what ``runworker`` and consumers wait in) never gives up while the daemon
is away: it reconnects with backoff, and the layer logs the outage once and its end
once. ``send()`` and the other calls raise at once while no daemon listens, unless the
daemon was reachable within ``connect_timeout``: then it is restarting, and they wait
for it up to ``connect_timeout``. The outage's length is the layer's behaviour on
trial, so the few pauses here are outages and restarts; all else waits on events.
(The 15 s outage under ``runworker`` and a WebSocket consumer is ``tests/e2e/test_outage.py``.)
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from broker.layer import BrokerConnectionRefused
from broker.layer.connecting import RECONNECT_MAX_DELAY_S
from tests.waits import (
    DELIVERY_TIMEOUT_S,
    IN_FLIGHT_S,
    RECONNECT_TIMEOUT_S,
    START_TIMEOUT_S,
    receive,
)

#: A short connect_timeout, so that an outage of a few of them stays short.
CONNECT_TIMEOUT_S = 0.3
#: An outage several times connect_timeout, and several reconnect rounds long.
OUTAGE_S = 1.5
#: How long a restarting daemon is away in the restart test: well within connect_timeout.
RESTART_S = 0.5
#: How long a send waits for the restarting daemon: the pause, then its start.
RESTART_WAIT_S = RESTART_S + START_TIMEOUT_S
#: What "at once" means for a refused connection on loopback, with a margin for load.
AT_ONCE_S = 0.1
DOWN, BACK = "no broker reachable", "the broker is reachable again"

pytestmark = pytest.mark.backends("memory")  # the layer's behaviour: any storage will do


async def lose_connection(layer: Any, broker: Any) -> None:
    """Kill the daemon and wait until ``layer`` (connected) has seen its connection go."""
    conn = layer._client().conn
    assert conn is not None, "connected before the outage"
    await asyncio.to_thread(broker.kill)
    await asyncio.wait_for(asyncio.shield(conn.lost), DELIVERY_TIMEOUT_S)


async def test_receives_wait_through_an_outage_longer_than_connect_timeout(
    own_broker: Any,
    make_own_layer: Callable[..., Any],
    unique: Callable[[str], str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """1. A consumer (connect_timeout 0.3 s) waits in receive on its own channel and on a
       normal channel.  2. The daemon is killed; another receive starts meanwhile.
    3. For 1.5 s (five connect_timeouts, several reconnect rounds) no receive ends.
    4. The daemon starts again: messages sent then reach all three receives.
    5. The consumer logged the outage once, naming the refused connection and what
       sends raise meanwhile, and its end once."""
    caplog.set_level(logging.INFO, logger="channels_broker.layer")
    consumer = make_own_layer(connect_timeout=CONNECT_TIMEOUT_S)
    sender = make_own_layer()
    channels = [await consumer.new_channel(), unique("queue"), unique("late")]
    waiting = [asyncio.create_task(consumer.receive(channel)) for channel in channels[:2]]
    await sender.send(channels[1], {"warm": "up"})  # connected, and the pull is in
    assert await asyncio.wait_for(waiting.pop(), DELIVERY_TIMEOUT_S) == {"warm": "up"}
    waiting.append(asyncio.create_task(consumer.receive(channels[1])))
    await asyncio.sleep(IN_FLIGHT_S)  # the new pull reaches the daemon

    await lose_connection(consumer, own_broker)
    waiting.append(asyncio.create_task(consumer.receive(channels[2])))
    done, _ = await asyncio.wait(waiting, timeout=OUTAGE_S)
    assert not done, [task.exception() for task in done]
    await asyncio.to_thread(own_broker.start)

    for channel in channels:
        await asyncio.wait_for(sender.send(channel, {"to": channel}), RECONNECT_TIMEOUT_S)
    got = await asyncio.wait_for(asyncio.gather(*waiting), RECONNECT_TIMEOUT_S)
    assert got == [{"to": channel} for channel in channels]
    down = [record for record in caplog.records if DOWN in record.getMessage()]
    assert len(down) == 1 and down[0].levelno == logging.WARNING
    assert f"connection refused at {own_broker.url}" in down[0].getMessage()
    assert "send() and group_send() raise BrokerConnectionRefused" in down[0].getMessage()
    back = [record for record in caplog.records if BACK in record.getMessage()]
    assert len(back) == 1 and back[0].levelno == logging.INFO


async def test_a_send_during_a_restart_waits_for_the_daemon(
    own_broker: Any, make_own_layer: Callable[..., Any], unique: Callable[[str], str]
) -> None:
    """1. A layer (connect_timeout: 0.5 s and as long as a daemon may take to start) is
    connected.  2. The daemon is killed, and started again 0.5 s later.  3. A send made
    just after the kill waits for it and is accepted, without an error: the daemon was
    reachable a moment ago. (A daemon's start, Python's imports, takes seconds on a
    loaded machine: a connect_timeout of 5 s ran out before such a restart ended.)"""
    layer = make_own_layer(connect_timeout=RESTART_WAIT_S)
    channel = unique("queue")
    await layer.send(channel, {"n": 0})
    await lose_connection(layer, own_broker)
    back = threading.Timer(RESTART_S, own_broker.start)
    back.start()
    try:
        started = time.monotonic()
        await layer.send(channel, {"n": 1})
        assert RESTART_S <= time.monotonic() - started < RESTART_WAIT_S
    finally:
        await asyncio.to_thread(back.join)
    assert await receive(layer, channel) == {"n": 1}  # memory://: {"n": 0} went with it


async def test_a_send_waiting_for_a_restart_connects_as_soon_as_the_port_listens(
    own_broker: Any, make_own_layer: Callable[..., Any], unique: Callable[[str], str]
) -> None:
    """1. A layer (connect_timeout 10.5 s) is connected; the daemon is killed.  2. A send
    waits for it through seven failed reconnect rounds: enough for the backoff between
    rounds to reach its cap (2 s, each pause at least half of it).  3. Right after a
    round fails, the port listens again (a socket of the test's: at once, where a
    daemon's start takes a variable while): the layer connects within half the least
    pause at the cap, not at the next backed-off round (the send would have failed with
    the daemon back, had its connect_timeout ended meanwhile: the contract says it goes
    through if the daemon is back by then)."""
    layer = make_own_layer(connect_timeout=RESTART_WAIT_S)
    await layer.send(unique("queue"), {"n": 0})
    await lose_connection(layer, own_broker)
    sending = asyncio.create_task(layer.send(unique("queue"), {"n": 1}))
    dialer = layer._client()._dialer
    for _ in range(7):
        await asyncio.wait_for(asyncio.shield(dialer._round), RECONNECT_TIMEOUT_S)
    listener = socket.create_server(own_broker.address)  # no await since the round failed
    listener.setblocking(False)
    try:
        listening_at = time.monotonic()
        accepted, _ = await asyncio.wait_for(
            asyncio.get_running_loop().sock_accept(listener), RESTART_WAIT_S
        )
        accepted.close()
        assert time.monotonic() - listening_at < RECONNECT_MAX_DELAY_S / 4
    finally:
        listener.close()
        sending.cancel()
        await asyncio.gather(sending, return_exceptions=True)
        await asyncio.to_thread(own_broker.start)


async def test_sends_fail_fast_once_the_daemon_is_away_longer_than_connect_timeout(
    own_broker: Any, make_own_layer: Callable[..., Any], unique: Callable[[str], str]
) -> None:
    """1. A layer (connect_timeout 0.3 s) is connected; the daemon is killed for good.
    2. A send made at once waits for a restart, until connect_timeout after the loss,
    then raises BrokerConnectionRefused saying how long it tried.  3. From then on
    every send and group_send raises it at once.  4. The daemon starts: sends work again."""
    layer = make_own_layer(connect_timeout=CONNECT_TIMEOUT_S)
    channel = unique("queue")
    await layer.send(channel, {"n": 0})
    await lose_connection(layer, own_broker)
    lost_at = time.monotonic()
    with pytest.raises(BrokerConnectionRefused, match=r"tried for \d\.\d s") as raised:
        await layer.send(channel, {"n": 1})
    # From the loss, seen a moment before lost_at, to a round that ends after the window.
    assert CONNECT_TIMEOUT_S - 0.05 <= time.monotonic() - lost_at < CONNECT_TIMEOUT_S + 1.0
    assert f"connection refused at {own_broker.url}" in str(raised.value)
    for call in (layer.send(channel, {"n": 2}), layer.group_send(unique("group"), {"n": 3})):
        started = time.monotonic()
        with pytest.raises(BrokerConnectionRefused):
            await call
        assert time.monotonic() - started < AT_ONCE_S
    await asyncio.to_thread(own_broker.start)
    await layer.send(channel, {"n": 4})
    assert await receive(layer, channel) == {"n": 4}
