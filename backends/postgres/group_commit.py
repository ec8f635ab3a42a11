"""Group commit for the PostgreSQL backend's sends: one transaction for the sends that
came while the one before was committing.

A send is answered once its transaction has committed, and with PostgreSQL's default
``synchronous_commit=on`` a commit waits for its WAL to reach the disk (about a
millisecond here, several on a plain disk): one commit per send would bound a daemon
by its disk. So sends queue here, and one statement at a time stores them
(``send_batch``): while it is under way, the sends that come wait, and go out
together in the next, whatever their clients, channels, namespaces and expiries. A
lone send goes out at once; under load, each commit carries more sends. A client's
sends are stored in the order it made them: a connection awaits each burst
(``send_many``) before its next, and one statement keeps a burst's order.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from backends import BackendError
from protocol import client_id_of, is_process_specific

from .pool import Database

__all__ = ["MAX_BATCH_MESSAGES", "Batch", "SendBatches", "client_of"]

#: Messages one statement stores at most (more wait for the next): bounds how long a
#: transaction holds its channels' rows while sends pour in. A burst larger than this
#: goes alone, whole.
MAX_BATCH_MESSAGES = 1000


#: ``send_batch``'s arguments: namespaces, channels, clients, payloads, capacities, expiries.
_Columns = tuple[list[str], list[str], list[str | None], list[bytes], list[int], list[float]]


@dataclass(slots=True)
class Batch:
    """One caller's sends: (channel, payload, capacity) each, in order, and its answer
    (the indexes refused as full)."""

    ns: str
    items: Sequence[tuple[str, bytes, int]]
    expiry_s: float
    answer: asyncio.Future[list[int]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class SendBatches:
    """Stores sends, one statement at a time, those that queued meanwhile together."""

    def __init__(self, db: Database, send_batch_sql: str, send_one_sql: str) -> None:
        self._db = db
        self._sql = send_batch_sql
        #: ``send_direct`` told not to push: a lone send's leaner statement (a
        #: sender that awaits each send is on this path at every message).
        self._one_sql = send_one_sql
        self._queue: deque[Batch] = deque()
        self._writer: asyncio.Task[None] | None = None
        #: Statements made, and sends they stored (the group commit at work).
        self.statements = 0
        self.sends = 0

    async def send(
        self, ns: str, items: Sequence[tuple[str, bytes, int]], expiry_s: float
    ) -> list[int]:
        """Store ``items`` (channel, payload, capacity) in order; return the indexes
        refused as full. Raises ``BackendError`` if their statement failed (it may
        have committed: as for any send whose answer was lost)."""
        batch = Batch(ns, items, expiry_s)
        self._queue.append(batch)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write_all())
        return await batch.answer

    async def _write_all(self) -> None:
        while self._queue:
            await self._write(self._next_batches())

    def _next_batches(self) -> list[Batch]:
        """What the next statement stores: the oldest callers' sends, up to
        ``MAX_BATCH_MESSAGES`` (the first always); callers that gave up are left out."""
        taken: list[Batch] = []
        count = 0
        while self._queue and (
            not taken or count + len(self._queue[0].items) <= MAX_BATCH_MESSAGES
        ):
            batch = self._queue.popleft()
            if not batch.answer.done():
                taken.append(batch)
                count += len(batch.items)
        return taken

    async def _write(self, batches: list[Batch]) -> None:
        if not batches:
            return
        columns: _Columns = ([], [], [], [], [], [])
        for batch in batches:
            for channel, payload, capacity in batch.items:
                columns[0].append(batch.ns)
                columns[1].append(channel)
                columns[2].append(client_of(channel))
                columns[3].append(payload)
                columns[4].append(capacity)
                columns[5].append(float(batch.expiry_s))
        try:
            refused = await self._store(columns)
        except BackendError as exc:
            _answer_all(batches, exc)
            return
        except BaseException as exc:  # cancelled (the backend closes): none may wait
            _answer_all(batches, BackendError(f"send not completed: {exc!r}"))
            raise
        self.statements += 1
        self.sends += len(columns[0])
        _answer_each(batches, sorted(refused))

    async def _store(self, columns: _Columns) -> list[int]:
        """One statement: the indexes refused as full."""
        if len(columns[0]) > 1:
            refused: list[int] = await self._db.fetchval(self._sql, *columns)
            return refused
        ns, channel, client, payload, capacity, expiry_s = (column[0] for column in columns)
        args = (ns, channel, client, payload, capacity, expiry_s, False)
        stored = await self._db.fetchval(self._one_sql, *args)
        return [] if stored else [0]


def client_of(channel: str) -> str | None:
    """The client id of a process-specific channel (stored to find its channels), else None."""
    return client_id_of(channel) if is_process_specific(channel) else None


def _answer_all(batches: list[Batch], exc: BackendError) -> None:
    for batch in batches:
        if not batch.answer.done():
            batch.answer.set_exception(exc)


def _answer_each(batches: list[Batch], refused: list[int]) -> None:
    """Give each caller the refused indexes among its own sends, counted from its first."""
    start, position = 0, 0
    for batch in batches:
        end = start + len(batch.items)
        own: list[int] = []
        while position < len(refused) and refused[position] < end:
            own.append(refused[position] - start)
            position += 1
        if not batch.answer.done():
            batch.answer.set_result(own)
        start = end
