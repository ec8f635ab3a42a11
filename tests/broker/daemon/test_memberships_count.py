"""The count of memberships one connection holds (``--max-memberships``): renewals are
not new ones, discards and lapses give room back, and lapsed ones are found at the
heads of their groups only when the count is at the limit."""

from __future__ import annotations

import tracemalloc

from broker.daemon.memberships import Memberships

HOUR_S = 3600.0


def test_a_renewal_is_not_a_new_membership_and_a_discard_gives_one_back() -> None:
    held = Memberships(limit=2)
    held.added("a", "x", HOUR_S)
    held.added("b", "x", HOUR_S)
    assert not held.has_room("c", "x")
    assert held.has_room("a", "x")  # held already: a renewal
    held.added("a", "x", HOUR_S)
    assert len(held) == 2
    held.discarded("b", "x")
    held.discarded("b", "x")  # not held any more: nothing to give back
    assert len(held) == 1 and held.has_room("c", "x")


def test_lapsed_memberships_give_room_back_at_the_limit() -> None:
    held = Memberships(limit=3)
    held.added("a", "lapsed", 0.0)
    held.added("b", "lapsed", 0.0)
    held.added("a", "live", HOUR_S)
    assert held.has_room("c", "new")  # two lapsed at the heads of a and b
    assert len(held) == 1
    held.added("c", "new", HOUR_S)
    held.added("d", "new", HOUR_S)
    assert not held.has_room("e", "new")  # nothing lapsed: the heads are live


def test_a_renewed_head_does_not_lapse() -> None:
    held = Memberships(limit=2)
    held.added("a", "x", 0.0)
    held.added("a", "y", HOUR_S)
    held.added("a", "x", HOUR_S)  # renewed: now behind y, with a live deadline
    assert not held.has_room("b", "z")
    assert len(held) == 2


def test_clear_forgets_every_membership() -> None:
    held = Memberships(limit=1)
    held.added("a", "x", HOUR_S)
    held.clear()
    assert len(held) == 0 and held.has_room("b", "y")


def test_a_membership_costs_its_entry_and_deadline_only() -> None:
    """A site's consumers hold millions: the count per connection costs about 50 bytes a
    membership (an ordered dict of (group, channel) tuples cost about 170)."""
    channels = [f"specific.abc!{n}" for n in range(100_000)]  # the names the backend keeps
    held = Memberships(limit=len(channels))
    tracemalloc.start()
    try:
        for n, channel in enumerate(channels):
            held.added(f"room{n % 100}", channel, HOUR_S)
        used, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert used / len(channels) < 80, f"{used / len(channels):.0f} bytes a membership"
