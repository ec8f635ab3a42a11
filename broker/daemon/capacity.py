"""What a client may ask for in its HELLO, and its capacity policy.

Theory of operation. The daemon owns the bounds (``Bounds``, from the ``--max-*``
flags): a HELLO asking for more capacity, a longer expiry or more patterns than they
allow is refused whole (``Refused``, with the flag to change), so nothing a client says
is ever out of range later: every deadline computed from its expiry is representable.

``channel_capacity`` patterns come from clients, and every send, and every member of
a group send, is matched against them on the event loop. Python's ``re`` backtracks
(``(a+)+$`` on 28 characters takes seconds) and has no timeout, so patterns are matched
by RE2, whose time is linear in the name's length times the program's size: patterns
are bounded in length (``MAX_PATTERN_CHARS``), count (``--max-patterns``) and compiled
size (``PROGRAM_PER_PATTERN`` each on average). They are joined into one alternation,
``(p0)|(p1)|...``, anchored at the start: RE2 takes the first alternative that matches,
which is Channels' first-match-wins, in one pass over the name whatever their number.

Linear is not cheap: 16 patterns built to be slow (``[a-z]*a[a-z]{40}x``, whose DFA has
no end of states) cost RE2 up to a millisecond a name. So a name's capacity is matched
once and remembered (``CACHE_SIZE`` names), connections with the same settings (a site's
processes) share one policy and what it remembers (``CapacityPolicy.shared``), and a
batch of names (a group's members, a SEND_MANY) is matched by ``all_of``, which yields
to the event loop every ``MATCH_SLICE_S`` of matching: a hostile client's group send to
thousands of members costs it its own time, in slices, never another client's PING.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from time import perf_counter
from typing import TYPE_CHECKING, Any

import re2
from re2 import _re2  # the binding: re2.compile keeps 128 patterns, with their memory, forever

from protocol import MAX_PATTERN_CHARS, ErrorCode, Hello

if TYPE_CHECKING:
    from broker.config import Config

__all__ = ["MATCH_SLICE_S", "PROGRAM_PER_PATTERN", "Bounds", "CapacityPolicy", "Refused"]

#: RE2 instructions a client's patterns may compile to, per pattern it may send
#: (``--max-patterns``): the cost of matching a name is bounded by their total. A glob
#: of Channels (``websocket.send!*``) compiles to about 25, a prefix regex to 17.
PROGRAM_PER_PATTERN = 64
#: Memory RE2 may use for one client's patterns: the program and its DFA's cache of
#: states (made as names are matched; when it fills RE2 starts it afresh). Room for
#: 16 patterns' programs and a cache; more for a daemon that allows more patterns.
_PATTERN_MEMORY_BYTES = 256 * 1024
#: Bytes of RE2 memory per instruction of the program budget: its program (16 each)
#: and twice as much again, as RE2 keeps two thirds of its memory for the DFA.
_MEMORY_PER_INSTRUCTION = 48
#: Seconds of pattern matching ``all_of`` does before it lets the loop run other work:
#: well under the 50 ms another client's PING may wait, and a hundred cached names or
#: thousands of ordinary lookups between two checks of the clock.
MATCH_SLICE_S = 0.002


def _options(max_program: int) -> Any:
    options = re2.Options()
    options.log_errors = False  # a client's bad pattern is its refusal, not stderr's
    options.max_mem = max(_PATTERN_MEMORY_BYTES, _MEMORY_PER_INSTRUCTION * max_program)
    return options


_ANCHOR_START = _re2.RE2.Anchor.ANCHOR_START


class Refused(Exception):
    """A HELLO the daemon does not accept: ``code`` to close with; ``limit``, the bound it
    is over (a flag's name, or a constant's), or None for a pattern RE2 cannot read."""

    def __init__(self, message: str, limit: str | None) -> None:
        super().__init__(message)
        self.limit = limit
        self.code = ErrorCode.MALFORMED_FRAME if limit is None else ErrorCode.OVER_LIMIT


@dataclass(frozen=True, slots=True)
class Bounds:
    """The most a client may ask for: the daemon's ``--max-*`` flags."""

    max_capacity: int
    max_expiry_s: float
    max_group_expiry_s: float
    max_patterns: int

    @classmethod
    def from_config(cls, config: Config) -> Bounds:
        return cls(
            config.max_capacity,
            config.max_expiry_s,
            config.max_group_expiry_s,
            config.max_patterns,
        )

    @property
    def max_program(self) -> int:
        """RE2 instructions one client's patterns may compile to."""
        return PROGRAM_PER_PATTERN * self.max_patterns

    def check(self, hello: Hello) -> None:
        """Raise ``Refused`` naming the flag of the first bound ``hello`` is over."""
        _at_most("capacity", hello.capacity, self.max_capacity, "max-capacity")
        _at_most("expiry", hello.expiry_s, self.max_expiry_s, "max-expiry")
        _at_most("group_expiry", hello.group_expiry_s, self.max_group_expiry_s, "max-group-expiry")
        patterns = hello.channel_capacity
        _at_most("channel_capacity's size", len(patterns), self.max_patterns, "max-patterns")
        for pattern, capacity in patterns:
            _at_most(f"the capacity for {pattern!r}", capacity, self.max_capacity, "max-capacity")
            if len(pattern) > MAX_PATTERN_CHARS:
                raise Refused(
                    f"channel_capacity pattern {pattern[:40]!r}... has {len(pattern)}"
                    f" characters, over the {MAX_PATTERN_CHARS} the protocol allows",
                    "pattern-chars",
                )


