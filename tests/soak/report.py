"""A soak's report: the books by kind, the faults, the daemons' RSS over time, and each
loss or double beside the fault just before it (the start of its diagnosis)."""

from __future__ import annotations

from collections import Counter

from tests.broker.http_client import http_get
from tests.soak.ledger import Miss, Reconciliation
from tests.soak.workload import Faults, Soak

__all__ = ["expired_total", "rss_growth", "soak_report"]

#: Rows of the RSS table, evenly spaced over the run.
RSS_ROWS = 11


def expired_total(metrics_ports: list[int]) -> int:
    """Messages the storage dropped as expired, summed over the daemons' /metrics."""
    total = 0.0
    for port in metrics_ports:
        status, body = http_get(port, "/metrics")
        assert status == 200, (port, status, body[:200])
        for line in body.decode().splitlines():
            if line.startswith("channels_broker_messages_expired_total "):
                total += float(line.split()[1])
    return int(total)


def rss_growth(soak: Soak) -> float:
    """The kept daemon's (the second's) RSS growth from the second quarter to the end:
    warm-up is over by then, and a leak keeps growing."""
    samples = [kbs[1] for _, kbs in soak.rss if len(kbs) > 1]
    quarter = max(len(samples) // 4, 1)
    settled = max(samples[quarter : 2 * quarter + 1])
    return max(samples[-quarter:]) / settled - 1


def _rss_table(soak: Soak) -> str:
    step = max(1, len(soak.rss) // (RSS_ROWS - 1))
    picked = soak.rss[::step]
    if picked[-1] is not soak.rss[-1]:
        picked.append(soak.rss[-1])
    lines = ["       t   daemon 1   daemon 2 (MiB; daemon 1 is the one SIGKILLed)"]
    for t, kbs in picked:
        cells = "".join(f"  {kb / 1024:9.1f}" if kb else "  (killed)" for kb in kbs)
        lines.append(f"  {t:6.0f}{cells}")
    return "\n".join(lines)


def _nearest_fault(faults: Faults, at: float) -> str:
    if not faults.done:
        return "no fault"
    began, ended, name = min(faults.done, key=lambda done: abs(done[0] - at))
    return f"{at - began:+.2f} s from '{name}' ({began:.1f}-{ended:.1f} s)"


def _misses(title: str, misses: list[Miss], faults: Faults) -> list[str]:
    if not misses:
        return []
    lines = [f"{title} ({len(misses)}):"]
    for miss in misses[:50]:
        lines.append(
            f"  {miss.kind:6} {miss.message_id} to {miss.channel} sent at "
            f"{miss.sent_at:.2f} s, {_nearest_fault(faults, miss.sent_at)}"
        )
    return lines


def _refusals(soak: Soak, faults: Faults) -> list[str]:
    """Refused sends by reason, and how far after the fault nearest each began."""
    if not soak.ledger.refusals:
        return []
    lines = ["refused, by reason and by the fault nearest the send:"]
    nearest: Counter[tuple[str, str]] = Counter()
    for at, reason in soak.ledger.refusals:
        name = min(faults.done, key=lambda done: abs(done[0] - at))[2] if faults.done else "-"
        nearest[(reason, name)] += 1
    for (reason, name), n in nearest.most_common():
        lines.append(f"  {n:7,} {reason}, nearest '{name}'")
    return lines


def soak_report(title: str, books: Reconciliation, faults: Faults, soak: Soak, expired: int) -> str:
    kinds = Counter(name for *_, name in faults.done)
    return "\n".join(
        [
            title,
            "faults injected: " + ", ".join(f"{n} x {name}" for name, n in kinds.items()),
            books.table(expired),
            *_refusals(soak, faults),
            f"RSS over time; daemon 2's growth after warm-up {rss_growth(soak):+.1%}:",
            _rss_table(soak),
            *_misses("lost", books.lost, faults),
            *_misses("delivered twice", books.duplicated, faults),
            "",
        ]
    )
