"""The in-memory backend: the daemon's default, storage in the daemon's own process."""

from __future__ import annotations

from .backend import DEFAULT_TICK_S, MemoryBackend

__all__ = ["DEFAULT_TICK_S", "MemoryBackend"]