def _at_most(what: str, value: float, bound: float, flag: str) -> None:
    if value > bound:
        raise Refused(f"{what} {value} is over this daemon's limit of {bound} (--{flag})", flag)


class CapacityPolicy:
    """Maps a channel name to its capacity: first matching pattern, else the default.

    Results are cached per name, because a consumer sends to the same few channels, and
    a group send to the same members, again and again: then a lookup costs a dict
    lookup, patterns or not.
    """

    __slots__ = (
        "__weakref__",
        "_cache",
        "_capacities",
        "_groups",
        "_regexp",
        "default",
        "uniform",
    )

    #: Bound on cached names, so a sender to ever-new channel names stays small (about
    #: 2 MB when full, less for names other parts of the daemon hold too): a group of as
    #: many members is matched once, then looked up.
    CACHE_SIZE = 16_384

    def __init__(
        self,
        default: int,
        patterns: tuple[tuple[str, int], ...] = (),
        max_program: int = PROGRAM_PER_PATTERN * 100,
    ) -> None:
        """Raise ``Refused`` for a pattern RE2 does not read, or patterns over ``max_program``."""
        self.default = default
        self._regexp: Any = None
        self._groups: list[int] = []
        if patterns:
            self._regexp, self._groups = _compile([p for p, _ in patterns], max_program)
        self._capacities = [capacity for _, capacity in patterns]
        self._cache: dict[str, int] = {}
        #: The one capacity of every channel when no pattern applies, else None: lets a
        #: shared backend check a group's members inside one script.
        self.uniform: int | None = None if patterns else default

    @classmethod
    def from_hello(cls, hello: Hello, bounds: Bounds) -> CapacityPolicy:
        """Raise ``Refused`` if a pattern is not one RE2 reads, or they are too large."""
        return cls.shared(hello.capacity, hello.channel_capacity, bounds.max_program)

    @classmethod
    def shared(
        cls, default: int, patterns: tuple[tuple[str, int], ...], max_program: int
    ) -> CapacityPolicy:
        """The live policy of these settings, or a new one: the connections of a site
        share its compiled patterns and the capacities it has matched."""
        key = (default, patterns, max_program)
        policy = _SHARED.get(key)
        if policy is None:
            policy = _SHARED[key] = cls(default, patterns, max_program)
        return policy

    def __call__(self, channel: str) -> int:
        capacity = self._cache.get(channel)
        if capacity is None:
            capacity = self._lookup(channel)
            if len(self._cache) >= self.CACHE_SIZE:
                self._cache.clear()
            self._cache[channel] = capacity
        return capacity

    async def all_of(self, channels: Sequence[str]) -> list[int]:
        """The capacity of each of ``channels``, in order. Names not cached yet are matched
        in slices of ``MATCH_SLICE_S``, with the loop free to serve others between them."""
        if self._regexp is None:
            return [self.default] * len(channels)
        cache, capacities = self._cache, []
        deadline = perf_counter() + MATCH_SLICE_S
        for channel in channels:
            capacity = cache.get(channel)
            if capacity is None:
                capacity = self(channel)
                if perf_counter() > deadline:
                    await asyncio.sleep(0)
                    deadline = perf_counter() + MATCH_SLICE_S
            capacities.append(capacity)
        return capacities

    def _lookup(self, channel: str) -> int:
        if self._regexp is None:
            return self.default
        name = channel.encode()
        spans = self._regexp.Match(_ANCHOR_START, name, 0, len(name))
        if spans[0][0] >= 0:
            for index, group in enumerate(self._groups):
                if spans[group][0] >= 0:
                    capacity: int = self._capacities[index]
                    return capacity
        return self.default


