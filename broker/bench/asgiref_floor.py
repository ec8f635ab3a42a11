"""asgiref's own floor for the sync idiom: ``async_to_sync(group_send)`` on Channels'
InMemoryChannelLayer, measured in the same run as the ``sync`` scenario. That layer does
no I/O, so what it costs is ``async_to_sync`` itself (a new event loop per call): a layer
at 1.0x of it adds nothing a sync caller can see."""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping

from .layers import Opened, Settings
from .scenarios import sync_group_send

__all__ = ["SYNC_SCENARIO", "asgiref_floor_note"]

SYNC_SCENARIO = "sync"


def floor_calls_per_s(settings: Settings) -> float:
    """Calls/s of ``async_to_sync(InMemoryChannelLayer().group_send)``, on a thread with
    no event loop, exactly as the ``sync`` scenario calls ours."""
    from channels.layers import InMemoryChannelLayer  # channels is optional here

    return sync_group_send(Opened(InMemoryChannelLayer), settings)[0]


def asgiref_floor_note(settings: Settings, sync_results: Mapping[str, float]) -> str:
    """One line: the floor, and each of our targets' ``sync`` calls/s against it.
    ``sync_results``: calls/s by target name, of the targets that measured it."""
    if importlib.util.find_spec("channels") is None:
        return "asgiref floor omitted: channels is not installed (pip install channels)"
    floor = floor_calls_per_s(settings)
    ratios = ", ".join(f"{name} {rate / floor:.2f}x" for name, rate in sync_results.items())
    return (
        f"asgiref floor, async_to_sync(InMemoryChannelLayer.group_send): {floor:,.0f} calls/s"
        f"{'; sync group_send against it: ' + ratios if ratios else ''}"
    )
