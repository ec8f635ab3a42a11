"""What the bench asks of a Channels layer, and how it describes a layer under test."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = [
    "CAPACITY",
    "EXPIRY_S",
    "ChannelLayer",
    "LayerFactory",
    "Note",
    "Target",
    "close_layer",
    "flush",
]

#: Large enough that no scenario meets ChannelFull: we measure speed, not back-pressure.
CAPACITY = 100_000
#: Channels' default message expiry.
EXPIRY_S = 60


class ChannelLayer(Protocol):
    """The Channels layer API the scenarios use; ``close`` is optional (see ``close_layer``)."""

    async def send(self, channel: str, message: dict[str, Any]) -> None: ...
    async def receive(self, channel: str) -> dict[str, Any]: ...
    async def new_channel(self) -> str: ...
    async def group_add(self, group: str, channel: str) -> None: ...
    async def group_discard(self, group: str, channel: str) -> None: ...
    async def group_send(self, group: str, message: dict[str, Any]) -> None: ...
    async def flush(self) -> None: ...


#: Each call makes a new, separate instance: a new connection, as another process would have.
LayerFactory = Callable[[], ChannelLayer]
#: Takes one line for the notes printed under the table.
Note = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class Target:
    """A layer under test; ``open`` brings up what it needs (a daemon) and yields its factory."""

    name: str
    open: Callable[[Note], contextlib.AbstractContextManager[LayerFactory]]
    is_ours: bool


async def close_layer(layer: object) -> None:
    """Close by ``close()``, or ``close_pools()`` for channels_redis, which has no ``close``."""
    close = getattr(layer, "close", None) or getattr(layer, "close_pools", None)
    if close is not None:
        await close()


async def flush(factory: LayerFactory) -> None:
    layer = factory()
    try:
        await layer.flush()
    finally:
        await close_layer(layer)
