"""The daemon: listeners, connections, the handlers of each request, routing and sessions."""

from __future__ import annotations

from .server import Server

__all__ = ["Server"]
