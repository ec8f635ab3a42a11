"""A daemon on PostgreSQL killed outright (SIGKILL) loses no accepted message.

A worker pulls a normal channel busily through the daemon, so the daemon takes
messages ahead of its pulls, while sends pour in through a second daemon with
``IN_FLIGHT`` of them in flight. What the killed daemon had taken was leased, not
deleted: once the leases lapse, the restarted daemon takes those messages again. A
message handed out just before the kill may come twice (its deletion is written a
moment after): the layer drops it by its message id; the test counts and reports both
what reached the application twice and what the layer dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

import pytest

from broker.layer import BrokerChannelLayer, BrokerUnavailable
from tests import pg_server
from tests.conftest import BrokerProcess
from tests.waits import RECOVERY_TIMEOUT_S, RETRY_S

#: Short leases: the restarted daemon takes the killed one's messages a second later.
LEASE_S = 1
#: Sends awaiting their answer at any time, as in the trial that lost 23 of 2,638.
IN_FLIGHT = 20
COUNT = 1500
#: The worker's daemon is killed once this many sends were accepted.
KILL_AFTER = 500


@pytest.fixture
def daemons() -> Iterator[tuple[BrokerProcess, BrokerProcess]]:
    """(the worker's daemon, the senders' daemon), on the session's PostgreSQL."""
    url = f"{pg_server.backend_url('postgresql://')}&lease={LEASE_S}&recheck_interval=0.2"
    made = (BrokerProcess(url), BrokerProcess(url))
    for daemon in made:
        daemon.start()
    yield made
    for daemon in made:
        daemon.cleanup()


class Worker:
    """Receives numbered messages, retrying while its daemon is away."""

    def __init__(self, layer: BrokerChannelLayer, channel: str) -> None:
        self.layer = layer
        self.channel = channel
        self.got: list[int] = []
        self.changed = asyncio.Event()

    async def run(self) -> None:
        while True:
            try:
                message = await self.layer.receive(self.channel)
            except BrokerUnavailable:
                await asyncio.sleep(RETRY_S)
                continue
            self.got.append(message["n"])
            self.changed.set()

    async def wait_for(self, wanted: set[int]) -> None:
        """Until every one of ``wanted`` came, or ``RECOVERY_TIMEOUT_S`` (the caller
        then finds what is missing)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(RECOVERY_TIMEOUT_S):
                while not wanted <= set(self.got):
                    self.changed.clear()
                    await self.changed.wait()


async def send_all(sender: BrokerChannelLayer, channel: str, kill: Any) -> set[int]:
    """Send 0..COUNT-1 with ``IN_FLIGHT`` in flight; call ``kill`` once ``KILL_AFTER``
    were accepted. Returns the accepted numbers (all: their daemon stays up)."""
    accepted: set[int] = set()
    slots = asyncio.Semaphore(IN_FLIGHT)
    killed = asyncio.Event()

    async def send(n: int) -> None:
        try:
            await sender.send(channel, {"n": n})
            accepted.add(n)
        finally:
            slots.release()
        if len(accepted) >= KILL_AFTER and not killed.is_set():
            killed.set()
            await kill()

    tasks = []
    for n in range(COUNT):
        await slots.acquire()
        tasks.append(asyncio.create_task(send(n)))
    await asyncio.gather(*tasks)
    return accepted


async def test_a_sigkilled_daemon_loses_no_accepted_message(
    daemons: tuple[BrokerProcess, BrokerProcess], unique: Any
) -> None:
    """1. A worker pulls a normal channel through daemon 1; a sender sends through
       daemon 2, 20 sends in flight.
    2. After 500 accepted sends daemon 1 is killed (SIGKILL) and started again.
    3. Every accepted message reaches the worker, once (duplicates are counted).
    """
    pulled, senders = daemons
    channel = unique("work")
    worker_layer = BrokerChannelLayer(hosts=[pulled.url], capacity=COUNT)
    sender = BrokerChannelLayer(hosts=[senders.url], capacity=COUNT)
    worker = Worker(worker_layer, channel)

    async def kill_and_restart() -> None:
        pulled.kill()
        await asyncio.to_thread(pulled.start)

    reading = asyncio.create_task(worker.run())
    try:
        accepted = await send_all(sender, channel, kill_and_restart)
        await worker.wait_for(accepted)
    finally:
        reading.cancel()
        await asyncio.gather(reading, return_exceptions=True)
        await worker_layer.close()
        await sender.close()
    lost = accepted - set(worker.got)
    duplicates = len(worker.got) - len(set(worker.got))
    dropped = worker_layer.handed.redelivered
    print(
        f"accepted {len(accepted)}, lost {len(lost)}, delivered twice {duplicates}, "
        f"redelivered and dropped by the layer {dropped}"
    )
    assert len(accepted) == COUNT
    assert not lost, f"{len(lost)} accepted messages lost: {sorted(lost)[:20]}"
    assert duplicates == 0, f"{duplicates} delivered twice to the application"
