"""The memory backend's state on disk (``--state-file``): its format, written and read.

The file is one msgpack map: ``format`` (says what the file is), ``version``,
``written_at`` (wall-clock seconds, so the time the daemon was down counts against every
expiry), ``incarnation`` (the store's name, which the next start keeps: its clients then
see the same store), and ``spaces``: per namespace, its channels with their waiting
messages (seconds left, payload) oldest first, and its groups with their members
(seconds left). Messages pushed and not yet acknowledged are in it as waiting ones: the
daemon's connections gave them back as they closed, before the file is written, and the
layer that reconnects drops a copy of one it had already (docs/flow.md).

Writing is atomic: a temporary file beside it, fsync'd, renamed over it, and the
directory fsync'd, so a crash while writing leaves the previous file or the new one,
never half of one. A file that is not ours, of another version, or damaged, is refused
with ``StateFileError`` naming it: starting empty would lose what it holds without a word.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import msgpack

from ..errors import BackendError

__all__ = [
    "FORMAT",
    "VERSION",
    "Messages",
    "Members",
    "SpaceState",
    "State",
    "StateFileError",
    "read_state_file",
    "write_state_file",
]

#: What the file says it is: a file of something else is refused, not read as empty.
FORMAT = "channels-broker memory state"
#: Bumped when the layout changes; a daemon reads only its own version.
VERSION = 1

#: A channel's waiting messages: (seconds left, payload), oldest first.
Messages = list[tuple[float, bytes]]
#: A group's members: (channel, seconds left), in the order they were added.
Members = list[tuple[str, float]]


class StateFileError(BackendError):
    """The state file cannot be read or written; the message names it and says why."""


@dataclass(slots=True)
class SpaceState:
    """One namespace: its channels' waiting messages and its groups' members."""

    channels: dict[str, Messages] = field(default_factory=dict)
    groups: dict[str, Members] = field(default_factory=dict)


@dataclass(slots=True)
class State:
    """What a memory store holds, with times as seconds left at ``written_at``."""

    incarnation: str
    written_at: float
    spaces: dict[str, SpaceState] = field(default_factory=dict)

    @property
    def message_count(self) -> int:
        return sum(len(m) for s in self.spaces.values() for m in s.channels.values())

    @property
    def membership_count(self) -> int:
        return sum(len(m) for s in self.spaces.values() for m in s.groups.values())


def write_state_file(path: str, state: State) -> None:
    """Write ``state`` to ``path`` atomically (temporary file, fsync, rename)."""
    document = {
        "format": FORMAT,
        "version": VERSION,
        "written_at": state.written_at,
        "incarnation": state.incarnation,
        "spaces": {
            ns: {"channels": space.channels, "groups": space.groups}
            for ns, space in state.spaces.items()
        },
    }
    data = msgpack.packb(document, use_bin_type=True)
    temporary = f"{path}.tmp"
    try:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
        _sync_directory(path)
    except OSError as exc:
        raise StateFileError(f"cannot write the state file {path}: {exc.strerror}") from exc


def _sync_directory(path: str) -> None:
    """Make the rename itself durable (the directory entry), where the system allows."""
    descriptor = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def read_state_file(path: str) -> State | None:
    """The state in ``path``; None if there is no such file. ``StateFileError`` if it
    cannot be read, is not a state file, is of another version, or is damaged."""
    try:
        with open(path, "rb") as file:
            data = file.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateFileError(f"cannot read the state file {path}: {exc.strerror}") from exc
    try:
        document = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise StateFileError(f"{path} is not a channels-broker state file ({exc})") from exc
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise StateFileError(f"{path} is not a channels-broker state file")
    if document.get("version") != VERSION:
        version = document.get("version")
        raise StateFileError(
            f"{path} is a state file of version {version!r}; this daemon reads version"
            f" {VERSION} only"
        )
    try:
        return _state_of(document)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise StateFileError(f"{path} is a damaged state file ({exc})") from exc


def _state_of(document: dict[str, Any]) -> State:
    incarnation, written_at = document["incarnation"], document["written_at"]
    if type(incarnation) is not str or type(written_at) not in (int, float):
        raise ValueError("bad incarnation or written_at")
    state = State(incarnation, float(written_at))
    for ns, space in document["spaces"].items():
        state.spaces[_text(ns)] = SpaceState(
            {_text(name): _messages(items) for name, items in space["channels"].items()},
            {_text(name): _members(items) for name, items in space["groups"].items()},
        )
    return state


def _text(value: object) -> str:
    if type(value) is not str:
        raise ValueError(f"a name must be a str, not {type(value).__name__}")
    return value


def _seconds(value: object) -> float:
    if type(value) not in (int, float):
        raise ValueError(f"seconds left must be a number, not {type(value).__name__}")
    return float(value)  # type: ignore[arg-type]


def _messages(items: list[Any]) -> Messages:
    messages: Messages = []
    for left_s, payload in items:
        if type(payload) is not bytes:
            raise ValueError(f"a payload must be bytes, not {type(payload).__name__}")
        messages.append((_seconds(left_s), payload))
    return messages


def _members(items: list[Any]) -> Members:
    return [(_text(channel), _seconds(left_s)) for channel, left_s in items]
