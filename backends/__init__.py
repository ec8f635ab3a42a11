"""Storage backends of channels-broker, chosen by URL scheme and imported lazily."""

from __future__ import annotations

import importlib
from urllib.parse import urlsplit

from .base import Backend, CapacityOf, WakeupCallback
from .consumer_leases import LeasesToConsumers, RenewsLeases
from .direct import AcceptsDirectPushes, DirectPushes
from .errors import BackendError, BackendUnavailable, UnknownBackend
from .fanout import EdgeOwner, EdgeOwners, FanOutLease, FansOutAtTheEdge, LeasesFanOuts
from .records import BackendStats, GroupSendResult, Taken
from .room import ALREADY_STORED, SEQ_SPAN, RecordsSeqs, ReservesRoom, room_to_grant
from .urls import redacted_url

__all__ = [
    "ALREADY_STORED",
    "SEQ_SPAN",
    "BACKENDS",
    "AcceptsDirectPushes",
    "Backend",
    "BackendError",
    "BackendStats",
    "BackendUnavailable",
    "CapacityOf",
    "DirectPushes",
    "EdgeOwner",
    "EdgeOwners",
    "FanOutLease",
    "FansOutAtTheEdge",
    "GroupSendResult",
    "LeasesFanOuts",
    "LeasesToConsumers",
    "RenewsLeases",
    "RecordsSeqs",
    "ReservesRoom",
    "Taken",
    "UnknownBackend",
    "WakeupCallback",
    "backend_from_url",
    "redacted_url",
    "room_to_grant",
]

#: URL scheme -> "module:Class". Imported on use, so memory:// never loads a driver.
BACKENDS: dict[str, str] = {
    "memory": "backends.memory:MemoryBackend",
    "redis": "backends.redis:RedisBackend",
    "rediss": "backends.redis:RedisBackend",
    "redis+unix": "backends.redis:RedisBackend",
    "redis+sentinel": "backends.redis:RedisBackend",
    "rediss+sentinel": "backends.redis:RedisBackend",
    "redis+cluster": "backends.redis:RedisBackend",
    "rediss+cluster": "backends.redis:RedisBackend",
    "postgresql": "backends.postgres:PostgresBackend",
    "postgres": "backends.postgres:PostgresBackend",
}


def backend_from_url(url: str) -> Backend:
    """Create (not connect) the backend for ``url``; raise ``UnknownBackend`` for a scheme
    we do not have, ``BackendError`` for a URL its backend refuses."""
    try:
        scheme = urlsplit(url).scheme
    except ValueError as exc:  # "Invalid IPv6 URL" and the like
        raise BackendError(f"bad backend URL {redacted_url(url)!r}: {exc}") from exc
    target = BACKENDS.get(scheme)
    if target is None:
        known = ", ".join(f"{name}://" for name in sorted(BACKENDS))
        raise UnknownBackend(
            f"unknown backend {redacted_url(url)!r}: supported schemes are {known}"
        )
    module_name, _, class_name = target.partition(":")
    backend_class: type[Backend] = getattr(importlib.import_module(module_name), class_name)
    return backend_class.from_url(url)
