"""The memory backend's URL: ``memory://`` and nothing else."""

from __future__ import annotations

from urllib.parse import urlsplit

from ..errors import BackendError
from ..urls import redacted_url

__all__ = ["check_url"]


def check_url(url: str) -> None:
    """Accept ``memory://`` (a trailing ``/`` is fine); raise ``BackendError`` otherwise.

    It takes no options: the daemon bounds its memory with ``--max-memory``
    (``MemoryBackend.limit_memory``).
    """
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise BackendError(f"bad backend URL {redacted_url(url)!r}: {exc}") from exc
    if parts.scheme != "memory":
        raise BackendError(f"not a memory:// URL: {redacted_url(url)!r}")
    if parts.netloc or parts.path not in ("", "/") or parts.query or parts.fragment:
        raise BackendError(f"memory:// takes no host, path or options: {redacted_url(url)!r}")