#: The live policies by settings (``CapacityPolicy.shared``); one goes with its last session.
_SHARED: weakref.WeakValueDictionary[tuple[int, tuple[tuple[str, int], ...], int], CapacityPolicy]
_SHARED = weakref.WeakValueDictionary()


def _compile(patterns: list[str], max_program: int) -> tuple[Any, list[int]]:
    """The patterns as one RE2 alternation, each in a group, in order, and the number of
    each one's group; ``Refused`` if one is not RE2's, or they compile to over ``max_program``."""
    options = _options(max_program)
    groups, number, size = [], 1, 0
    for pattern in patterns:
        # Compiled alone first, so none can close its group and open another.
        regexp = _regexp(pattern, options)
        size += regexp.ProgramSize()
        if size > max_program:
            raise Refused(
                f"channel_capacity patterns compile to over {max_program} RE2 instructions"
                f" ({PROGRAM_PER_PATTERN} per pattern --max-patterns allows): simplify them,"
                " or raise --max-patterns",
                "max-patterns",
            )
        groups.append(number)
        number += 1 + regexp.NumberOfCapturingGroups()
    alternation = "|".join(f"({_to_re2(pattern)})" for pattern in patterns)
    return _regexp(alternation, options), groups


def _regexp(pattern: str, options: Any) -> Any:
    regexp = _re2.RE2(_to_re2(pattern).encode(), options)
    if not regexp.ok():
        error = regexp.error()
        reason = error.decode(errors="replace") if isinstance(error, bytes) else str(error)
        if "too large" in reason:  # its program is over RE2's memory (``_options``)
            raise Refused(f"channel_capacity pattern {pattern:.60}... is too large", "pattern-size")
        raise Refused(
            f"channel_capacity pattern {pattern!r} is not one the daemon's matcher (RE2)"
            f" reads: {reason}",
            None,
        )
    return regexp


def _to_re2(pattern: str) -> str:
    r"""``pattern`` with Python's ``\Z`` (end of text; ``fnmatch.translate`` ends with
    it) spelled as RE2 spells it, ``\z``; every other escape as it is."""
    if "\\Z" not in pattern:
        return pattern
    out, index = [], 0
    while index < len(pattern):
        char = pattern[index]
        if char == "\\" and index + 1 < len(pattern):
            following = pattern[index + 1]
            out.append("\\z" if following == "Z" else char + following)
            index += 2
        else:
            out.append(char)
            index += 1
    return "".join(out)
