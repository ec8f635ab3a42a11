"""Hostile inputs for a live daemon, built fast from one seed.

One fuzz connection is a ``Script``: a HELLO (mostly valid, with extreme settings, or
broken), a body of requests of the right shapes but extreme values, which the daemon
answers one by one (names at the length limit and past it, unicode, zero-length and
over-limit payloads, request ids at both ends of their range, counts up to 2**63-1), a
PING whose PONG tells the sender that the body was handled, and at most one input that
ends the connection: random, truncated or mutated frames, wrong field types (NaN,
infinities, huge and negative numbers), deep msgpack nesting, invalid UTF-8, unknown and
daemon-to-client frame types, a second HELLO, extreme length prefixes, garbage after the
valid frames. A few scripts are written one byte per write (frames split at every byte).

``FrameFuzzer.heavy`` gives the inputs that each cost the daemon a lot at once (the attacks
of issue 14), which a run sends last: huge item counts in one frame, many or backtracking
``channel_capacity`` patterns, messages at the size limit, the largest frame cut short.
Bodies are built as msgpack arrays, never through ``protocol.frames`` (whose constructors
would refuse most of them).
"""

from __future__ import annotations

import math
import random
import struct
from collections.abc import Callable
from dataclasses import MISSING, Field, dataclass
from dataclasses import fields as dataclass_fields
from typing import Any

import msgpack

from protocol import FRAME_TYPES, PROTOCOL_VERSION, Hello
from protocol.codec import DEFAULT_MAX_FRAME_BYTES
from protocol.identity import SECRET_BYTES, client_id_for
from protocol.limits import DEFAULT_MAX_MESSAGE_BYTES

__all__ = ["PREFIXES", "FrameFuzzer", "Script", "frame"]

_HELLO, _SEND, _SEND_MANY, _RECEIVE, _CANCEL, _ACK = 1, 3, 4, 5, 6, 7
_GROUP_ADD, _GROUP_DISCARD, _GROUP_SEND, _FLUSH, _PING, _RETURN_ROOM, _PONG = (
    8, 9, 10, 11, 12, 13, 25,
)  # fmt: skip
_REQUEST_TYPES = (3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13)
_ANSWER_TYPES = tuple(code for code in FRAME_TYPES if code >= 20) + (2,)

#: The namespaces valid fuzz HELLOs use: the campaign flushes each of them at the end.
PREFIXES = ("fuzz", "fuzz-b", "f" * 99)
#: Client ids the HELLOs ask for, with the secrets that prove them, so that connections
#: own them (and get pushes to their channels) or collide on them.
SECRETS = tuple(bytes([n]) * SECRET_BYTES for n in (1, 2, 3))
CLIENT_IDS = tuple(client_id_for(secret) for secret in SECRETS)

_INTS = (
    0,
    1,
    7,
    255,
    65536,
    2**31 - 1,
    2**32,
    2**53 + 1,
    2**63 - 1,
    2**63,
    2**64 - 1,
    -1,
    -(2**63),
)
_FLOATS = (0.0, -0.0, 5e-324, 0.5, 86400.5, 1e17, 1e300, 1.7976931348623157e308)
_SPECIAL_FLOATS = (math.inf, -math.inf, math.nan, -1.0, -1e-300)
_IDS = (0, 1, 2, 3, 2**31, 2**63 - 1)
_COUNTS = (0, 1, 2, 100, 2**32, 2**63 - 1)
#: Capacities, expiries and group expiries a HELLO carries: within the daemon's default
#: bounds or at them (usually, so that most bodies get served), or far past them.
_CAPACITIES = ((1, 2, 3, 100, 10_000), (10_001, 10**9, 2**63 - 1))
_EXPIRIES = ((0, 1e-9, 0.5, 1, 60, 60.0, 86_400), (86_401.0, 1e17, 1e300, 2**63 - 1, 1.7e308))
#: (client id, secret): mostly none (the daemon makes one), else a fuzz id with its secret
#: (to own it, or to collide on it), or without it, or an id no daemon would make.
_IDENTITIES = (
    (("", b""),) * 40
    + tuple(zip(CLIENT_IDS, SECRETS, strict=True))
    + ((CLIENT_IDS[0], b""), (CLIENT_IDS[1], SECRETS[0]), ("short", b"s"), ("a!b" * 5, b""))
)
#: How often a HELLO setting is an extreme one.
_EXTREME = 0.05
_VERSIONS = (0, 2, 255, 2**63 - 1)
#: Patterns: plain, invalid regexes, and backtracking ones (harmless without a long name).
_PATTERNS = ("^fuzz", ".*", "^a.*b$", "(", "[", "\\", "*", "(?P<x", "(a+)+$", "(a|aa)*c", "")


