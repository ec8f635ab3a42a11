"""The C allocator's settings for a long-lived daemon.

glibc serves a large block from its heap once a block of that size has been freed (its
mmap threshold rises to the largest freed block, up to 32 MiB). After one client sends
an 8 MiB frame, every later frame buffer then comes from the heap, whose top is rarely
free, so the daemon's memory never goes back down. A fixed threshold keeps buffers of
128 KiB and more in their own mappings, returned to the system when freed, for the cost
of a system call per large buffer.
"""

from __future__ import annotations

import ctypes
import logging

__all__ = ["MMAP_THRESHOLD_BYTES", "pin_mmap_threshold"]

log = logging.getLogger("channels_broker.malloc")

#: glibc's own starting value: frames and messages above it get their own mapping.
MMAP_THRESHOLD_BYTES = 128 * 1024
#: mallopt's parameter number for the threshold (glibc's M_MMAP_THRESHOLD).
_M_MMAP_THRESHOLD = -3


def pin_mmap_threshold(threshold_bytes: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold; False where there is no glibc ``mallopt`` (musl, macOS)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    pinned = bool(mallopt(_M_MMAP_THRESHOLD, threshold_bytes))
    if not pinned:
        log.debug("mallopt refused the mmap threshold; memory may be returned later")
    return pinned
