"""What the layer acknowledges to the daemon, sent before its next frame.

Two kinds, in ACK frames (of ``MAX_ACK_PAIRS`` pairs at most each): pushed messages
consumed, counted per channel (they count against capacity until then), and DELIVERs
that carried a lease (storage keeps such a message leased until its ACK, and gives it
back if the lease lapses first). Both wait for the next write, or the end of the loop
pass, so that one ACK covers a burst; what was not written when a connection dropped
goes out on the next one, to whichever daemon: storage is shared.
"""

from __future__ import annotations

from protocol import MAX_ACK_PAIRS, Ack, encode_frame

__all__ = ["Acknowledgements"]


class Acknowledgements:
    """Pushed messages consumed, and leases of DELIVERs received, not yet sent."""

    __slots__ = ("counts", "leases")

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.leases: list[tuple[str, str]] = []

    def __bool__(self) -> bool:
        return bool(self.counts or self.leases)

    def consumed(self, channel: str) -> None:
        """A pushed message of ``channel`` was handed to ``receive()``."""
        self.counts[channel] = self.counts.get(channel, 0) + 1

    def delivered(self, channel: str, lease: str) -> None:
        """A DELIVER of ``channel`` under ``lease`` arrived: the message is ours."""
        self.leases.append((channel, lease))

    def frames(self) -> list[bytes]:
        """The ACK frames of everything noted, encoded; forgets it."""
        out = []
        leases, self.leases = tuple(self.leases), []
        for start in range(0, len(leases), MAX_ACK_PAIRS):
            out.append(encode_frame(Ack((), leases[start : start + MAX_ACK_PAIRS])))
        counts = tuple(self.counts.items())
        self.counts.clear()
        for start in range(0, len(counts), MAX_ACK_PAIRS):
            out.append(encode_frame(Ack(counts[start : start + MAX_ACK_PAIRS])))
        return out
