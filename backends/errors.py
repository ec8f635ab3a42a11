"""The errors a backend raises: driver exceptions never leave a backend untranslated."""

from __future__ import annotations

__all__ = ["BackendError", "BackendUnavailable", "UnknownBackend"]


class BackendError(Exception):
    """A storage operation failed. Driver exceptions are translated to this family."""


class BackendUnavailable(BackendError):
    """The storage cannot be reached right now; the operation may be retried."""


class UnknownBackend(BackendError):
    """The URL names no backend this build has."""
