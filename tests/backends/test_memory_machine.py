"""MemoryBackend against a model, as a hypothesis state machine.

The model is plain lists and dicts: per channel, its entries (deadline, payload) in send
order, its held count and the send room reserved on it; per group, member -> deadline in
the order of the latest ``group_add``. Each rule does one backend call and the same thing
to the model, and checks the call's answer against the model's (FIFO order, capacity with
held messages and room counted, room granted and stored into, expiry, group members
skipped when full or lapsed, flush of one namespace). The invariants after every step
compare what is alive at the model's clock, the counters against the records, and the
records' own bookkeeping. Time is the model's: the backend's clock is replaced by it, so
expiry is exact and no test waits for it.

The model keeps what the backend documents about mixed expiries in one channel: an
expired message behind a live head still takes a place until the head goes (reads never
return it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

import backends.memory.backend as memory_module
import backends.memory.groups as groups_module
import backends.memory.room as room_module
from backends.memory import MemoryBackend
from broker.daemon.capacity import CapacityPolicy
from protocol import client_id_of, is_process_specific
from tests.backends.memory_support import check_records, gauges, recount, recount_bytes

#: Few names, so that calls often meet on one channel: the second namespace is there to
#: show that a flush or a send in one leaves the other alone.
NAMESPACES = st.sampled_from(["n1", "n1", "n2"])
CHANNEL_NAMES = ["specific.c1!x", "b", "c" * 99, "specific.c1!y", "specific.c2!x"]
GROUP_NAMES = ["g2", "g" * 99]
CAPACITIES = st.sampled_from([1, 2, 3, 0, 4])
EXPIRIES = st.sampled_from([0.5, 1.0, 5.0, 60.0])
#: Steps of the model's clock: none, within an expiry, past several.
STEPS = st.sampled_from([0.0, 0.25, 0.5, 1.0, 2.0, 5.0, 61.0])

T = TypeVar("T")
Key = tuple[str, str]
Entry = tuple[float, bytes]


class Model:
    """What the backend must hold, with the clock ``now``."""

    def __init__(self, now: float) -> None:
        self.now = now
        self.queues: dict[Key, list[Entry]] = {}
        self.held: dict[Key, int] = {}
        self.reserved: dict[Key, int] = {}
        self.groups: dict[Key, dict[str, float]] = {}

    def _trim(self, key: Key) -> list[Entry]:
        queue = self.queues.setdefault(key, [])
        while queue and queue[0][0] <= self.now:
            del queue[0]
        return queue

    def put(self, key: Key, payload: bytes, capacity: int, expiry_s: float) -> bool:
        if capacity < 1:
            return False
        queue = self._trim(key)
        if len(queue) + self.held.get(key, 0) + self.reserved.get(key, 0) >= capacity:
            return False
        queue.append((self.now + expiry_s, payload))
        return True

    def reserve(self, key: Key, capacity: int, window: int) -> int:
        """Room granted after a store, or alone: half of what still fits, up to ``window``."""
        self._trim(key)
        free = capacity - len(self.queues[key]) - self.held.get(key, 0) - self.reserved.get(key, 0)
        room = max(0, min(window, free // 2))
        self.reserved[key] = self.reserved.get(key, 0) + room
        return room

    def take(self, key: Key, limit: int, hold: bool) -> list[bytes]:
        queue = self.queues.setdefault(key, [])
        taken: list[bytes] = []
        while queue and len(taken) < limit:
            deadline, payload = queue.pop(0)
            if deadline > self.now:
                taken.append(payload)
        if hold:
            self.held[key] = self.held.get(key, 0) + len(taken)
        return taken

    def live(self, key: Key) -> list[bytes]:
        return [payload for deadline, payload in self.queues.get(key, []) if deadline > self.now]

    def live_members(self, key: Key) -> list[str]:
        members = self.groups.get(key, {})
        return [channel for channel, deadline in members.items() if deadline > self.now]


def _capacity_of(capacity: int, patterned: bool) -> CapacityPolicy:
    """Every channel ``capacity``, or (patterned) process-specific ones one more."""
    patterns = ((r".*!", capacity + 1),) if patterned else ()
    return CapacityPolicy(capacity, patterns)


class MemoryMachine(RuleBasedStateMachine):
    channels = Bundle("channels")
    groups = Bundle("groups")

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.model = Model(now=1000.0)
        self._real_now = memory_module._now
        memory_module._now = room_module._now = groups_module._now = lambda: self.model.now
        self.backend = MemoryBackend(tick_s=1.0)
        self.run(self.backend.connect())
        self.sent = 0

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coroutine)

    def teardown(self) -> None:
        self.run(self.backend.close())
        self.loop.close()
        memory_module._now = room_module._now = groups_module._now = self._real_now

    def payload(self) -> bytes:
        self.sent += 1
        return b"%d" % self.sent

    # -- names ----------------------------------------------------------------

    @initialize(target=channels)
    def first_channel(self) -> str:
        return "a"

    @initialize(target=groups)
    def first_group(self) -> str:
        return "g1"

    @rule(target=channels, name=st.sampled_from(CHANNEL_NAMES))
    def new_channel(self, name: str) -> str:
        return name

    @rule(target=groups, name=st.sampled_from(GROUP_NAMES))
    def new_group(self, name: str) -> str:
        return name

    # -- time -----------------------------------------------------------------

    @rule(seconds=STEPS)
    def time_passes(self, seconds: float) -> None:
        self.model.now += seconds

    @rule()
    def sweep(self) -> None:
        """What a tick of the timer wheel does, now (it frees memory; nothing observable)."""
        assert self.backend._timer is not None
        self.backend._timer.cancel()
        self.backend._tick()

    # -- channels -------------------------------------------------------------

    @rule(ns=NAMESPACES, channel=channels, capacity=CAPACITIES, expiry_s=EXPIRIES)
    def send(self, ns: str, channel: str, capacity: int, expiry_s: float) -> None:
        payload = self.payload()
        expected = self.model.put((ns, channel), payload, capacity, expiry_s)
        sent = self.run(
            self.backend.send(ns, channel, payload, capacity=capacity, expiry_s=expiry_s)
        )
        assert sent == expected

    @rule(
        ns=NAMESPACES,
        names=st.lists(channels, max_size=5),
        capacity=CAPACITIES,
        patterned=st.booleans(),
        expiry_s=EXPIRIES,
    )
    def send_many(
        self, ns: str, names: list[str], capacity: int, patterned: bool, expiry_s: float
    ) -> None:
        policy = _capacity_of(capacity, patterned)
        items = [(channel, self.payload()) for channel in names]
        expected = [
            index
            for index, (channel, payload) in enumerate(items)
            if not self.model.put((ns, channel), payload, policy(channel), expiry_s)
        ]
        refused = self.run(self.backend.send_many(ns, items, capacity_of=policy, expiry_s=expiry_s))
        assert refused == expected

    @rule(
        ns=NAMESPACES,
        channel=channels,
        capacity=st.sampled_from([1, 2, 3, 5, 9]),
        window=st.sampled_from([0, 1, 2, 64]),
        expiry_s=EXPIRIES,
    )
    def send_reserving(
        self, ns: str, channel: str, capacity: int, window: int, expiry_s: float
    ) -> None:
        payload = self.payload()
        key = (ns, channel)
        stored = self.model.put(key, payload, capacity, expiry_s)
        expected = self.model.reserve(key, capacity, window) if stored else None
        room = self.run(
            self.backend.send_reserving(
                ns, channel, payload, capacity=capacity, expiry_s=expiry_s, window=window
            )
        )
        assert room == expected

    @rule(ns=NAMESPACES, picks=st.lists(st.integers(0, 7), max_size=4), expiry_s=EXPIRIES)
    def send_reserved(self, ns: str, picks: list[int], expiry_s: float) -> None:
        """Store into room held on the namespace's channels, as a daemon does for windowed
        SENDs (it never spends room it did not grant)."""
        items = []
        for pick in picks:
            with_room = sorted(
                key for key, room in self.model.reserved.items() if room and key[0] == ns
            )
            if not with_room:
                break
            key = with_room[pick % len(with_room)]
            self.model.reserved[key] -= 1
            payload = self.payload()
            self.model.queues.setdefault(key, []).append((self.model.now + expiry_s, payload))
            items.append((key[1], payload))
        self.run(self.backend.send_reserved(ns, items, expiry_s=expiry_s))

    @rule(
        ns=NAMESPACES,
        channel=channels,
        capacity=st.sampled_from([1, 2, 3, 5, 9]),
        window=st.sampled_from([0, 1, 2, 64]),
    )
    def reserve_room(self, ns: str, channel: str, capacity: int, window: int) -> None:
        expected = self.model.reserve((ns, channel), capacity, window)
        room = self.run(
            self.backend.reserve_room(ns, channel, capacity=capacity, window=window, size=10)
        )
        assert room == expected

    @rule(ns=NAMESPACES, channel=channels, count=st.integers(-1, 3))
    def release_room(self, ns: str, channel: str, count: int) -> None:
        if count > 0:
            room = self.model.reserved.get((ns, channel), 0)
            self.model.reserved[ns, channel] = max(0, room - count)
        self.run(self.backend.release_room(ns, channel, count))

    @rule(ns=NAMESPACES, channel=channels, limit=st.integers(1, 4), hold=st.booleans())
    def take(self, ns: str, channel: str, limit: int, hold: bool) -> None:
        expected = self.model.take((ns, channel), limit, hold)
        taken = self.run(self.backend.take(ns, channel, limit, hold=hold))
        assert [item.payload for item in taken] == expected, "FIFO, unexpired only"
        assert all(0 < item.ttl_s <= 60.0 for item in taken)

    @rule(ns=NAMESPACES, channel=channels, count=st.integers(-1, 3))
    def release(self, ns: str, channel: str, count: int) -> None:
        if count > 0:
            held = self.model.held.get((ns, channel), 0)
            self.model.held[ns, channel] = max(0, held - count)
        self.run(self.backend.release(ns, channel, count))

    @rule(ns=NAMESPACES, client=st.sampled_from(["c1", "c2", "c3"]))
    def channels_with_messages(self, ns: str, client: str) -> None:
        expected = {
            channel
            for (space, channel) in self.model.queues
            if space == ns
            and is_process_specific(channel)
            and client_id_of(channel) == client
            and self.model.live((space, channel))
        }
        found = self.run(self.backend.channels_with_messages(ns, client))
        assert sorted(found) == sorted(expected)

    # -- groups ---------------------------------------------------------------

    @rule(ns=NAMESPACES, group=groups, channel=channels, expiry_s=EXPIRIES)
    def group_add(self, ns: str, group: str, channel: str, expiry_s: float) -> None:
        members = self.model.groups.setdefault((ns, group), {})
        members.pop(channel, None)
        members[channel] = self.model.now + expiry_s
        self.run(self.backend.group_add(ns, group, channel, group_expiry_s=expiry_s))

    @rule(ns=NAMESPACES, group=groups, channel=channels)
    def group_discard(self, ns: str, group: str, channel: str) -> None:
        self.model.groups.get((ns, group), {}).pop(channel, None)
        self.run(self.backend.group_discard(ns, group, channel))

    @rule(
        ns=NAMESPACES,
        group=groups,
        capacity=CAPACITIES,
        patterned=st.booleans(),
        expiry_s=EXPIRIES,
    )
    def group_send(
        self, ns: str, group: str, capacity: int, patterned: bool, expiry_s: float
    ) -> None:
        policy = _capacity_of(capacity, patterned)
        payload = self.payload()
        members = self.model.groups.get((ns, group), {})
        delivered: list[str] = []
        skipped = 0
        for channel, deadline in list(members.items()):
            if deadline <= self.model.now:
                del members[channel]  # lapsed: dropped, neither delivered nor skipped
            elif self.model.put((ns, channel), payload, policy(channel), expiry_s):
                delivered.append(channel)
            else:
                skipped += 1
        result = self.run(
            self.backend.group_send(ns, group, payload, capacity_of=policy, expiry_s=expiry_s)
        )
        # In no order: the backend walks members by owning client (groups.py), the
        # model in the order they were added; each member's outcome is its own.
        assert (sorted(result.delivered), result.skipped) == (sorted(delivered), skipped)

    # -- namespaces -----------------------------------------------------------

    @rule(ns=NAMESPACES)
    def flush(self, ns: str) -> None:
        """Drops messages, held counts and groups; the send room senders hold stays."""
        for table in (self.model.queues, self.model.held, self.model.groups):
            for key in [key for key in table if key[0] == ns]:
                del table[key]
        self.run(self.backend.flush(ns))

    # -- invariants -----------------------------------------------------------

    @invariant()
    def what_is_alive_is_the_models(self) -> None:
        spaces = self.backend._spaces
        now = self.model.now
        for ns, space in spaces.items():
            for name, record in space.channels.items():
                alive = [payload for deadline, payload in record.queue if deadline > now]
                assert alive == self.model.live((ns, name)), (ns, name)
                assert record.held == self.model.held.get((ns, name), 0), (ns, name)
                assert record.reserved == self.model.reserved.get((ns, name), 0), (ns, name)
            for name, group in space.groups.items():
                alive_members = [
                    c
                    for m in group.owners.values()
                    for c, deadline in m.deadlines.items()
                    if deadline > now
                ]
                assert sorted(alive_members) == sorted(self.model.live_members((ns, name)))

        def kept(key: Key, table: str) -> bool:
            return key[0] in spaces and key[1] in getattr(spaces[key[0]], table)

        model = self.model
        assert not [key for key in model.queues if model.live(key) and not kept(key, "channels")]
        assert not [key for key, held in model.held.items() if held and not kept(key, "channels")]
        assert not [
            key for key, room in model.reserved.items() if room and not kept(key, "channels")
        ]
        assert not [
            key for key in model.groups if model.live_members(key) and not kept(key, "groups")
        ]

    @invariant()
    def counters_match_the_records(self) -> None:
        assert gauges(self.backend) == recount(self.backend)
        assert self.backend.stats().memory_bytes == recount_bytes(self.backend)
        check_records(self.backend)


MemoryMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=50, deadline=None)
test_memory_backend_follows_the_model = MemoryMachine.TestCase
