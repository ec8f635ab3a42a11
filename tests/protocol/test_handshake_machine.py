"""The handshake of both ends against a model, as a hypothesis state machine.

Connections are a client end and a daemon end wired in memory through the codec: a rule
makes an end send any frame (what a buggy or hostile peer may do), another delivers the
bytes in flight in pieces of any size, and the receiving end decodes them and shows each
frame to its ``Handshake`` in order, the way the daemon's connection and the layer's
client do. The model is the rule list of ``protocol/handshake.py`` written out again:

* the daemon takes HELLO first and only once; anything else first, or a second HELLO or a
  WELCOME later, is refused;
* the client takes WELCOME (ready) or ERROR (closed) first; anything else first, a
  handshake frame once ready, and any frame once closed, is refused.

A refused frame leaves the state as it was, and its connection is closed (no more rules
on it). Invariants: each end is in the model's state, ``is_ready`` says READY, and the
bytes in flight and in the decoder are exactly the frames not yet shown (each comes out
as it went in).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule

from protocol import (
    FRAME_TYPES,
    PROTOCOL_VERSION,
    Error,
    ErrorCode,
    Frame,
    FrameDecoder,
    Handshake,
    HandshakeError,
    Hello,
    Role,
    Welcome,
    encode_frame,
)
from protocol.frames import frame_from_wire
from protocol.handshake import State

_VALUES: dict[str, object] = {
    "int": 3,
    "str": "x",
    "bytes": b"",
    "bool": True,
    "float": 0.5,
    "tuple[str, ...]": ("x",),
    "tuple[int, ...]": (1,),
    "tuple[tuple[str, int], ...]": (("x", 1),),
    "tuple[tuple[str, bytes], ...]": (("x", b"x"),),
    "tuple[tuple[str, str], ...]": (("x", "1.1"),),
}
#: The frames of the handshake (and ERROR, which may end it), in a few variants...
HANDSHAKE_FRAMES = [
    Hello(PROTOCOL_VERSION, "", "", "site", 100, 60, 86400),
    Hello(PROTOCOL_VERSION, "t", "ab12cd34", "site", 1, 0, 0, (("^a", 2),)),
    Welcome(PROTOCOL_VERSION, "ab12cd34", 1024, "channels-broker"),
    Error(0, ErrorCode.AUTH_FAILED, "invalid token"),
    Error(7, ErrorCode.CHANNEL_FULL, "full"),
]
#: ...half the time; else one frame of any type.
FRAMES = st.sampled_from(HANDSHAKE_FRAMES) | st.sampled_from(
    [
        frame_from_wire((cls.TYPE, *(_VALUES[str(f.type)] for f in fields(cls))))
        for cls in FRAME_TYPES.values()
    ]
)
_HANDSHAKE_TYPES = (Hello, Welcome)


def expected_state(role: Role, state: State, frame: Frame) -> State | None:
    """The state after ``frame``, or None if the end must refuse it."""
    kind = type(frame)
    if state is State.READY:
        return None if kind in _HANDSHAKE_TYPES else State.READY
    if role is Role.DAEMON:
        return State.READY if state is State.AWAIT_HELLO and kind is Hello else None
    if state is State.AWAIT_WELCOME:
        return {Welcome: State.READY, Error: State.CLOSED}.get(kind)
    return None  # a closed client takes nothing


@dataclass
class End:
    """One side of a connection: what it received through, and the model's state."""

    role: Role
    handshake: Handshake = field(init=False)
    model: State = field(init=False)
    decoder: FrameDecoder = field(default_factory=FrameDecoder)
    #: Bytes sent to this end and not yet delivered, and the frames they carry.
    in_flight: bytearray = field(default_factory=bytearray)
    expected: list[Frame] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.handshake = Handshake(self.role)
        self.model = self.handshake.state


@dataclass
class Connection:
    client: End = field(default_factory=lambda: End(Role.CLIENT))
    daemon: End = field(default_factory=lambda: End(Role.DAEMON))
    closed: bool = False


class HandshakeMachine(RuleBasedStateMachine):
    connections = Bundle("connections")

    def __init__(self) -> None:
        super().__init__()
        self.all: list[Connection] = []

    @rule(target=connections)
    def connect(self) -> Connection:
        connection = Connection()
        self.all.append(connection)
        return connection

    @rule(connection=connections, frame=FRAMES, to_daemon=st.booleans())
    def send(self, connection: Connection, frame: Frame, to_daemon: bool) -> None:
        if connection.closed:
            return
        end = connection.daemon if to_daemon else connection.client
        end.in_flight += encode_frame(frame)
        end.expected.append(frame)

    @rule(connection=connections, refused=st.booleans())
    def greet(self, connection: Connection, refused: bool) -> None:
        """The usual opening: HELLO one way, WELCOME or a refusal the other (then anything
        may come)."""
        self.send(connection, HANDSHAKE_FRAMES[0], to_daemon=True)
        self.send(connection, HANDSHAKE_FRAMES[3 if refused else 2], to_daemon=False)

    @rule(
        connection=connections,
        to_daemon=st.booleans(),
        size=st.integers(1, 64) | st.sampled_from([1, 10_000]),
    )
    def deliver(self, connection: Connection, to_daemon: bool, size: int) -> None:
        """Feed the end up to ``size`` bytes and show it every frame they complete."""
        end = connection.daemon if to_daemon else connection.client
        if connection.closed or not end.in_flight:
            return
        end.decoder.receive_data(bytes(end.in_flight[:size]))
        del end.in_flight[:size]
        while (frame := end.decoder.next_frame()) is not None:
            assert frame == end.expected.pop(0)
            following = expected_state(end.role, end.model, frame)
            if following is None:
                before = end.handshake.state
                try:
                    end.handshake.receive(frame)
                except HandshakeError as error:
                    assert error.code is ErrorCode.HANDSHAKE
                else:
                    raise AssertionError(f"{end.role} in {before} took {frame!r}")
                assert end.handshake.state is before, "a refused frame changes nothing"
                connection.closed = True  # the receiver answers ERROR and closes
                return
            end.handshake.receive(frame)
            end.model = following

    @rule(connection=connections)
    def adopt(self, connection: Connection) -> None:
        """Another loop's client takes up a connection that is past its handshake."""
        client = connection.client
        if connection.closed or client.model is not State.READY:
            return
        client.handshake = Handshake(Role.CLIENT)
        client.handshake.resume()

    @invariant()
    def each_end_is_where_the_model_is(self) -> None:
        for connection in self.all:
            for end in (connection.client, connection.daemon):
                assert end.handshake.state is end.model
                assert end.handshake.is_ready is (end.model is State.READY)
                if not connection.closed:  # nothing lost or made up on the way
                    owed = sum(len(encode_frame(frame)) for frame in end.expected)
                    assert owed == len(end.in_flight) + end.decoder.buffered_bytes


HandshakeMachine.TestCase.settings = settings(
    max_examples=500, stateful_step_count=20, deadline=None
)
test_handshake_follows_the_model = HandshakeMachine.TestCase
