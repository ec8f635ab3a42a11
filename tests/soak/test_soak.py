"""The soak: two daemons on Redis, then on PostgreSQL, under a site's traffic while a
daemon is SIGKILLed and restarted, the storage is restarted and client connections are
cut. The books must reconcile exactly and the daemons' memory stay flat.

``make test`` runs 30 seconds per storage with a smaller site; ``make soak`` runs
``CHANNELS_BROKER_SOAK_SECONDS`` (600 by default there) with hundreds of connections
and writes each report to ``CHANNELS_BROKER_SOAK_REPORT_DIR`` if set.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests import pg_server, servers
from tests.conftest import BrokerProcess
from tests.soak.workload import Faults, Soak, SoakShape

SECONDS = float(os.environ.get("CHANNELS_BROKER_SOAK_SECONDS", "30"))
#: The full shape for ``make soak``; the suite's 30 s run uses a small site.
SHAPE = (
    SoakShape()
    if SECONDS > 60
    else SoakShape(consumers=40, workers=6, senders=10, fault_every_s=5.0)
)
#: RSS of the daemon that is never killed may grow this much from the second quarter
#: of the run to its end (warm-up is over by then; a leak keeps growing).
RSS_GROWTH = 0.20

pytestmark = pytest.mark.timeout(SECONDS + 300)


class Storage:
    """A throwaway Redis (with an fsync'ed AOF) or PostgreSQL that can be restarted."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        if kind == "redis":
            self.redis = servers.RedisServer(appendonly=True)
            self.redis.start()
            self.url = f"{self.redis.url}?prefix={servers.session_prefix}"
        else:
            self.postgres = pg_server.PostgresServer()
            self.postgres.start()
            self.url = self.postgres.url

    def restart(self) -> None:
        if self.kind == "redis":
            self.redis.kill()
            self.redis.start()
        else:
            self.postgres.stop()
            self.postgres.start()

    def remove(self) -> None:
        if self.kind == "redis":
            self.redis.stop()
        else:
            self.postgres.cleanup()


@pytest.fixture(params=["redis", "postgresql"])
def storage(request: pytest.FixtureRequest) -> Iterator[Storage]:
    made = Storage(request.param)
    yield made
    made.remove()


@pytest.fixture
def daemons(storage: Storage) -> Iterator[list[BrokerProcess]]:
    made = [BrokerProcess(storage.url) for _ in range(2)]
    for daemon in made:
        daemon.start()
    yield made
    for daemon in made:
        daemon.kill()
        daemon.log_path.unlink(missing_ok=True)


def restart_killed(daemon: BrokerProcess) -> Callable[[], None]:
    def action() -> None:
        daemon.kill()
        daemon.start()

    return action


def rss_report(soak: Soak) -> tuple[str, float]:
    """The kept daemon's RSS over time, and its growth from the second quarter to the end."""
    samples = [(t, kbs[1]) for t, kbs in soak.rss if len(kbs) > 1]
    quarter = len(samples) // 4
    settled = max(kb for _, kb in samples[quarter : 2 * quarter + 1])
    final = max(kb for _, kb in samples[-max(quarter, 1) :])
    lines = [
        f"  {t:6.0f} s  {kb / 1024:7.1f} MiB" for t, kb in samples[:: max(1, len(samples) // 10)]
    ]
    return "\n".join(lines), final / settled - 1


async def test_soak_reconciles_exactly_with_flat_memory(
    storage: Storage, daemons: list[BrokerProcess]
) -> None:
    first, second = daemons
    soak = Soak([first.url, second.url], SHAPE, lambda: [d.process.pid for d in daemons])  # type: ignore[union-attr]
    faults = Faults(
        [
            ("SIGKILL daemon 1 and start it again", restart_killed(first)),
            (f"restart {storage.kind}", storage.restart),
            ("cut a consumer's connection", soak.cut_a_connection),
        ]
    )
    try:
        await soak.run(SECONDS, faults)
    finally:
        await soak.close()
    books = soak.ledger.reconcile()
    rss, growth = rss_report(soak)
    report = (
        f"soak on {storage.kind}, {SECONDS:.0f} s, {SHAPE}\n"
        f"faults: {faults.done}\n{books.summary()}\n"
        f"expired 0 (expiry {3600} s: nothing accepted may lapse)\n"
        f"RSS of daemon 2 (never killed), growth after warm-up {growth:+.1%}:\n{rss}\n"
    )
    print(report)
    if report_dir := os.environ.get("CHANNELS_BROKER_SOAK_REPORT_DIR"):
        Path(report_dir, f"soak-{storage.kind}.txt").write_text(report)
    assert faults.done, "faults happened"
    assert books.is_exact, (
        books.lost[:10],
        books.duplicated[:10],
        books.refused_yet_delivered[:10],
    )
    assert growth < RSS_GROWTH, rss
