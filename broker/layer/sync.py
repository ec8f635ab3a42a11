"""Blocking ``send``, ``group_send`` and ``send_many`` for plain sync code: Django views,
management commands, Celery tasks. No event loop: each thread has its own blocking
socket to the daemon (``broker.layer.blocking``).

Use::

    from broker.layer import sync

    sync.group_send(f"notification-{user.pk}", {"type": "task.notification", "data": data})

Each call takes the layer of ``CHANNEL_LAYERS[alias]`` (``"default"`` unless given), as
``get_channel_layer`` does, and speaks with its settings: hosts (failover among them),
token, prefix, capacity patterns, TLS, and ``symmetric_encryption_keys``, so a message
sent here is the one the layer's own ``send`` would have sent, and a consumer cannot tell
them apart. The errors are the layer's: ``ChannelFull``, ``MessageTooLarge``,
``BrokerUnavailable``. When ``CHANNEL_LAYERS[alias]`` is another layer (the
``InMemoryChannelLayer`` of a test settings file), each call goes through
``async_to_sync`` instead, so code written with this module runs there as well.

Threads and processes. A thread opens its connection on its first call and keeps it
until it ends (or calls ``close()``); a process made by ``fork()`` (a Celery or
gunicorn worker) opens its own on its first call and never writes to its parent's.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable
from typing import Any, Protocol

from asgiref.sync import async_to_sync
from channels import DEFAULT_CHANNEL_LAYER
from channels.exceptions import ChannelFull, InvalidChannelLayerError
from channels.layers import channel_layers

from .channel_layer import BrokerChannelLayer
from .sync_calls import SEND_MANY_BATCH, SyncLayer

__all__ = [
    "SEND_MANY_BATCH",
    "SyncLayer",
    "close",
    "group_add",
    "group_discard",
    "group_send",
    "layer_for",
    "send",
    "send_many",
]


class Calls(Protocol):
    """The blocking calls of one layer: ``SyncLayer``, or ``async_to_sync`` of another."""

    def send(self, channel: str, message: dict[str, Any]) -> None: ...
    def group_send(self, group: str, message: dict[str, Any]) -> None: ...
    def send_many(self, messages: Iterable[tuple[str, dict[str, Any]]]) -> list[int]: ...
    def group_add(self, group: str, channel: str) -> None: ...
    def group_discard(self, group: str, channel: str) -> None: ...
    def close(self) -> None: ...


class _AsyncToSync:
    """The same calls for a layer that is not ours, through ``async_to_sync``."""

    def __init__(self, layer: Any) -> None:
        self.layer = layer

    def send(self, channel: str, message: dict[str, Any]) -> None:
        async_to_sync(self.layer.send)(channel, message)

    def group_send(self, group: str, message: dict[str, Any]) -> None:
        async_to_sync(self.layer.group_send)(group, message)

    def send_many(self, messages: Iterable[tuple[str, dict[str, Any]]]) -> list[int]:
        refused = []
        for index, (channel, message) in enumerate(messages):
            try:
                async_to_sync(self.layer.send)(channel, message)
            except ChannelFull:
                refused.append(index)
        return refused

    def group_add(self, group: str, channel: str) -> None:
        async_to_sync(self.layer.group_add)(group, channel)

    def group_discard(self, group: str, channel: str) -> None:
        async_to_sync(self.layer.group_discard)(group, channel)

    def close(self) -> None:
        """Nothing: ``async_to_sync`` leaves no connection of ours open."""


_sync_layers: weakref.WeakKeyDictionary[BrokerChannelLayer, SyncLayer] = weakref.WeakKeyDictionary()
_sync_layers_lock = threading.Lock()


def layer_for(layer: Any) -> Calls:
    """The blocking calls of ``layer``: the ``SyncLayer`` of a ``BrokerChannelLayer``
    (one per layer instance), ``async_to_sync`` of its methods for any other layer."""
    if not isinstance(layer, BrokerChannelLayer):
        return _AsyncToSync(layer)
    found = _sync_layers.get(layer)
    if found is None:
        with _sync_layers_lock:
            found = _sync_layers.get(layer)
            if found is None:
                found = _sync_layers[layer] = SyncLayer(layer)
    return found


def _calls(alias: str) -> Calls:
    try:
        layer = channel_layers[alias]
    except KeyError:
        raise InvalidChannelLayerError(f"CHANNEL_LAYERS has no {alias!r} layer") from None
    return layer_for(layer)


def send(channel: str, message: dict[str, Any], *, alias: str = DEFAULT_CHANNEL_LAYER) -> None:
    """Send ``message`` to ``channel``; ``ChannelFull`` if it is at capacity,
    ``MessageTooLarge`` before sending one over the daemon's limit, a
    ``BrokerUnavailable`` saying why if no daemon answers (at once, or after up to
    ``connect_timeout`` if it was alive a moment ago: a restart)."""
    _calls(alias).send(channel, message)


def group_send(group: str, message: dict[str, Any], *, alias: str = DEFAULT_CHANNEL_LAYER) -> None:
    """Send ``message`` to every member of ``group``; members at capacity are skipped.
    Raises as ``send`` does, but never ``ChannelFull``."""
    _calls(alias).group_send(group, message)


def send_many(
    messages: Iterable[tuple[str, dict[str, Any]]], *, alias: str = DEFAULT_CHANNEL_LAYER
) -> list[int]:
    """Send each (channel, message) in order, a few hundred per round trip; return the
    indexes of the messages refused because their channel was full."""
    return _calls(alias).send_many(messages)


def group_add(group: str, channel: str, *, alias: str = DEFAULT_CHANNEL_LAYER) -> None:
    """Add ``channel`` to ``group``, as the layer's ``group_add``."""
    _calls(alias).group_add(group, channel)


def group_discard(group: str, channel: str, *, alias: str = DEFAULT_CHANNEL_LAYER) -> None:
    """Remove ``channel`` from ``group``, as the layer's ``group_discard``."""
    _calls(alias).group_discard(group, channel)


def close(*, alias: str = DEFAULT_CHANNEL_LAYER) -> None:
    """Close this thread's connection for ``alias`` (a thread that ends closes its own)."""
    _calls(alias).close()
