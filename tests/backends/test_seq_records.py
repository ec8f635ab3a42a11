"""Shared storage's record of a client's numbered sends (``ReservesRoom.dedupes_sends``):
a seq is stored at most once, and a seq no store recorded is stored when it comes,
whatever later seqs were stored before it (issue 15: a send whose store failed while
Redis restarted came again after a later one was stored, and was taken for stored).
"""

from __future__ import annotations

import pytest

from backends import ALREADY_STORED, SEQ_SPAN, Backend, ReservesRoom

pytestmark = pytest.mark.backends("redis", "postgresql")

CAPACITY = 100
EXPIRY_S = 60.0
WINDOW = 4


def room_of(backend: Backend) -> ReservesRoom:
    assert isinstance(backend, ReservesRoom) and backend.dedupes_sends
    assert backend.can_reserve_room()
    return backend


async def send(backend: Backend, ns: str, seq: int, payload: bytes) -> int | None:
    """A numbered request of client ``c`` to ``work``: the room granted, None if full,
    or ``ALREADY_STORED``."""
    return await room_of(backend).send_reserving(
        ns,
        "work",
        payload,
        capacity=CAPACITY,
        expiry_s=EXPIRY_S,
        window=WINDOW,
        client="c",
        seq=seq,
        holder="c 1",
    )


async def waiting(backend: Backend, ns: str) -> list[bytes]:
    return [taken.payload for taken in await backend.take(ns, "work", CAPACITY, hold=False)]


async def test_a_seq_below_the_highest_that_no_store_recorded_is_stored(
    backend: Backend, ns: str
) -> None:
    """1. Seq 2 is stored; seq 1 never reached storage (its store failed).
    2. Seq 1 comes again: it is stored, once; a third try of it stores nothing.
    """
    assert await send(backend, ns, 2, b"two") != ALREADY_STORED
    assert await send(backend, ns, 1, b"one") not in (None, ALREADY_STORED)
    assert await send(backend, ns, 1, b"one") == ALREADY_STORED
    assert await send(backend, ns, 2, b"two") == ALREADY_STORED
    assert sorted(await waiting(backend, ns)) == [b"one", b"two"]


async def test_windowed_sends_past_a_gap_leave_the_gap_to_be_stored(
    backend: Backend, ns: str
) -> None:
    """1. Windowed seqs 5 and 7 are stored into room; 6 never reached storage.
    2. 6 comes again as a request: stored; 5 and 7 again store nothing.
    3. A seq more than ``SEQ_SPAN`` behind the highest is taken for stored.
    """
    room = await send(backend, ns, 4, b"four")
    assert room is not None and room >= 2, "room for the two windowed sends"
    await room_of(backend).send_reserved(
        ns, [("work", b"five"), ("work", b"seven")], expiry_s=EXPIRY_S, client="c",
        seqs=[5, 7], holder="c 1",
    )  # fmt: skip
    assert await send(backend, ns, 6, b"six") not in (None, ALREADY_STORED)
    assert await send(backend, ns, 5, b"five") == ALREADY_STORED
    assert await send(backend, ns, 7, b"seven") == ALREADY_STORED
    assert await waiting(backend, ns) == [b"four", b"five", b"seven", b"six"]
    assert await send(backend, ns, 7 + SEQ_SPAN, b"far") not in (None, ALREADY_STORED)
    assert await send(backend, ns, 7, b"seven") == ALREADY_STORED, "too old to come again"
