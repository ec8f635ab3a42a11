"""The frame types of the broker protocol, named as they go on the wire, and the names they carry.

Every frame is a frozen, slotted dataclass whose constructor checks field types, so a
frame that exists is a valid frame. On the wire a frame is a msgpack array: its type
number first, then its fields in declaration order (see ``codec``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar, TypeAlias

from .errors import ErrorCode, MalformedFrame, UnknownFrame
from .limits import LONGEST_EXPIRY_S

__all__ = [
    "CLIENT_ID_CACHE_SIZE",
    "FRAME_TYPES",
    "MAX_NAME_LENGTH",
    "Ack",
    "Cancel",
    "Cancelled",
    "Confirm",
    "Deliver",
    "Error",
    "Flush",
    "Flushed",
    "Frame",
    "GroupAdd",
    "GroupDiscard",
    "GroupSend",
    "Hello",
    "Ok",
    "Ping",
    "Pong",
    "Push",
    "Receive",
    "ReturnRoom",
    "Send",
    "SendMany",
    "Welcome",
    "client_id_of",
    "frame_from_wire",
    "is_process_specific",
    "is_valid_channel",
    "is_valid_group",
    "ttl_ms",
]

# -- names: what a channel or group name may be, and whose a channel is --------

#: Channels' own limit: names must be shorter than 100 characters.
MAX_NAME_LENGTH = 100

_channel_name = re.compile(r"^[a-zA-Z\d\-_.]+(\![\d\w\-_.]*)?$")
_group_name = re.compile(r"^[a-zA-Z\d\-_.]+$")


def is_valid_channel(name: object) -> bool:
    """True if ``name`` is a channel name Channels accepts."""
    return (
        type(name) is str and len(name) < MAX_NAME_LENGTH and _channel_name.match(name) is not None
    )


def is_valid_group(name: object) -> bool:
    """True if ``name`` is a group name Channels accepts."""
    return type(name) is str and len(name) < MAX_NAME_LENGTH and _group_name.match(name) is not None


def is_process_specific(channel: str) -> bool:
    """True for ``prefix.client!local`` names, which belong to one client connection."""
    return "!" in channel


def client_id_of(channel: str) -> str:
    """The client id in a process-specific name: between the last '.' before '!' and '!'.

    ``"specific.ab12!x"`` -> ``"ab12"``; ``"ab12!x"`` -> ``"ab12"``.
    """
    # Asked several times per member of every group send: remembered (a dict lookup
    # costs a third of the slicing), within a bound.
    client_id = _client_ids.get(channel)
    if client_id is None:
        head = channel[: channel.index("!")]
        client_id = head[head.rfind(".") + 1 :]
        if len(_client_ids) >= CLIENT_ID_CACHE_SIZE:
            _client_ids.clear()
        _client_ids[channel] = client_id
    return client_id


#: Channel names whose client id ``client_id_of`` remembers.
CLIENT_ID_CACHE_SIZE = 65536
_client_ids: dict[str, str] = {}


# -- field checks ----------------------------------------------------------------

#: Request ids are unsigned and fit msgpack's uint64 with room to spare.
MAX_REQUEST_ID = 2**63 - 1
#: A lease token is storage's (Redis: ``<62-bit number>.<count>``), opaque to the client.
MAX_LEASE_CHARS = 64


def _check_int(name: str, value: object, low: int = 0, high: int = MAX_REQUEST_ID) -> None:
    # bool is an int subclass; a True where a count belongs is a bug, not a 1.
    if type(value) is not int or not low <= value <= high:
        raise MalformedFrame(f"{name} must be an int in [{low}, {high}], got {value!r}")


def _check_bool(name: str, value: object) -> None:
    if type(value) is not bool:
        raise MalformedFrame(f"{name} must be a bool, got {value!r}")


def _check_number(name: str, value: object) -> None:
    # NaN and infinity pass a plain `< 0` test but break every deadline computed from them.
    if type(value) not in (int, float) or not 0 <= value < math.inf:  # type: ignore[operator]
        raise MalformedFrame(f"{name} must be a finite non-negative number, got {value!r}")


def _check_str(name: str, value: object) -> None:
    if type(value) is not str:
        raise MalformedFrame(f"{name} must be a str, got {type(value).__name__}")


def _check_bytes(name: str, value: object) -> None:
    if type(value) is not bytes:
        raise MalformedFrame(f"{name} must be bytes, got {type(value).__name__}")


def _check_str_tuple(name: str, value: object) -> None:
    if type(value) is not tuple:
        raise MalformedFrame(f"{name} must be an array of str")
    for item in value:  # a loop, not any(): PUSH frames carry one or a few (every message)
        if type(item) is not str:
            raise MalformedFrame(f"{name} must be an array of str")


def _check_pairs(name: str, value: object, second: Callable[[str, object], None]) -> None:
    if type(value) is not tuple:
        raise MalformedFrame(f"{name} must be an array of pairs")
    for item in value:
        if type(item) is not tuple or len(item) != 2:
            raise MalformedFrame(f"{name} must be an array of pairs")
        _check_str(name, item[0])
        second(name, item[1])


def _check_count(name: str, value: object) -> None:
    _check_int(name, value)


def _check_lease(name: str, value: object) -> None:
    _check_str(name, value)
    if len(value) > MAX_LEASE_CHARS:  # type: ignore[arg-type]
        raise MalformedFrame(f"{name} longer than {MAX_LEASE_CHARS} characters")


@dataclass(frozen=True, slots=True)
class Hello:
    """Client's first frame: protocol version, credentials and the layer's settings.

    ``client_id`` is empty for a client the daemon names (it cannot re-attach), or the
    id the client derived from ``secret``, which proves it owns the id (see
    ``protocol.identity``): on every (re)connect it re-attaches to the messages that
    wait for it. ``channel_capacity`` holds (regular expression, capacity) pairs,
    first match wins, each matched from the name's start; in RE2's syntax (Python's
    ``\\Z`` is read as ``\\z``), at most ``MAX_PATTERN_CHARS`` characters.
    ``send_window`` is the most send room per channel the client can use (0: it sends
    no windowed SEND; see docs/flow.md). ``wants_incarnation``: the client reads
    WELCOME's ``incarnation`` (a client of an earlier release would refuse the longer
    WELCOME, so it gets the field only when it asks). ``acks_deliveries``: the client
    acknowledges each DELIVER that carries a ``lease`` (in ACK's ``leases``), so the
    daemon leaves the message leased in storage until then.
    """

    TYPE: ClassVar[int] = 1
    version: int
    token: str = field(repr=False)  # no repr of a frame shows a credential
    client_id: str
    prefix: str
    capacity: int
    expiry_s: float
    group_expiry_s: float
    channel_capacity: tuple[tuple[str, int], ...] = ()
    secret: bytes = field(default=b"", repr=False)
    send_window: int = 0
    wants_incarnation: bool = False
    acks_deliveries: bool = False

    def __post_init__(self) -> None:
        _check_int("version", self.version)
        _check_str("token", self.token)
        _check_str("client_id", self.client_id)
        _check_str("prefix", self.prefix)
        _check_int("capacity", self.capacity, low=1)
        _check_number("expiry_s", self.expiry_s)
        _check_number("group_expiry_s", self.group_expiry_s)
        _check_pairs("channel_capacity", self.channel_capacity, _check_count)
        _check_bytes("secret", self.secret)
        _check_int("send_window", self.send_window)
        _check_bool("wants_incarnation", self.wants_incarnation)
        _check_bool("acks_deliveries", self.acks_deliveries)


@dataclass(frozen=True, slots=True)
class Welcome:
    """Daemon's answer to HELLO: the agreed version and the client id to use.

    ``send_window``: the most room per channel an OK may grant (0: windows are off, and
    every SEND waits for its answer). ``incarnation``: names the daemon's store as it
    started (memory://: random per start that begins empty, the same after a start that
    read ``--state-file`` back; "": a shared store, whose state outlives the daemon). A
    layer that sees it change knows the store lost what it held.
    """

    TYPE: ClassVar[int] = 2
    version: int
    client_id: str
    max_message_bytes: int
    server: str
    send_window: int = 0
    incarnation: str = ""

    def __post_init__(self) -> None:
        _check_int("version", self.version)
        _check_str("client_id", self.client_id)
        _check_int("max_message_bytes", self.max_message_bytes, low=1)
        _check_str("server", self.server)
        _check_int("send_window", self.send_window)
        _check_str("incarnation", self.incarnation)


@dataclass(frozen=True, slots=True)
class Send:
    """Put one message (opaque bytes) on a channel. Answered by OK or ERROR.

    ``seq`` (1, 2, 3... per client; 0: none) names the message, so a retry is stored
    once. With ``request_id`` 0 and a ``seq`` it is *windowed*: it spends one unit of
    the room an OK granted on its channel and gets no answer but a later CONFIRM.
    """

    TYPE: ClassVar[int] = 3
    request_id: int
    channel: str
    payload: bytes
    seq: int = 0

    def __post_init__(self) -> None:
        _check_int("request_id", self.request_id)
        _check_str("channel", self.channel)
        _check_bytes("payload", self.payload)
        _check_int("seq", self.seq)


@dataclass(frozen=True, slots=True)
class SendMany:
    """Put several messages on channels in one request.

    Answered by OK whose ``rejected`` lists the indexes of the items refused as full.
    """

    TYPE: ClassVar[int] = 4
    request_id: int
    items: tuple[tuple[str, bytes], ...]

    def __post_init__(self) -> None:
        _check_int("request_id", self.request_id)
        _check_pairs("items", self.items, _check_bytes)


@dataclass(frozen=True, slots=True)
class Receive:
    """Pull one message from a normal channel; answered by DELIVER when one comes."""

    TYPE: ClassVar[int] = 5
    request_id: int
    channel: str

    def __post_init__(self) -> None:
        _check_int("request_id", self.request_id)
        _check_str("channel", self.channel)


@dataclass(frozen=True, slots=True)
class Cancel:
    """Withdraw a pending RECEIVE. Answered by CANCELLED, or by nothing if the
    DELIVER was already on its way (the client then keeps that message)."""

    TYPE: ClassVar[int] = 6
    request_id: int

    def __post_init__(self) -> None:
        _check_int("request_id", self.request_id)


@dataclass(frozen=True, slots=True)
class Ack:
    """The client consumed pushed messages: (channel, count) pairs; and received
    DELIVERs that carried a lease: (channel, lease) pairs. No answer.

    Pushed messages count against their channel's capacity until acknowledged, so
    that capacity bounds what waits in the client's buffer too. Group fan-outs
    (``Push.fanout_capacity``) are acknowledged in aggregate instead: ``fanout_kept``
    deliveries the client buffered, ``fanout_dropped`` it refused as full, since the
    last ACK. A delivered message stays leased in storage until acknowledged (a lease
    that lapses gives it back).
    """

    TYPE: ClassVar[int] = 7
    counts: tuple[tuple[str, int], ...]
    fanout_kept: int = 0
    fanout_dropped: int = 0
    leases: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        _check_pairs("counts", self.counts, _check_count)
        _check_int("fanout_kept", self.fanout_kept)
        _check_int("fanout_dropped", self.fanout_dropped)
        _check_pairs("leases", self.leases, _check_lease)


@dataclass(frozen=True, slots=True)
class GroupAdd:
    """Add a channel to a group (renewing its membership). Answered by OK."""

    TYPE: ClassVar[int] = 8
    request_id: int
    group: str
    channel: str

    def __post_init__(self) -> None:
        _check_int("request_id", self.request_id)
        _check_str("group", self.group)
        _check_str("channel", self.channel)


@dataclass(frozen=True, slots=True)
class GroupDiscard:
    """Remove a channel from a group. Answered by OK."""

    TYPE: ClassVar[int] = 9
    request_id: int
    group: str
    channel: str

    def __post_init__(self) -> None:
        _check_int("request_id", self.request_id)
        _check_str("group", self.group)
        _check_str("channel", self.channel)


@dataclass(frozen=True, slots=True)
class GroupSend:
    """Send one message to every member of a group. Answered by OK whose ``count``
    is the number of members skipped because they were full.

    ``seq`` (0: none) numbers it among the client's SENDs (one sequence for both), so a
    retry is delivered once; only to a daemon that agreed ``NUMBERED_GROUP_SEND_VERSION``.
    With ``request_id`` 0 and a ``seq`` it is *numbered*: no answer but a later CONFIRM.
    """

    TYPE: ClassVar[int] = 10
    request_id: int
    group: str
    payload: bytes
    seq: int = 0

    def __post_init__(self) -> None:
        _check_int("request_id", self.request_id)
        _check_str("group", self.group)
        _check_bytes("payload", self.payload)
        _check_int("seq", self.seq)


@dataclass(frozen=True, slots=True)
class Flush:
    """Empty every channel and group of the client's prefix. Answered by OK."""

    TYPE: ClassVar[int] = 11
    request_id: int

    def __post_init__(self) -> None:
        _check_int("request_id", self.request_id)


@dataclass(frozen=True, slots=True)
class Ping:
    """Liveness check; answered by PONG with the same request id."""

    TYPE: ClassVar[int] = 12
    request_id: int

    def __post_init__(self) -> None:
        _check_int("request_id", self.request_id)


@dataclass(frozen=True, slots=True)
class ReturnRoom:
    """The client gives back ``count`` units of send room it holds on ``channel``
    (unused for a while, or closing). No answer."""

    TYPE: ClassVar[int] = 13
    channel: str
    count: int

    def __post_init__(self) -> None:
        _check_str("channel", self.channel)
        _check_int("count", self.count)


@dataclass(frozen=True, slots=True)
class Ok:
    """Success. ``count`` and ``rejected`` carry results for GROUP_SEND and SEND_MANY;
    ``room``, for a SEND, the send room granted on its channel (reserved in storage)."""

    TYPE: ClassVar[int] = 20
    request_id: int
    count: int = 0
    rejected: tuple[int, ...] = ()
    room: int = 0

    def __post_init__(self) -> None:
        _check_int("request_id", self.request_id)
        _check_int("count", self.count)
        if type(self.rejected) is not tuple:
            raise MalformedFrame("rejected must be an array of int")
        for index in self.rejected:
            _check_int("rejected", index)
        _check_int("room", self.room)


@dataclass(frozen=True, slots=True)
class Error:
    """Failure of one request, or of the connection when ``request_id`` is 0."""

    TYPE: ClassVar[int] = 21
    request_id: int
    code: int
    message: str

    def __post_init__(self) -> None:
        if isinstance(self.code, ErrorCode):
            # Store the plain int the wire gives back, so a decoded copy is identical.
            object.__setattr__(self, "code", int(self.code))
        _check_int("request_id", self.request_id)
        _check_int("code", self.code)
        _check_str("message", self.message)

    @property
    def error_code(self) -> ErrorCode | None:
        """The code as an ``ErrorCode``, or None for a code this version does not know."""
        try:
            return ErrorCode(self.code)
        except ValueError:
            return None


def ttl_ms(ttl_s: float) -> int:
    """``ttl_s`` as the whole milliseconds a DELIVER or PUSH carries, in [0,
    ``LONGEST_EXPIRY_S`` in ms] for any float (NaN is 0), so the frame always encodes."""
    if not ttl_s > 0:
        return 0
    return int(min(ttl_s, LONGEST_EXPIRY_S) * 1000)


@dataclass(frozen=True, slots=True)
class Deliver:
    """The answer to RECEIVE: one message, valid for ``ttl_ms`` more milliseconds.

    ``lease``: for a client that acknowledges deliveries (HELLO), the token under
    which storage holds the message until the client's ACK names it ("": nothing to
    acknowledge)."""

    TYPE: ClassVar[int] = 22
    request_id: int
    channel: str
    payload: bytes
    ttl_ms: int
    lease: str = ""

    def __post_init__(self) -> None:
        _check_int("request_id", self.request_id)
        _check_str("channel", self.channel)
        _check_bytes("payload", self.payload)
        _check_int("ttl_ms", self.ttl_ms)
        _check_lease("lease", self.lease)


@dataclass(frozen=True, slots=True)
class Cancelled:
    """The answer to CANCEL when the RECEIVE was still waiting: nothing was sent for it."""

    TYPE: ClassVar[int] = 23
    request_id: int

    def __post_init__(self) -> None:
        _check_int("request_id", self.request_id)


@dataclass(frozen=True, slots=True)
class Push:
    """Messages for the client's own channels: one payload for every listed channel
    (a group send carries the payload once), valid for ``ttl_ms`` more milliseconds.

    ``fanout_capacity`` 0: the messages were taken from storage and count against their
    channels until acknowledged per channel. Above 0 (only to a client of
    ``FANOUT_VERSION`` or later): a group fan-out never stored per member; the client keeps
    it for each listed channel whose buffer holds fewer messages than that, drops it for
    the others, and acknowledges both counts in aggregate (``Ack.fanout_kept``,
    ``Ack.fanout_dropped``).
    """

    TYPE: ClassVar[int] = 24
    channels: tuple[str, ...]
    payload: bytes
    ttl_ms: int
    fanout_capacity: int = 0

    def __post_init__(self) -> None:
        _check_str_tuple("channels", self.channels)
        _check_bytes("payload", self.payload)
        _check_int("ttl_ms", self.ttl_ms)
        _check_int("fanout_capacity", self.fanout_capacity)


@dataclass(frozen=True, slots=True)
class Pong:
    """The answer to PING."""

    TYPE: ClassVar[int] = 25
    request_id: int

    def __post_init__(self) -> None:
        _check_int("request_id", self.request_id)


@dataclass(frozen=True, slots=True)
class Flushed:
    """Someone flushed the client's namespace: drop locally buffered pushed messages."""

    TYPE: ClassVar[int] = 26


@dataclass(frozen=True, slots=True)
class Confirm:
    """Every SEND and GROUP_SEND of this client with a ``seq`` up to ``through_seq`` was
    handled (the windowed ones stored): the client may forget them. One per batch of
    SENDs handled, and one per run of numbered GROUP_SENDs.

    ``room``: (channel, count) pairs of send room granted on the channels the batch
    spent room on, so that a sender that keeps sending need not ask for more.
    """

    TYPE: ClassVar[int] = 27
    through_seq: int
    room: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        _check_int("through_seq", self.through_seq)
        _check_pairs("room", self.room, _check_count)


Frame: TypeAlias = (
    Hello
    | Welcome
    | Send
    | SendMany
    | Receive
    | Cancel
    | Ack
    | GroupAdd
    | GroupDiscard
    | GroupSend
    | Flush
    | Ping
    | ReturnRoom
    | Ok
    | Error
    | Deliver
    | Cancelled
    | Push
    | Pong
    | Flushed
    | Confirm
)

FRAME_TYPES: dict[int, type[Frame]] = {
    cls.TYPE: cls
    for cls in (
        Hello, Welcome, Send, SendMany, Receive, Cancel, Ack, GroupAdd, GroupDiscard,
        GroupSend, Flush, Ping, ReturnRoom, Ok, Error, Deliver, Cancelled, Push, Pong,
        Flushed, Confirm,
    )
}  # fmt: skip

# (required, total) field counts per type: trailing fields with defaults may be absent.
_ARITY: dict[int, tuple[int, int]] = {
    code: (
        sum(1 for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING),
        len(fields(cls)),
    )
    for code, cls in FRAME_TYPES.items()
}


def frame_from_wire(items: Any) -> Frame:
    """Build a frame from its decoded msgpack array; raise ``ProtocolError`` if it is not one."""
    if type(items) is not tuple or not items:
        raise MalformedFrame("a frame must be a non-empty array")
    code = items[0]
    cls = FRAME_TYPES.get(code) if type(code) is int else None
    if cls is None:
        raise UnknownFrame(f"unknown frame type {code!r}")
    required, total = _ARITY[code]
    if not required <= len(items) - 1 <= total:
        raise MalformedFrame(
            f"{cls.__name__} takes {required}..{total} fields, got {len(items) - 1}"
        )
    return cls(*items[1:])
