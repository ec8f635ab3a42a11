"""The daemon's records of send windows, alone: room per connection, what each seq came
to, and how long a client's seqs are kept (``broker.daemon.windows``)."""

from __future__ import annotations

from broker.daemon.windows import Room, Senders, Seqs
from protocol import MAX_UNSETTLED_SENDS


def test_room_stays_within_the_window_and_the_connections_bound() -> None:
    room = Room(window=4, limit=6)
    assert room.wanted("a") == 4
    room.grant("a", 4)
    assert room.wanted("a") == 0 and room.wanted("b") == 2
    assert room.spend("a") and room.wanted("a") == 1
    assert not room.spend("b"), "no room held on b"
    assert room.give_back("a", 10) == 3, "never more than held"
    assert room.total == 0 and room.by_channel == {}


def test_a_seq_not_stored_is_handled_anew_and_one_stored_is_not() -> None:
    seqs = Seqs()
    seqs.handled(1, stored=True)
    seqs.handled(2, stored=False)
    seqs.handled(3, stored=True)
    assert [seqs.was_stored(seq) for seq in (0, 1, 2, 3, 4)] == [False, True, False, True, False]
    seqs.handled(2, stored=True)  # its retry was stored
    assert seqs.was_stored(2)


def test_seqs_remember_the_latest_refusals_only() -> None:
    seqs = Seqs()
    for seq in range(1, 3 * MAX_UNSETTLED_SENDS):
        seqs.handled(seq, stored=seq % 2 == 0)
    assert len(seqs.unstored) <= MAX_UNSETTLED_SENDS // 2 + 1
    assert not seqs.was_stored(seqs.highest - 1 if seqs.highest % 2 == 0 else seqs.highest)


def test_a_clients_seqs_outlive_its_connection_for_a_while_within_a_bound() -> None:
    senders = Senders(limit=2)
    seqs = senders.attach("ns", "a")
    seqs.handled(5, stored=True)
    senders.detach("ns", "a", keep_s=60)
    assert senders.attach("ns", "a") is seqs, "a reconnect finds them"
    senders.detach("ns", "a", keep_s=0)
    assert senders.attach("ns", "a") is not seqs, "kept no longer than asked"
    for client in ("c", "d", "e"):
        senders.attach("ns", client)
        senders.detach("ns", client, keep_s=60)
    assert len(senders) <= 2 + 1  # ns/a is attached; two of the left ones at most
