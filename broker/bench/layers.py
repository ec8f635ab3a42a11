"""What the bench asks of a Channels layer, and how it describes a layer under test."""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = [
    "CAPACITY",
    "EXPIRY_S",
    "ChannelLayer",
    "LayerFactory",
    "LayerSpec",
    "Note",
    "Opened",
    "Settings",
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
class LayerSpec:
    """A layer class by import path (``module:Class``) and its keyword arguments: a
    ``LayerFactory`` that another process can rebuild from its two plain fields."""

    path: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __call__(self) -> ChannelLayer:
        module, _, name = self.path.partition(":")
        layer: ChannelLayer = getattr(importlib.import_module(module), name)(**self.kwargs)
        return layer


@dataclass(frozen=True, slots=True)
class Opened:
    """What an opened target gives the scenarios."""

    factory: LayerFactory
    #: The server process (our daemon, redis-server, nats-server), for its CPU and RSS.
    server_pid: int | None = None
    #: Our daemon on ``memory://``: starts another one like it, fresh, for the memory
    #: scenario (the RSS of a daemon that served other scenarios stays where they left it).
    fresh_memory_daemon: Callable[[], contextlib.AbstractContextManager[Opened]] | None = None


@dataclass(frozen=True, slots=True)
class Settings:
    """What the command line says about sizes: ``scale`` multiplies message and call
    counts; the big room and the memory scenario have sizes of their own."""

    scale: float = 1.0
    room_channels: int = 10_000
    room_processes: int = 8
    room_sends: int = 20
    memory_scale: float = 0.01


@dataclass(frozen=True, slots=True)
class Target:
    """A layer under test; ``open`` brings up what it needs (a daemon) and yields it."""

    name: str
    open: Callable[[Note], contextlib.AbstractContextManager[Opened]]
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
