"""A soak's report: the books by kind, the faults, the daemons' RSS over time, and each
loss or double beside the fault just before it (the start of its diagnosis)."""

from __future__ import annotations

import time
from collections import Counter

from tests.broker.http_client import http_get
from tests.soak.ledger import Miss, Reconciliation
from tests.soak.workload import CAPACITY, Faults, Soak

__all__ = ["KILL", "expired_total", "pushes_lost_to_kills", "rss_growth", "soak_report"]

#: Rows of the RSS table, evenly spaced over the run.
RSS_ROWS = 11
#: The name of the fault that SIGKILLs a daemon.
KILL = "SIGKILL daemon 1 and start it again"
#: A push still in the killed daemon's hands was sent at most this long before the kill.
KILL_WINDOW_S = 2.0


def pushes_lost_to_kills(books: Reconciliation, faults: Faults) -> list[Miss]:
    """Losses of messages to consumers' own channels (sent there or group-sent) sent
    shortly before a daemon was SIGKILLed or while it was: pushes the killed daemon
    held (on PostgreSQL, not yet kept through a kill: docs/flow.md, *Not yet*)."""
    kills = [(began, ended) for began, ended, name in faults.done if name == KILL]
    return [
        miss
        for miss in books.lost
        if miss.kind in ("own", "group")
        and any(began - KILL_WINDOW_S <= miss.sent_at <= ended for began, ended in kills)
    ]


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
    """Refused sends by reason and kind: when, and how many of that kind were waiting
    undelivered then (near the capacity: the channel was full indeed)."""
    if not soak.ledger.refusals:
        return []
    lines = [f"refused (capacity {CAPACITY:,}), by reason and kind:"]
    groups: dict[tuple[str, str], list[tuple[float, int]]] = {}
    for at, reason, kind, waiting in soak.ledger.refusals:
        groups.setdefault((reason, kind), []).append((at, waiting))
    for (reason, kind), seen in sorted(groups.items()):
        times, waiting = [at for at, _ in seen], [w for _, w in seen]
        lines.append(
            f"  {len(seen):7,} {reason} ({kind}) from {min(times):.0f} s to {max(times):.0f} s, "
            f"{min(waiting):,}-{max(waiting):,} of that kind waiting then"
        )
    return lines


def _pushes_at_kills(books: Reconciliation, faults: Faults) -> list[str]:
    if not (pushed := pushes_lost_to_kills(books, faults)):
        return []
    return [
        f"  of these, {len(pushed)} were to consumers' own channels (sent or group-sent) at most "
        f"{KILL_WINDOW_S:.0f} s before a daemon SIGKILL (pushes the killed daemon held)"
    ]


def _loop_lag(soak: Soak) -> str:
    """How late the soak's own loop woke: its clients' lag behind the daemons."""
    lags = sorted(lag for _, lag in soak.loop_lag)
    if not lags:
        return "the soak's loop lag: no samples"
    worst_at, worst = max(soak.loop_lag, key=lambda sample: sample[1])
    return (
        f"the soak's own loop woke late by {lags[len(lags) // 2]:.2f} s (median), "
        f"{lags[int(len(lags) * 0.99)]:.2f} s (p99), {worst:.2f} s at worst (at {worst_at:.0f} s)"
    )


def _timeline(soak: Soak, faults: Faults) -> str:
    """When the traffic began (to read the daemons' logs by) and each fault."""
    began = time.strftime("%H:%M:%S", time.gmtime(soak.began_at))
    done = "; ".join(f"{a:.1f}-{b:.1f} s {name}" for a, b, name in faults.done)
    return f"traffic began at {began} UTC; faults: {done}"


def soak_report(title: str, books: Reconciliation, faults: Faults, soak: Soak, expired: int) -> str:
    kinds = Counter(name for *_, name in faults.done)
    return "\n".join(
        [
            title,
            "faults injected: " + ", ".join(f"{n} x {name}" for name, n in kinds.items()),
            books.table(expired),
            *_refusals(soak, faults),
            _loop_lag(soak),
            f"RSS over time; daemon 2's growth after warm-up {rss_growth(soak):+.1%}:",
            _rss_table(soak),
            *_misses("lost", books.lost, faults),
            *_pushes_at_kills(books, faults),
            *_misses("delivered twice", books.duplicated, faults),
            *(f"  {repeat}" for repeat in soak.ledger.repeats[:50]),
            _timeline(soak, faults),
            "",
        ]
    )
