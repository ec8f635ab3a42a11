"""What a soak sent and what came out, message by message, and the reconciliation.

Every message carries a unique ``id``. A send that returned is *accepted*: its channel
owes one delivery of it; an accepted ``group_send`` owes one to every member. A send
that raised (``ChannelFull``, ``BrokerUnavailable``) is *refused*. Message expiry is
set far beyond the soak, so nothing accepted may lapse: at the end every owed delivery
came exactly once, and nothing refused came at all.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

__all__ = ["Ledger", "Reconciliation"]


@dataclass
class Reconciliation:
    """The counts a soak reports; ``is_exact`` when they reconcile."""

    accepted: int
    owed: int
    delivered: int
    refused: int
    lost: list[tuple[str, str]]
    duplicated: list[tuple[str, str]]
    refused_yet_delivered: list[str]
    unexpected: list[tuple[str, str]]

    @property
    def is_exact(self) -> bool:
        return not (self.lost or self.duplicated or self.refused_yet_delivered or self.unexpected)

    def summary(self) -> str:
        return (
            f"accepted {self.accepted} sends owing {self.owed} deliveries; delivered "
            f"{self.delivered}; refused {self.refused}; lost {len(self.lost)}; "
            f"duplicated {len(self.duplicated)}; refused yet delivered "
            f"{len(self.refused_yet_delivered)}; unexpected {len(self.unexpected)}"
        )


@dataclass
class Ledger:
    """Owed and delivered (channel, id) pairs."""

    owed: set[tuple[str, str]] = field(default_factory=set)
    delivered: Counter[tuple[str, str]] = field(default_factory=Counter)
    accepted: int = 0
    refused: set[str] = field(default_factory=set)

    def accept(self, message_id: str, channels: list[str]) -> None:
        self.accepted += 1
        self.owed.update((channel, message_id) for channel in channels)

    def refuse(self, message_id: str) -> None:
        self.refused.add(message_id)

    def deliver(self, channel: str, message_id: str) -> None:
        self.delivered[(channel, message_id)] += 1

    def outstanding(self) -> int:
        """Owed deliveries not yet made."""
        return sum(1 for pair in self.owed if pair not in self.delivered)

    def reconcile(self) -> Reconciliation:
        came = set(self.delivered)
        return Reconciliation(
            accepted=self.accepted,
            owed=len(self.owed),
            delivered=sum(self.delivered.values()),
            refused=len(self.refused),
            lost=sorted(self.owed - came),
            duplicated=sorted(pair for pair, n in self.delivered.items() if n > 1),
            refused_yet_delivered=sorted({i for _, i in came} & self.refused),
            unexpected=sorted(came - self.owed - {p for p in came if p[1] in self.refused}),
        )
