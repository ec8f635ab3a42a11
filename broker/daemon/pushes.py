"""The PUSH frames of messages taken from storage: one frame per distinct payload.

A group send that stores one payload object in every member's queue lets the members
of one connection share one PUSH frame. A payload joins an existing frame only if that
keeps each channel's messages in order. (Group sends to an owner that takes fan-outs
store nothing and go out as one PUSH each: ``backends.fanout``, ``Connection.fan_out``.)
"""

from __future__ import annotations

from backends import Taken
from broker.ops.metrics import Metrics

from .held import Held

__all__ = ["PushFrames"]


class PushFrames:
    """The PUSH frames of one push pass, being built: (payload, ttl_s, channels)."""

    __slots__ = ("frame_of_payload", "frames")

    def __init__(self) -> None:
        self.frames: list[tuple[bytes, float, list[str]]] = []
        self.frame_of_payload: dict[int, int] = {}

    def collect(self, held: Held, metrics: Metrics, channel: str, taken: list[Taken]) -> int:
        """Add one channel's taken messages, in order, counted as held and pushed; return
        how many."""
        if not taken:
            return 0
        held.add_stored(channel, taken)
        metrics.delivered["push"] += len(taken)
        frames, frame_of_payload = self.frames, self.frame_of_payload
        last = -1
        for item in taken:
            index = frame_of_payload.get(id(item.payload), -1)
            if index <= last:
                index = len(frames)
                frames.append((item.payload, item.ttl_s, []))
                frame_of_payload[id(item.payload)] = index
            frames[index][2].append(channel)
            last = index
        return len(taken)
