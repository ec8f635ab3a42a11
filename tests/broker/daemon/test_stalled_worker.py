"""A worker whose event loop stalls for longer than a lease keeps what its daemon
delivered it meanwhile: no other worker gets those messages (issue 15).

No fault here, only a slow consumer: its DELIVERs sit unread in its socket, and its ACKs
come late. The daemon renews the lease of each message it delivered until the ACK names
it (or the connection closes), so it never lapses to another worker. Before PostgreSQL
renewed them, every message in the stalled worker's socket went to the other worker
once its lease lapsed, and to the stalled one too once its loop went on: a double.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from broker.layer import BrokerChannelLayer, BrokerUnavailable
from tests.broker.daemon.test_faults import COUNT, Ledger, no_fault, send_all, storage_url, work
from tests.conftest import BrokerProcess
from tests.waits import RECOVERY_TIMEOUT_S, RETRY_S

#: The shortest lease the URLs allow: the stall outlasts it three times.
LEASE_S = 1
STALL_S = 3 * LEASE_S
#: The stalled worker's receives under way: while one stalls its loop, the daemon
#: answers the others, and their DELIVERs wait unread in its socket.
STALLED_PULLS = 8
#: The stalled worker blocks its loop once it has handed this many messages out.
STALL_AFTER = 20


class StalledWorker(threading.Thread):
    """A worker process of its own (a layer on an event loop in this thread) whose loop
    stalls for ``STALL_S`` once, as an application busy on the CPU would; each message
    it receives goes to ``note`` on the test's loop."""

    def __init__(self, url: str, channel: str, note: Callable[[int], None]) -> None:
        super().__init__(daemon=True)
        self._url, self._channel, self._note = url, channel, note
        self._loop = asyncio.get_running_loop()
        self._got = 0
        self.stalling = threading.Event()
        #: Messages it got once its loop went on (those its daemon delivered meanwhile).
        self.after_stall = 0
        #: The stall is over and everything that arrived during it was handed out.
        self.caught_up = threading.Event()
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # the test reports it
            self.error = exc
            self.stalling.set()
            self.caught_up.set()

    async def _main(self) -> None:
        layer = BrokerChannelLayer(hosts=[self._url], capacity=COUNT)
        self._busy = asyncio.Event()
        pulls = [asyncio.create_task(self._pull(layer)) for _ in range(STALLED_PULLS)]
        try:
            await self._busy.wait()
            self.stalling.set()
            # The application, busy on the CPU, in the midst of its pulls: their
            # RECEIVEs are out, and what answers them waits unread.
            time.sleep(STALL_S)
            # A request on the same connection: its answer comes after every DELIVER
            # the daemon wrote before it, so those were read and handed out by then.
            await layer.send(f"{self._channel}-after-the-stall", {"n": -1})
            await asyncio.sleep(0)  # the receivers they woke run first
            self.caught_up.set()
            await asyncio.to_thread(self.stop.wait)
        finally:
            for task in pulls:
                task.cancel()
            await asyncio.gather(*pulls, return_exceptions=True)
            await layer.close()

    async def _pull(self, layer: BrokerChannelLayer) -> None:
        while True:
            try:
                message: dict[str, Any] = await layer.receive(self._channel)
            except BrokerUnavailable:
                await asyncio.sleep(RETRY_S)
                continue
            self._loop.call_soon_threadsafe(self._note, message["n"])
            self._got += 1
            if self._got == STALL_AFTER:
                self._busy.set()
            if self.stalling.is_set():
                self.after_stall += 1


@pytest.mark.parametrize("kind", ["redis", "postgresql"])
async def test_a_worker_stalled_past_its_lease_keeps_its_messages(
    kind: str, unique: Callable[[str], str]
) -> None:
    """1. A backlog of 1,000 messages on a normal channel, one daemon, a one-second lease.
    2. A worker (a layer on an event loop of its own, eight receives under way) takes
       20, then its loop blocks for three leases: DELIVERs arrive unread. Another
       worker pulls the rest meanwhile, and goes on pulling.
    3. Once the stalled loop goes on and has read what came, every message reached
       the application exactly once: none of the stalled worker's went to the other.
    """
    url = await asyncio.to_thread(storage_url, kind, LEASE_S)
    daemon = BrokerProcess(url)
    await asyncio.to_thread(daemon.start)
    channel = unique("work")
    ledger = Ledger()

    def note(n: int) -> None:
        ledger.got.append(n)
        ledger.changed.set()

    sender = BrokerChannelLayer(hosts=[daemon.url], capacity=COUNT)
    active = BrokerChannelLayer(hosts=[daemon.url], capacity=COUNT)
    stalled = StalledWorker(daemon.url, channel, note)
    reading: list[asyncio.Task[None]] = []
    try:
        await send_all(sender, channel, ledger, no_fault)
        await sender.close()
        stalled.start()
        assert await asyncio.to_thread(stalled.stalling.wait, RECOVERY_TIMEOUT_S)
        reading = [asyncio.create_task(work(active, channel, ledger)) for _ in range(2)]
        assert await asyncio.to_thread(stalled.caught_up.wait, RECOVERY_TIMEOUT_S)
        await ledger.wait_for_accepted()
    finally:
        stalled.stop.set()
        for task in reading:
            task.cancel()
        await asyncio.gather(*reading, return_exceptions=True)
        await active.close()
        if stalled.ident is not None:
            await asyncio.to_thread(stalled.join, RECOVERY_TIMEOUT_S)
        await asyncio.to_thread(daemon.cleanup)
    assert stalled.error is None, stalled.error
    print(f"the stalled worker got {stalled.after_stall} messages after its stall")
    assert stalled.after_stall > 0, "its daemon delivered it nothing during the stall"
    assert len(ledger.accepted) == COUNT
    ledger.check(active)
