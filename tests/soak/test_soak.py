"""The soak: two daemons on Redis, then on PostgreSQL, under a site's traffic while a
daemon is SIGKILLed and restarted, the storage is restarted and client connections are
cut. The books must reconcile exactly and the daemons' memory stay flat.

``make test`` runs 30 seconds per storage with a smaller site; ``make soak`` runs
``CHANNELS_BROKER_SOAK_SECONDS`` (600 by default there) with hundreds of connections
and writes each report to ``CHANNELS_BROKER_SOAK_REPORT_DIR`` if set.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests import pg_server, servers
from tests.conftest import BrokerProcess
from tests.soak.report import (
    KILL,
    expired_total,
    rss_growth,
    soak_report,
)
from tests.soak.workload import Faults, Soak, SoakShape

SECONDS = float(os.environ.get("CHANNELS_BROKER_SOAK_SECONDS", "30"))
#: ``make soak``'s run (minutes); otherwise the suite's 30 s run.
LONG = SECONDS > 60
#: The full shape for ``make soak``; the suite's run uses a small site, and a fault
#: every 4 s so each kind comes at least once in 30 s even on a loaded machine.
SHAPE = SoakShape() if LONG else SoakShape(consumers=40, workers=6, senders=10, fault_every_s=4.0)
#: RSS of the daemon that is never killed may grow this much from the second quarter
#: of the run to its end: warm-up is over by then in minutes, and a leak keeps growing.
#: In 30 s the second quarter is 8 s in, some buffers are still growing: more room.
RSS_GROWTH = 0.10 if LONG else 0.20
#: Where each report goes, with the daemons' logs (for the diagnosis of a loss).
REPORT_DIR = os.environ.get("CHANNELS_BROKER_SOAK_REPORT_DIR")

pytestmark = [pytest.mark.timeout(SECONDS + 300), pytest.mark.slow]


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
    for n, daemon in enumerate(made, 1):
        daemon.kill()
        if REPORT_DIR:
            shutil.copy(daemon.log_path, Path(REPORT_DIR, f"soak-{storage.kind}-daemon{n}.log"))
        daemon.log_path.unlink(missing_ok=True)


def restart_killed(daemon: BrokerProcess) -> Callable[[], None]:
    def action() -> None:
        daemon.kill()
        daemon.start()

    return action


async def test_soak_reconciles_exactly_with_flat_memory(
    storage: Storage, daemons: list[BrokerProcess]
) -> None:
    first, second = daemons
    soak = Soak([first.url, second.url], SHAPE, lambda: [d.process.pid for d in daemons])  # type: ignore[union-attr]
    # The slowest fault last: in 30 s on a loaded machine each kind still comes once.
    faults = Faults(
        [
            ("cut a consumer's connection", soak.cut_a_connection),
            (KILL, restart_killed(first)),
            (f"restart {storage.kind}", storage.restart),
        ]
    )
    try:
        await soak.run(SECONDS, faults)
    finally:
        await soak.close()
    books = soak.ledger.reconcile()
    title = f"soak on {storage.kind}: {SECONDS:.0f} s, two daemons, {SHAPE}"
    expired = expired_total([d.metrics_port for d in daemons])
    report = soak_report(title, books, faults, soak, expired)
    print(report)
    if REPORT_DIR:
        Path(REPORT_DIR, f"soak-{storage.kind}.txt").write_text(report)
    assert {name for *_, name in faults.done} == {name for name, _ in faults.actions}, faults.done
    assert not (books.lost or books.duplicated or books.refused_yet_delivered), report
    assert not books.unexpected, report
    assert expired == 0, report
    assert rss_growth(soak) < RSS_GROWTH, report