def frame(*items: Any) -> bytes:
    """A length-prefixed msgpack array: a frame if the items make one."""
    body: bytes = msgpack.packb(list(items), use_bin_type=True)
    return struct.pack(">I", len(body)) + body


@dataclass(slots=True)
class Script:
    """The bytes one fuzz connection writes, in order."""

    #: The first frame (a HELLO, valid or not), or whatever stands in for it.
    hello: bytes
    #: Requests the daemon answers one by one; the last is a PING.
    body: bytes = b""
    #: The PONG that answers the body's PING: the sender waits for it before the tail.
    sentinel: bytes = b""
    #: At most one input that should make the daemon close the connection; the sender
    #: half-closes after it (so a frame cut short is one cut by EOF).
    tail: bytes = b""
    #: Write everything one byte per write.
    byte_split: bool = False
    #: How many fuzz inputs these bytes carry.
    inputs: int = 1
    #: What it is, for the report of a connection that misbehaved.
    label: str = ""


class FrameFuzzer:
    """Makes ``Script``s from one seed: the same seed gives the same inputs."""

    def __init__(self, seed: int, *, body_size: tuple[int, int] = (16, 64)) -> None:
        self.rng = random.Random(seed)
        self.body_size = body_size
        rng = self.rng
        self._names = _channel_names(rng)
        self._groups = _group_names()
        self._payloads = (b"", b"x", bytes(1000), rng.randbytes(64), rng.randbytes(7))
        self._requests: tuple[Callable[[], bytes], ...] = (
            self._send, self._send, self._send, self._send_many, self._receive, self._cancel,
            self._ack, self._group_add, self._group_add, self._group_discard, self._group_send,
            self._group_send, self._ping, self._return_room,
        )  # fmt: skip
        self._tails: tuple[Callable[[bytes], bytes], ...] = (
            self._wrong_types, self._wrong_types, self._wrong_arity, self._unknown_type,
            self._answer_type, self._second_hello, self._deep_nesting, self._truncated,
            self._truncated, self._mutated, self._mutated, self._mutated, self._garbage,
            self._length_prefix, self._bad_utf8, self._odd_msgpack, self._windowed_send,
        )  # fmt: skip

    # -- scripts --------------------------------------------------------------

    def script(self) -> Script:
        """One connection's worth: usually a valid HELLO, a body and a tail."""
        rng = self.rng
        if rng.random() < 0.12:
            return self._bad_hello()
        hello = self.hello()
        count = rng.randint(*self.body_size)
        parts = [self._request() for _ in range(count)]
        if rng.random() < 0.02:
            parts.append(frame(_FLUSH, rng.choice(_IDS)))
        rid = rng.randrange(2**40, 2**62)  # unlike any id of the body
        parts.append(frame(_PING, rid))
        tail = b""
        if rng.random() < 0.85:
            tail = rng.choice(self._tails)(parts[rng.randrange(len(parts))])
        body = b"".join(parts)
        split = rng.random() < 0.02 and len(body) < 4096
        inputs = 1 + len(parts) + bool(tail)
        return Script(hello, body, frame(_PONG, rid), tail, split, inputs, "mix")

    def hello(self, **fields: Any) -> bytes:
        """A HELLO that passes the frame checks; ``fields`` override the random settings."""
        rng = self.rng
        client_id, secret = rng.choice(_IDENTITIES)
        settings = {
            "version": PROTOCOL_VERSION,
            "token": rng.choice(("", "t", "\u00e9" * 50)),
            "client_id": client_id,
            "prefix": rng.choice(PREFIXES),
            "capacity": self._pick(*_CAPACITIES),
            "expiry_s": self._pick(*_EXPIRIES),
            "group_expiry_s": self._pick(*_EXPIRIES),
            "channel_capacity": [],
            "secret": secret,
        }
        if rng.random() < 0.1:
            pairs = rng.randint(1, 4)
            patterns = [[rng.choice(_PATTERNS), rng.choice(_COUNTS)] for _ in range(pairs)]
            settings["channel_capacity"] = patterns
        settings.update(fields)
        return frame(_HELLO, *(_hello_field(field, settings) for field in dataclass_fields(Hello)))

    def _pick(self, usual: tuple[Any, ...], extreme: tuple[Any, ...]) -> Any:
        return self.rng.choice(extreme if self.rng.random() < _EXTREME else usual)

    def _bad_hello(self) -> Script:
        """A first frame the daemon must refuse: no body follows it."""
        rng = self.rng
        field = rng.choice(("version", "capacity", "expiry_s", "group_expiry_s", "prefix"))
        value: Any = {
            "version": rng.choice(_VERSIONS),
            "capacity": rng.choice((0, -1, -(2**63), 2**64 - 1, 1.5, math.nan)),
            "expiry_s": rng.choice(_SPECIAL_FLOATS),
            "group_expiry_s": rng.choice(_SPECIAL_FLOATS),
            "prefix": rng.choice(("", "\u540d\u524d", "p" * 100, "a!b", "a b", "x" * 5000)),
        }[field]
        label, hello = f"hello with bad {field}", self.hello(**{field: value})
        kind = rng.random()
        if kind < 0.15:
            label, hello = "hello cut short", self.hello()[: rng.randrange(1, 20)]
        elif kind < 0.3:
            label, hello = "request before hello", self._request()
        elif kind < 0.35:
            label, hello = "http request", b"GET / HTTP/1.1\r\nHost: broker\r\n\r\n"
        return Script(hello, label=label)

    # -- requests with extreme values of the right types ----------------------

    def _request(self) -> bytes:
        return self.rng.choice(self._requests)()

    def _id(self) -> int:
        return self.rng.choice(_IDS) if self.rng.random() < 0.3 else self.rng.randrange(2**31)

    def _name(self) -> str:
        return self.rng.choice(self._names)

    def _payload(self) -> bytes:
        return self.rng.choice(self._payloads)

    def _send(self) -> bytes:
        """A SEND, a third of them with a ``seq``; a request always (with an id), as one
        with no id and a seq spends send room, which a fuzz connection never holds."""
        rng = self.rng
        rid = self._id() or 1
        if rng.random() < 0.33:
            return frame(_SEND, rid, self._name(), self._payload(), rng.choice(_IDS))
        return frame(_SEND, rid, self._name(), self._payload())

    def _return_room(self) -> bytes:
        """Room given back that the connection may not hold (the daemon ignores the rest)."""
        return frame(_RETURN_ROOM, self._name(), self.rng.choice(_COUNTS))

    def _send_many(self) -> bytes:
        items = [[self._name(), self._payload()] for _ in range(self.rng.randint(0, 8))]
        return frame(_SEND_MANY, self._id(), items)

    def _receive(self) -> bytes:
        return frame(_RECEIVE, self._id(), self._name())

    def _cancel(self) -> bytes:
        return frame(_CANCEL, self._id())

    def _ack(self) -> bytes:
        counts = [[self._name(), self.rng.choice(_COUNTS)] for _ in range(self.rng.randint(0, 4))]
        return frame(_ACK, counts)

    def _group_add(self) -> bytes:
        return frame(_GROUP_ADD, self._id(), self.rng.choice(self._groups), self._name())

    def _group_discard(self) -> bytes:
        return frame(_GROUP_DISCARD, self._id(), self.rng.choice(self._groups), self._name())

    def _group_send(self) -> bytes:
        return frame(_GROUP_SEND, self._id(), self.rng.choice(self._groups), self._payload())

    def _ping(self) -> bytes:
        return frame(_PING, self._id())

    # -- inputs that end a connection ----------------------------------------

    def _wire_value(self, depth: int = 0) -> Any:
        rng = self.rng
        kind = rng.randrange(9 if depth < 2 else 7)
        choices: tuple[Callable[[], Any], ...] = (
            lambda: None, lambda: rng.random() < 0.5, lambda: rng.choice(_INTS),
            lambda: rng.choice(_FLOATS + _SPECIAL_FLOATS), lambda: self._name(),
            lambda: rng.randbytes(rng.randrange(8)), lambda: "\U0001f600" * rng.randrange(3),
            lambda: [self._wire_value(depth + 1) for _ in range(rng.randrange(4))],
            lambda: {self._name(): self._wire_value(depth + 1)},
        )  # fmt: skip
        return choices[kind]()

    def _wrong_types(self, valid: bytes) -> bytes:
        rng = self.rng
        fields = [self._wire_value() for _ in range(rng.randint(1, 4))]
        return frame(rng.choice(_REQUEST_TYPES), *fields)

    def _wrong_arity(self, valid: bytes) -> bytes:
        rng = self.rng
        fields = [self._id()] * rng.choice((0, 4, 5, 9))
        return frame(rng.choice((_HELLO, *_REQUEST_TYPES)), *fields)

    def _unknown_type(self, valid: bytes) -> bytes:
        code = self.rng.choice((0, 14, 19, 28, 99, 127, 255, 65535, -1, 2**64 - 1, "3", 3.0, True))
        return frame(code, self._id())

    def _windowed_send(self, valid: bytes) -> bytes:
        """A SEND with no request id and a seq, on a channel where no room was granted."""
        rng = self.rng
        return frame(_SEND, 0, self._name(), self._payload(), rng.randint(1, 2**63 - 1))

    def _answer_type(self, valid: bytes) -> bytes:
        """A daemon-to-client frame (OK, DELIVER, PUSH...) sent to the daemon."""
        return frame(self.rng.choice(_ANSWER_TYPES), self._id(), 0, ())

    def _second_hello(self, valid: bytes) -> bytes:
        return self.hello()

    def _deep_nesting(self, valid: bytes) -> bytes:
        depth = self.rng.choice((10, 100, 1000, 5000, 100_000))
        body = b"\x94\x03\x01\xa1d" + b"\x91" * depth + b"\xc0"  # SEND(1, "d", [[[...]]])
        return struct.pack(">I", len(body)) + body

    def _truncated(self, valid: bytes) -> bytes:
        """A frame cut short by EOF, or garbage that the cut frame swallows."""
        rng = self.rng
        cut = valid[: rng.randrange(1, len(valid))]
        return cut if rng.random() < 0.5 else cut + rng.randbytes(rng.randrange(1, 64))

    def _mutated(self, valid: bytes) -> bytes:
        """A valid frame with bytes flipped, inserted or deleted (its length kept or not)."""
        rng = self.rng
        data = bytearray(valid)
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(data))
            operation = rng.randrange(3)
            if operation == 0:
                data[at] ^= 1 << rng.randrange(8)
            elif operation == 1:
                data[at:at] = rng.randbytes(rng.randint(1, 4))
            elif len(data) > 5:
                del data[at]
        if rng.random() < 0.5 and len(data) > 4:
            data[:4] = struct.pack(">I", len(data) - 4)
        return bytes(data) + frame(_PING, 1)

    def _garbage(self, valid: bytes) -> bytes:
        rng = self.rng
        return rng.randbytes(rng.randint(1, 256))

    def _length_prefix(self, valid: bytes) -> bytes:
        length = self.rng.choice((0, 1, DEFAULT_MAX_FRAME_BYTES, DEFAULT_MAX_FRAME_BYTES + 1))
        return struct.pack(">I", length) + b"\xc0"

    def _bad_utf8(self, valid: bytes) -> bytes:
        """A channel name whose str bytes are not UTF-8 (a lone surrogate, a stray byte)."""
        text = self.rng.choice((b"\xed\xa0\x80", b"\xff", b"a\xc3", b"\xc0\xaf"))
        body = bytes([0x94, _SEND, 0x01, 0xA0 | len(text)]) + text + b"\xc4\x00"
        return struct.pack(">I", len(body)) + body

    def _odd_msgpack(self, valid: bytes) -> bytes:
        """Valid msgpack that is no frame: a map, int map keys, ext and timestamp types."""
        body = self.rng.choice(
            (
                msgpack.packb({"type": _PING, "request_id": 1}),
                msgpack.packb([_ACK, {1: 2}]),
                b"\x92\x0c\xd6\xff\x00\x00\x00\x01",  # PING with a timestamp for its id
                b"\x92\x0c\xc7\x01\x05\x00",  # PING with an ext type for its id
                b"\x92\x0c\x01extra",  # trailing bytes inside the frame
            )
        )
        return struct.pack(">I", len(body)) + body

    # -- the expensive ones ---------------------------------------------------

    def heavy(self) -> list[Script]:
        """Inputs that each ask the daemon for a lot of work or memory at once."""
        ping = frame(_PING, 7)
        many = [["fuzz.m", b""]] * 200_000
        pairs = [["fuzz.m", 1]] * 300_000
        bomb = "a" * 22 + ".x"
        scripts = [
            Script(
                self.hello(prefix="fuzz"), frame(_SEND_MANY, 1, many) + ping, label="200k items"
            ),
            Script(self.hello(prefix="fuzz"), frame(_ACK, pairs) + ping, label="300k ack pairs"),
            Script(
                self.hello(prefix="fuzz", channel_capacity=[["^fuzz", 1]] * 100_000),
                frame(_SEND, 1, "fuzz.x", b"") + ping,
                label="100k patterns",
            ),
            Script(
                self.hello(prefix="fuzz", channel_capacity=[["(a+)+$", 5]]),
                frame(_SEND, 1, bomb, b"") + frame(_SEND, 2, bomb + "y", b"") + ping,
                label="backtracking pattern",
            ),
            Script(
                self.hello(
                    prefix="fuzz", expiry_s=1e17, client_id=CLIENT_IDS[0], secret=SECRETS[0]
                ),
                frame(_SEND, 1, f"fuzz.{CLIENT_IDS[0]}!a", b"x") + ping,
                label="expiry 1e17, pushed",
            ),
            Script(
                self.hello(prefix="fuzz"),
                frame(_SEND, 1, "fuzz.big", bytes(DEFAULT_MAX_MESSAGE_BYTES))
                + frame(_SEND, 2, "fuzz.big", bytes(DEFAULT_MAX_MESSAGE_BYTES + 1))
                + ping,
                label="messages at the size limit",
            ),
        ]
        for script in scripts:
            script.sentinel = frame(_PONG, 7)
            script.inputs = 3  # the HELLO, the big request(s), the PING
        cut = struct.pack(">I", DEFAULT_MAX_FRAME_BYTES) + bytes(DEFAULT_MAX_FRAME_BYTES - 1)
        for _ in range(3):  # the largest frame a daemon reads, cut short by EOF
            scripts.append(Script(self.hello(prefix="fuzz"), tail=cut, inputs=2, label="cut 8 MiB"))
        return scripts


