"""The Channels layer: what runs inside every Django process (``CHANNEL_LAYERS`` BACKEND
``broker.layer.BrokerChannelLayer``). It imports ``protocol``, Channels and asgiref only."""

from __future__ import annotations

from .channel_layer import BrokerChannelLayer
from .encryption import UndecryptableMessage
from .errors import (
    BrokerCertificateNotTrusted,
    BrokerConnectionRefused,
    BrokerHostnameMismatch,
    BrokerNameNotResolved,
    BrokerTimeout,
    BrokerTLSError,
    BrokerUnavailable,
    LayerClosed,
    MessageTooLarge,
    OverLimit,
    UnserializableMessage,
)
from .problems import LayerConfigError

__all__ = [
    "BrokerCertificateNotTrusted",
    "BrokerChannelLayer",
    "BrokerConnectionRefused",
    "BrokerHostnameMismatch",
    "BrokerNameNotResolved",
    "BrokerTLSError",
    "BrokerTimeout",
    "BrokerUnavailable",
    "LayerClosed",
    "LayerConfigError",
    "MessageTooLarge",
    "OverLimit",
    "UndecryptableMessage",
    "UnserializableMessage",
]
