"""The in-memory backend: the daemon's default, storage in the daemon's own process."""

from __future__ import annotations

from .backend import DEFAULT_TICK_S, MemoryBackend
from .state import Restored
from .state_file import State, StateFileError, read_state_file, write_state_file

__all__ = [
    "DEFAULT_TICK_S",
    "MemoryBackend",
    "Restored",
    "State",
    "StateFileError",
    "read_state_file",
    "write_state_file",
]
