"""The sync-native scenario: ``group_send`` from plain sync code through
``broker.layer.sync`` (a blocking socket per thread, no event loop). A layer that is not
ours goes through ``async_to_sync`` there, so its row is what that layer gives sync code."""

from __future__ import annotations

import time

from .harness import scaled
from .layers import Opened, Settings, close_layer

__all__ = ["sync_native_group_send"]

SYNC_NATIVE_CALLS = 5000
#: The calls stop sooner past this: a reference through async_to_sync is ~30x slower.
SYNC_NATIVE_BUDGET_S = 5.0
SYNC_NATIVE_GROUP = "bench-sync-native"


def sync_native_group_send(opened: Opened, settings: Settings) -> list[float]:
    """Calls per second, from the calling thread (no event loop runs in it)."""
    from asgiref.sync import async_to_sync

    from broker.layer.sync import layer_for

    layer, scale = opened.factory(), settings.scale
    calls = layer_for(layer)
    try:
        calls.group_send(SYNC_NATIVE_GROUP, {"type": "x"})  # untimed: it connects
        started = time.perf_counter()
        deadline, done = started + SYNC_NATIVE_BUDGET_S * scale, 0
        while done < scaled(SYNC_NATIVE_CALLS, scale) and time.perf_counter() < deadline:
            calls.group_send(SYNC_NATIVE_GROUP, {"type": "x"})
            done += 1
        elapsed_s = time.perf_counter() - started
    finally:
        calls.close()
        async_to_sync(close_layer)(layer)
    return [done / elapsed_s]
