"""Operations: metrics, health, systemd notification, logs, and ``status``/``top``."""

from __future__ import annotations

__all__: list[str] = []
