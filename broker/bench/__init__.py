"""``channels-broker bench``: channels-broker side by side with other Channels layers."""

from __future__ import annotations

from .runner import bench

__all__ = ["bench"]
