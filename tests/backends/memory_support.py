"""What the memory backend's tests share: its gauges counted the slow way, and the
invariants of its records (these read private state on purpose)."""

from __future__ import annotations

from backends.memory import MemoryBackend
from backends.memory.budget import CHANNEL_OVERHEAD_BYTES, MESSAGE_OVERHEAD_BYTES

__all__ = ["check_records", "gauges", "recount", "recount_bytes"]


def recount(backend: MemoryBackend) -> tuple[int, int, int, int]:
    """The gauges of ``stats()``, counted the slow way from the records."""
    spaces = list(backend._spaces.values())
    channels = [record for space in spaces for record in space.channels.values()]
    groups = [group for space in spaces for group in space.groups.values()]
    return (
        sum(1 for record in channels if record.queue),
        sum(len(record.queue) for record in channels),
        len(groups),
        sum(len(group.channels()) for group in groups),
    )


def gauges(backend: MemoryBackend) -> tuple[int, int, int, int]:
    stats = backend.stats()
    return (stats.channels_waiting, stats.messages_waiting, stats.groups, stats.memberships)


def recount_bytes(backend: MemoryBackend) -> int:
    """What ``limit_memory`` bounds (``stats().memory_bytes``), counted the slow way."""
    records = [record for space in backend._spaces.values() for record in space.channels.values()]
    return sum(
        CHANNEL_OVERHEAD_BYTES
        + sum(MESSAGE_OVERHEAD_BYTES + len(payload) for _, payload in record.queue)
        for record in records
    )


def check_records(backend: MemoryBackend) -> None:
    """Every record is filed for a sweep that will forget it once it holds nothing, or is
    held or has send room reserved (its sweep passed meanwhile, or a flush kept its room:
    the release forgets it); groups live while they have members."""
    wheel = backend._channel_wheel
    for space in backend._spaces.values():
        for record in space.channels.values():
            if record.bucket is None:
                assert not record.queue and (record.held or record.reserved), (
                    f"{record.name!r} kept, unfiled"
                )
            else:
                assert record in wheel._buckets[record.bucket]
        for group in space.groups.values():
            assert group.size == len(group.channels()) > 0, f"group {group.name!r} miscounted"
            assert all(m.deadlines for m in group.owners.values()), f"{group.name!r}: empty owner"
            assert group.bucket is not None
        by_client = {
            client: sorted(records) for client, records in space.clients.items() if records
        }
        expected: dict[str, list[str]] = {}
        for name, record in sorted(space.channels.items()):
            if record.client is not None:
                expected.setdefault(record.client, []).append(name)
        assert by_client == expected
        assert all(space.clients.values()), "empty client entries kept"
