"""The PostgreSQL backend: one database shared by several daemons."""

from __future__ import annotations

from .backend import PostgresBackend

__all__ = ["PostgresBackend"]
