"""The Channels layer: what runs inside every Django process (``CHANNEL_LAYERS`` BACKEND
``broker.layer.BrokerChannelLayer``). It imports ``protocol``, Channels and asgiref only."""

from __future__ import annotations

from .channel_layer import BrokerChannelLayer
from .encryption import UndecryptableMessage
from .errors import BrokerTLSError, BrokerUnavailable, LayerClosed, MessageTooLarge, OverLimit
from .problems import LayerConfigError

__all__ = [
    "BrokerChannelLayer",
    "BrokerTLSError",
    "BrokerUnavailable",
    "LayerClosed",
    "LayerConfigError",
    "MessageTooLarge",
    "OverLimit",
    "UndecryptableMessage",
]
