"""The connection handshake as one transition table, for both ends.

Rules: the client's first frame is HELLO and it sends HELLO only once; the daemon's
first frame is WELCOME (or a connection-level ERROR). Everything else flows only
after that.

Once the handshake is over, an end need show it only the handshake's own frames
(``HANDSHAKE_FRAMES``, to refuse a second one): ``is_ready`` says when, so the frames
of every request skip the table.
"""

from __future__ import annotations

from enum import Enum

from .errors import ErrorCode, HandshakeError
from .frames import Error, Frame, Hello, Welcome

__all__ = [
    "HANDSHAKE_FRAMES",
    "PROTOCOL_VERSION",
    "SUPPORTED_VERSIONS",
    "FANOUT_VERSION",
    "NUMBERED_GROUP_SEND_VERSION",
    "Handshake",
    "Role",
    "State",
]

#: The version this code speaks; a daemon refuses HELLO with a version it does not support.
PROTOCOL_VERSION = 3
#: The first version whose client takes group fan-outs (``Push.fanout_capacity``); a
#: client of version 1 gets a PUSH per stored message, as before.
FANOUT_VERSION = 2
#: The first version that numbers GROUP_SENDs (``GroupSend.seq``). A daemon that can keep
#: their numbers answers WELCOME with it; one that cannot (or is older) with 2 or less,
#: and the client sends GROUP_SENDs as requests, unnumbered, as before.
NUMBERED_GROUP_SEND_VERSION = 3
SUPPORTED_VERSIONS = frozenset({1, FANOUT_VERSION, NUMBERED_GROUP_SEND_VERSION})
#: The frames of the handshake itself: the only ones it must see once it is over.
HANDSHAKE_FRAMES: frozenset[type[Frame]] = frozenset({Hello, Welcome})


class Role(Enum):
    CLIENT = "client"
    DAEMON = "daemon"


class State(Enum):
    AWAIT_HELLO = "await-hello"  # daemon: nothing received yet
    AWAIT_WELCOME = "await-welcome"  # client: HELLO sent, no answer yet
    READY = "ready"
    CLOSED = "closed"


# (role, state, frame type) -> next state. Anything absent is a handshake error;
# frames of other types in READY keep the state.
_TRANSITIONS: dict[tuple[Role, State, type[Frame]], State] = {
    (Role.DAEMON, State.AWAIT_HELLO, Hello): State.READY,
    (Role.CLIENT, State.AWAIT_WELCOME, Welcome): State.READY,
    (Role.CLIENT, State.AWAIT_WELCOME, Error): State.CLOSED,
}


class Handshake:
    """Tracks one end's handshake state for the frames it receives."""

    __slots__ = ("is_ready", "role", "state")

    def __init__(self, role: Role) -> None:
        self.role = role
        self.state = State.AWAIT_HELLO if role is Role.DAEMON else State.AWAIT_WELCOME
        #: True once READY: later frames need showing only if in ``HANDSHAKE_FRAMES``.
        self.is_ready = False

    def resume(self) -> None:
        """Take up a connection another end of ours already took through the handshake."""
        self.state = State.READY
        self.is_ready = True

    def receive(self, frame: Frame) -> None:
        """Advance on a received frame; raise ``HandshakeError`` if it is out of order."""
        if self.state is State.READY:
            if type(frame) in HANDSHAKE_FRAMES:
                raise HandshakeError(f"{type(frame).__name__} after the handshake")
            return
        next_state = _TRANSITIONS.get((self.role, self.state, type(frame)))
        if next_state is None:
            raise HandshakeError(
                f"{type(frame).__name__} is not allowed in state {self.state.value}",
                ErrorCode.HANDSHAKE,
            )
        self.state = next_state
        self.is_ready = next_state is State.READY
