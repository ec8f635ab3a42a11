"""SIGTERM stops a daemon on Redis Cluster promptly while a client is connected:
receiving, or with the daemon's output to it backed up because it stopped reading
(its event loop blocked, as a test's own synchronous ``stop()`` blocks it). The latter
held the exit for the whole ``--shutdown-timeout`` (10 s): the connection's worker
waited for the client to read before it would close.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import time
from collections.abc import Callable
from typing import Any

import pytest

from protocol import Welcome
from tests.broker.raw_client import RawClient, hello
from tests.broker.samples import scrape
from tests.waits import POLL_S, receive

pytestmark = pytest.mark.backends("redis+cluster")

#: Daemons started and stopped one after the other with a receiving client.
ROUNDS = 4
#: A clean stop here takes well under a second; the fixtures give up at 10 s.
EXIT_WITHIN_S = 5.0
DELIVERED = "channels_broker_messages_delivered_total"
#: Pushed to a client that reads nothing: far more than the sockets between hold.
BACKLOG_MESSAGES, PAYLOAD_BYTES = 200, 100_000


async def test_sigterm_stops_a_cluster_daemon_while_a_client_receives(
    broker_factory: Callable[..., Any],
) -> None:
    """Each round: 1. a daemon on the Cluster; a client receives on its own channel and a
    normal channel while a sender keeps sending to both. 2. SIGTERM: the daemon exits,
    with code 0, within ``EXIT_WITHIN_S``."""
    from broker.layer import BrokerChannelLayer

    for round_ in range(ROUNDS):
        daemon = broker_factory()
        receiver, sender = (BrokerChannelLayer(hosts=[daemon.url]) for _ in range(2))
        try:
            channels = [await receiver.new_channel(), f"work-{round_}"]
            for channel in channels:
                await sender.send(channel, {"n": 0})
                assert await receive(receiver, channel) == {"n": 0}
            busy = [asyncio.create_task(_send_until_gone(sender, channels))]
            busy += [asyncio.create_task(receiver.receive(c)) for c in channels]
            await _stops_in_time(daemon)
            for task in busy:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        finally:
            for layer in (receiver, sender):
                await layer.close()


async def test_sigterm_stops_a_cluster_daemon_whose_client_stopped_reading(
    broker_factory: Callable[..., Any],
) -> None:
    """1. A client says HELLO, then reads nothing; messages to its own channel fill the
    sockets and the daemon's output buffer (its pushes stop growing). 2. SIGTERM: the
    daemon exits, with code 0, within ``EXIT_WITHIN_S`` (not after --shutdown-timeout)."""
    from broker.layer import BrokerChannelLayer

    daemon = broker_factory()
    client = await RawClient.open(daemon.address)
    sender = BrokerChannelLayer(hosts=[daemon.url], capacity=BACKLOG_MESSAGES)
    try:
        await client.write(hello(capacity=BACKLOG_MESSAGES))
        welcome = await client.next_frame()
        assert isinstance(welcome, Welcome)
        channel = f"specific.{welcome.client_id}!x"
        for n in range(BACKLOG_MESSAGES):
            await sender.send(channel, {"n": n, "pad": "x" * PAYLOAD_BYTES})
        await _pushes_stopped(daemon)
        await _stops_in_time(daemon)
    finally:
        client.close()
        await sender.close()


async def _stops_in_time(daemon: Any) -> None:
    started = time.monotonic()
    daemon.process.send_signal(signal.SIGTERM)
    try:
        code = await asyncio.to_thread(daemon.process.wait, EXIT_WITHIN_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"no exit within {EXIT_WITHIN_S} s of SIGTERM")
    assert code == 0, daemon.log_tail()
    print(f"exit {time.monotonic() - started:.2f} s after SIGTERM")


async def _pushes_stopped(daemon: Any) -> None:
    """Until the daemon pushed some messages and, three scrapes running, no more: its
    output to the client is full (no event says so; /metrics is polled, as ``settled``)."""
    seen: list[float] = []
    deadline = time.monotonic() + EXIT_WITHIN_S
    while len(seen) < 3 or seen[-1] == 0 or len(set(seen[-3:])) > 1:
        samples = await asyncio.to_thread(scrape, daemon)
        seen.append(
            sum(samples.get((DELIVERED, frozenset({("mode", m)})), 0) for m in ("push", "direct"))
        )
        assert seen[-1] < BACKLOG_MESSAGES, "the client read them all: nothing backed up"
        assert time.monotonic() < deadline, f"pushes never stopped: {seen}"
        await asyncio.sleep(POLL_S)


async def _send_until_gone(sender: Any, channels: list[str]) -> None:
    """Send to each channel over and over, until the daemon is gone (or cancelled)."""
    n = 1
    with contextlib.suppress(Exception):
        while True:
            for channel in channels:
                await sender.send(channel, {"n": n})
            n += 1
