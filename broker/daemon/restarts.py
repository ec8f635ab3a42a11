"""What a restart of a daemon on memory:// keeps: the store's incarnation, and ``--state-file``.

A memory store lives in the daemon's process. Each start that begins empty names its
store anew (a random incarnation, which WELCOME carries), so a layer that reconnects
sees that what it left in the old store is gone (it re-adds its memberships and says
so). With ``--state-file``, SIGTERM writes the waiting messages and memberships to the
file (after the connections closed: nothing changes meanwhile), and the next start
reads them back under the same incarnation, so its clients see one store that was away.
The file is renamed ``<file>.loaded`` once read, so a crash later does not put the
same messages back a second time. Shared stores (Redis, PostgreSQL) keep their own
state: their incarnation is "" and a state file is refused (``Config``).
"""

from __future__ import annotations

import logging
import os
import secrets
import time

from backends.memory import (
    MemoryBackend,
    State,
    StateFileError,
    read_state_file,
    write_state_file,
)
from broker.config import Config
from broker.errors import ConfigError
from broker.ops.metrics import Metrics

__all__ = ["LOADED_SUFFIX", "restore_store", "save_store"]

log = logging.getLogger("channels_broker.server")

#: What a state file is renamed to once read: kept for the operator, never read again.
LOADED_SUFFIX = ".loaded"


async def restore_store(memory: MemoryBackend | None, config: Config, metrics: Metrics) -> str:
    """The store's incarnation: "" for a shared store; for memory://, that of the state
    file read back (``ConfigError`` naming it if it cannot be), or a new one."""
    if memory is None:
        return ""
    path = config.state_file
    state = _read(path) if path else None
    if state is None:
        metrics.store_started_empty = 1
        incarnation = secrets.token_hex(8)
        log.info("memory store %s starts empty%s", incarnation, _no_file(path))
        return incarnation
    restored = await memory.import_state(state, time.time())
    metrics.store_started_empty = 0
    metrics.store_restored.update(
        messages=restored.messages, memberships=restored.memberships, expired=restored.expired
    )
    log.info(
        "memory store %s read back from %s: %d messages, %d memberships (%d expired while"
        " the daemon was down)",
        state.incarnation,
        path,
        restored.messages,
        restored.memberships,
        restored.expired,
    )
    return state.incarnation


def _read(path: str) -> State | None:
    """The state in ``path``, which is then renamed ``.loaded``; None if there is none.
    ``ConfigError`` if it cannot be read or renamed, or could not be written at stop."""
    if not os.access(os.path.dirname(os.path.abspath(path)), os.W_OK):
        # Found now, not at SIGTERM, when the store would be lost for it.
        message = f"cannot write {path}: its directory does not exist or is not ours"
        raise ConfigError(message, "state-file")
    try:
        state = read_state_file(path)
        if state is not None:
            os.replace(path, path + LOADED_SUFFIX)
    except (StateFileError, OSError) as exc:
        reason = exc if isinstance(exc, StateFileError) else f"cannot rename {path}: {exc}"
        raise ConfigError(
            f"{reason}: the daemon does not start empty over it; move it away to start"
            " empty (what it holds is then lost)",
            "state-file",
        ) from exc
    return state


def _no_file(path: str | None) -> str:
    if path is None:
        return " (no --state-file: a restart loses what it holds)"
    return f" ({path} does not exist)"


def save_store(memory: MemoryBackend | None, config: Config, incarnation: str) -> None:
    """At the end of shutdown: write the store to ``--state-file``, or say what is lost."""
    if memory is None:
        return
    path = config.state_file
    if path is None:
        stats = memory.stats()
        if stats.messages_waiting or stats.memberships:
            log.warning(
                "memory store %s is lost with this daemon: %d waiting messages, %d group"
                " memberships (run with --state-file to keep them across a restart)",
                incarnation,
                stats.messages_waiting,
                stats.memberships,
            )
        return
    state = memory.export_state(incarnation, time.time())
    try:
        write_state_file(path, state)
    except StateFileError as exc:
        log.error("%s: %d waiting messages are lost", exc, state.message_count)
        return
    log.info(
        "memory store %s written to %s: %d messages, %d memberships",
        incarnation,
        path,
        state.message_count,
        state.membership_count,
    )
