"""A site's traffic through two daemons on one storage, while things break.

Consumers (each one connection with its own channel, all in one group), workers
(pulling one normal channel) and senders (sending to consumers, to the workers'
channel, and group-sending to the room), each a layer of its own: hundreds of
connections from one process. Faults come in turn, one every ``fault_every_s``: a
daemon SIGKILLed and started again, the storage restarted, a client's connection cut.
Every message is counted in a ``Ledger``; the daemons' RSS is sampled every second.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from channels.exceptions import ChannelFull

from broker.layer import BrokerChannelLayer, BrokerUnavailable
from tests.soak.ledger import Ledger

__all__ = ["Faults", "Soak", "SoakShape"]

#: Far beyond any soak: nothing accepted may lapse, so every owed delivery is due.
EXPIRY_S = 3600
#: Room for backlogs while a daemon is away: a refusal as full is counted, not a fault.
CAPACITY = 10_000
#: How long the end waits for every owed delivery.
DRAIN_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class SoakShape:
    """How many of each, and how fast."""

    consumers: int = 150
    workers: int = 20
    senders: int = 30
    #: Pause between two sends of one sender: 30 senders at 40 ms are ~750 sends/s.
    send_interval_s: float = 0.04
    #: One group_send to the room per this many sends of a sender.
    group_send_every: int = 50
    fault_every_s: float = 10.0


@dataclass
class Faults:
    """What the soak can break: each a callable run in a thread, with its name."""

    actions: list[tuple[str, Callable[[], None]]]
    #: What was done: (began, ended, name), in seconds of ``Soak.elapsed``.
    done: list[tuple[float, float, str]] = field(default_factory=list)


def rss_kb(pid: int) -> int:
    """The process's resident set, 0 when it is gone (a daemon killed, not yet restarted)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return 0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Soak:
    """The layers, the traffic, the faults and the books."""

    def __init__(self, hosts: list[str], shape: SoakShape, daemon_pids: Callable[[], list[int]]):
        self.shape = shape
        self.ledger = Ledger()
        self.rss: list[tuple[float, list[int]]] = []
        #: (when, seconds late) of each RSS sample's wake-up.
        self.loop_lag: list[tuple[float, float]] = []
        self._pids = daemon_pids
        #: Daemon number (1, 2) by its port, to tell whom a layer is connected to.
        self._daemon_by_port = {int(host.rsplit(":", 1)[1]): n for n, host in enumerate(hosts, 1)}
        rotations = [hosts, hosts[::-1]]
        make = lambda i: BrokerChannelLayer(  # noqa: E731
            hosts=rotations[i % 2], capacity=CAPACITY, expiry=EXPIRY_S, group_expiry=EXPIRY_S
        )
        self.consumers = [make(i) for i in range(shape.consumers)]
        self.workers = [make(i) for i in range(shape.workers)]
        self.senders = [make(i) for i in range(shape.senders)]
        self.channels: list[str] = []
        self.jobs = f"soak-jobs-{random.randrange(10**9)}"
        self.room = f"soak-room-{random.randrange(10**9)}"
        self._ids = itertools.count()
        self._stop = asyncio.Event()
        self._started = time.monotonic()
        #: Wall-clock time the traffic began, to read the daemons' logs by.
        self.began_at = time.time()

    def elapsed(self) -> float:
        """Seconds since the traffic began: the clock of sends, faults and RSS samples."""
        return time.monotonic() - self._started

    async def run(self, seconds: float, faults: Faults) -> None:
        """Set up, run traffic and faults for ``seconds``, then wait for the drain."""
        for consumer in self.consumers:
            channel = await consumer.new_channel()
            self.channels.append(channel)
            await consumer.group_add(self.room, channel)
        readers = [
            asyncio.create_task(self._read(layer, channel))
            for layer, channel in zip(self.consumers, self.channels, strict=True)
        ] + [
            asyncio.create_task(self._read(worker, self.jobs, f"worker {i}"))
            for i, worker in enumerate(self.workers)
        ]
        self._started = time.monotonic()
        self.began_at = time.time()
        background = [asyncio.create_task(self._sample_rss())]
        senders = [asyncio.create_task(self._send(layer)) for layer in self.senders]
        background.append(asyncio.create_task(self._break(faults)))
        await asyncio.sleep(seconds)
        self._stop.set()
        await asyncio.gather(*senders)
        await self._drain()
        for task in readers + background:
            task.cancel()
        await asyncio.gather(*readers, *background, return_exceptions=True)

    async def close(self) -> None:
        for layer in self.consumers + self.workers + self.senders:
            with contextlib.suppress(Exception):
                await layer.close()

    async def _send(self, layer: Any) -> None:
        rng = random.Random()
        for n in itertools.count():
            if self._stop.is_set():
                return
            message_id = f"m{next(self._ids)}"
            if n % self.shape.group_send_every == 0:
                kind, targets = "group", list(self.channels)
                call = layer.group_send(self.room, {"id": message_id})
            else:
                channel = self.jobs if n % 2 else rng.choice(self.channels)
                kind, targets = ("worker" if n % 2 else "own"), [channel]
                call = layer.send(channel, {"id": message_id})
            sent_at = self.elapsed()
            try:
                await call
            except (ChannelFull, BrokerUnavailable) as exc:
                self.ledger.refuse(message_id, kind, type(exc).__name__, sent_at)
            else:
                self.ledger.accept(message_id, targets, kind, sent_at)
            await asyncio.sleep(self.shape.send_interval_s)

    async def _read(self, layer: Any, channel: str, name: str = "") -> None:
        """Receive on ``channel`` for ever; ``name``: a worker's, told with its daemon."""
        while True:
            try:
                message = await layer.receive(channel)
            except BrokerUnavailable:
                await asyncio.sleep(0.05)
                continue
            by = f"{name} via {self._daemon_of(layer)}" if name else ""
            self.ledger.deliver(channel, message["id"], self.elapsed(), by)

    def _daemon_of(self, layer: Any) -> str:
        """The daemon (``host:port``) a layer is connected to now, if it is."""
        for client in layer._clients.values():
            if client.conn is not None and client.conn.transport is not None:
                peer = client.conn.transport.get_extra_info("peername")
                return f"daemon {self._daemon_by_port.get(peer[1], peer[1])}" if peer else "?"
        return "no daemon"

    async def _break(self, faults: Faults) -> None:
        for name, action in itertools.cycle(faults.actions):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.shape.fault_every_s)
            if self._stop.is_set():
                return
            faults.done.append(await asyncio.to_thread(self._timed, action, name))

    def _timed(self, action: Callable[[], None], name: str) -> tuple[float, float, str]:
        # Timed in its thread: the soak's busy loop (and a queue in the default
        # executor) would make the fault look later than it was.
        began = self.elapsed()
        action()
        return began, self.elapsed(), name

    def cut_a_connection(self) -> None:
        """Abort one consumer's socket, as a network fault would (from any thread)."""
        layer = random.choice(self.consumers)
        for client in list(layer._clients.values()):
            conn = client.conn
            if conn is not None and conn.transport is not None:
                client.loop.call_soon_threadsafe(conn.transport.abort)

    async def _sample_rss(self) -> None:
        """Every second: the daemons' RSS, and how late this loop woke (the soak's own
        lag: a client that lags past a lease sees its messages given to another)."""
        while True:
            pids = self._pids()
            self.rss.append((self.elapsed(), [rss_kb(pid) for pid in pids]))
            asleep = time.monotonic()
            await asyncio.sleep(1.0)
            self.loop_lag.append((self.elapsed(), time.monotonic() - asleep - 1.0))

    async def _drain(self) -> None:
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while self.ledger.outstanding() and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)  # a duplicate would come now
