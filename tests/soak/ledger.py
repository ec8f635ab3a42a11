"""What a soak sent and what came out, message by message, and the reconciliation.

Every message carries a unique ``id``. A send that returned is *accepted*: its channel
owes one delivery of it; an accepted ``group_send`` owes one to every member. A send
that raised (``ChannelFull``, ``BrokerUnavailable``) is *refused*. Message expiry is
set far beyond the soak, so nothing accepted may lapse: at the end every owed delivery
came exactly once, and nothing refused came at all.

Each message has a kind (``KINDS``): to the workers' channel (pulled by several
workers), to one consumer's own channel (pushed to its connection), or group-sent to
the room (pushed to every consumer). A loss is told by kind and by when it was sent, to
be put beside the faults.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

__all__ = ["KINDS", "Ledger", "Miss", "Reconciliation"]

#: The kinds of message, in the order a report lists them.
KINDS = ("worker", "own", "group")


@dataclass(frozen=True)
class Miss:
    """One owed delivery that did not come once: what, to whom, sent when."""

    kind: str
    channel: str
    message_id: str
    sent_at: float


@dataclass
class Reconciliation:
    """The counts a soak reports, in all and by kind; ``is_exact`` when they reconcile."""

    accepted: Counter[str]
    owed: Counter[str]
    delivered: Counter[str]
    refused: Counter[str]
    lost: list[Miss]
    duplicated: list[Miss]
    refused_yet_delivered: list[str]
    unexpected: list[tuple[str, str]]

    @property
    def is_exact(self) -> bool:
        return not (self.lost or self.duplicated or self.refused_yet_delivered or self.unexpected)

    def table(self, expired: int) -> str:
        """Accepted / owed / delivered / expired / refused / lost / twice, by kind."""
        header = ("", "accepted", "owed", "delivered", "refused", "lost", "twice")
        rows = [header]
        for kind in (*KINDS, "all"):
            pick = (lambda c: c.total()) if kind == "all" else (lambda c, k=kind: c[k])
            lost = Counter(m.kind for m in self.lost)
            twice = Counter(m.kind for m in self.duplicated)
            counts = (self.accepted, self.owed, self.delivered, self.refused, lost, twice)
            rows.append((kind, *(f"{pick(c):,}" for c in counts)))
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        # The kind to the left, the counts to the right.
        justified = [[row[0].ljust(widths[0])] for row in rows]
        for line, row in zip(justified, rows, strict=True):
            line.extend(cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True))
        lines = ["  ".join(line) for line in justified]
        return "\n".join(
            [
                *lines,
                f"expired {expired} (storage's count; expiry is far beyond the soak)",
                f"refused yet delivered {len(self.refused_yet_delivered)}; "
                f"delivered though never sent {len(self.unexpected)}",
            ]
        )


@dataclass
class Ledger:
    """Owed and delivered (channel, id) pairs, with each message's kind and send time."""

    owed: set[tuple[str, str]] = field(default_factory=set)
    delivered: Counter[tuple[str, str]] = field(default_factory=Counter)
    kinds: dict[str, str] = field(default_factory=dict)
    sent_at: dict[str, float] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    #: The first delivery of each message on the workers' channel: (when, to whom).
    first_delivery: dict[tuple[str, str], tuple[float, str]] = field(default_factory=dict)
    #: Each delivery of a message that came before, told with its first one.
    repeats: list[str] = field(default_factory=list)
    #: Each refusal: when, why (the exception's name), its kind, and how many owed
    #: deliveries of that kind were waiting then.
    refusals: list[tuple[float, str, str, int]] = field(default_factory=list)
    #: Owed deliveries not yet made, by kind.
    waiting: Counter[str] = field(default_factory=Counter)

    def accept(self, message_id: str, channels: list[str], kind: str, sent_at: float) -> None:
        self.kinds[message_id] = kind
        self.sent_at[message_id] = sent_at
        self.owed.update((channel, message_id) for channel in channels)
        self.waiting[kind] += len(channels)

    def refuse(self, message_id: str, kind: str, reason: str, at: float) -> None:
        self.refused[message_id] = kind
        self.refusals.append((at, reason, kind, self.waiting[kind]))

    def deliver(self, channel: str, message_id: str, at: float, by: str = "") -> None:
        """A delivery to ``channel`` at ``at`` s; ``by``: which layer, through which
        daemon (given for the workers' channel, where a copy may reach another worker)."""
        pair = (channel, message_id)
        self.delivered[pair] += 1
        if self.delivered[pair] == 1:
            self.waiting[self.kinds.get(message_id, "refused")] -= 1
            if by:
                self.first_delivery[pair] = (at, by)
        else:
            first = self.first_delivery.get(pair)
            before = f"first {first[1]} at {first[0]:.2f} s, " if first else ""
            self.repeats.append(f"{message_id}: {before}again {by or channel} at {at:.2f} s")

    def outstanding(self) -> int:
        """Owed deliveries not yet made."""
        return sum(1 for pair in self.owed if pair not in self.delivered)

    def _miss(self, pair: tuple[str, str]) -> Miss:
        channel, message_id = pair
        return Miss(self.kinds[message_id], channel, message_id, self.sent_at[message_id])

    def reconcile(self) -> Reconciliation:
        came = set(self.delivered)
        owed = Counter(self.kinds[i] for _, i in self.owed)
        delivered = Counter(
            self.kinds.get(i, "?") for (_, i), n in self.delivered.items() for _ in range(n)
        )
        return Reconciliation(
            accepted=Counter(self.kinds.values()),
            owed=owed,
            delivered=delivered,
            refused=Counter(self.refused.values()),
            lost=sorted((self._miss(p) for p in self.owed - came), key=lambda m: m.sent_at),
            duplicated=sorted(
                (self._miss(p) for p, n in self.delivered.items() if n > 1 and p in self.owed),
                key=lambda m: m.sent_at,
            ),
            refused_yet_delivered=sorted({i for _, i in came} & set(self.refused)),
            unexpected=sorted(came - self.owed - {p for p in came if p[1] in self.refused}),
        )
