"""The Redis backend: one Redis, Sentinel or Cluster shared by several daemons."""

from __future__ import annotations

from .backend import RedisBackend

__all__ = ["RedisBackend"]