def _hello_field(field: Field[Any], settings: dict[str, Any]) -> Any:
    """The value of one HELLO field: ours, else its default or an empty one of its type (so
    that a field the protocol gains later does not make every fuzz HELLO malformed)."""
    if field.name in settings:
        return settings[field.name]
    if field.default is not MISSING:
        return field.default
    return {"int": 0, "float": 0.0, "str": "", "bytes": b""}.get(str(field.type), [])


def _channel_names(rng: random.Random) -> tuple[str, ...]:
    """Valid names (plain, process-specific of the fuzz ids, at the length limit), and
    invalid ones (100 characters, unicode, empty, two '!', 10,000 characters)."""
    specific = [f"{prefix}.{cid}!x" for prefix in PREFIXES[:2] for cid in CLIENT_IDS]
    return (
        "fuzz.a", "fuzz.b", "fuzz.c", "fuzz-b.a", *specific, f"{CLIENT_IDS[1]}!",
        "c" * 99, "fuzz." + "d" * 94, f"x.{CLIENT_IDS[2]}!".ljust(99, "e"),
        "c" * 100, "", "!", "a!b!c", "\u00e7a", "\u540d\u524d", "a\x00b", "a" * 10_000,
        "".join(rng.choice("ab.-_!") for _ in range(30)),
    )  # fmt: skip


def _group_names() -> tuple[str, ...]:
    return ("g0", "g1", "g2", "g" * 99, "g" * 100, "", "g!x", "gr\u00fcppe", "g g")
