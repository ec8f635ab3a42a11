"""Storage failing as a daemon reserves room again after a burst of windowed SENDs.

The soak saw it 76 times in ten minutes through Redis restarts: the burst was stored,
then the refill (``reserve_room``, ``broker/daemon/sends.py``) met storage going down,
and the connection's handler died with a traceback. Nothing was lost (the layer sent
again), but a storage error there must not end the connection: no room is granted,
and the sender asks for room again with a request. Here storage fails exactly there,
every time: PostgreSQL's ``reserve_room`` is replaced, in a schema of the test's own,
by one that raises, while the functions that store keep working.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import asyncpg
import pytest

from broker.layer import BrokerChannelLayer
from tests import pg_server
from tests.conftest import BrokerProcess
from tests.waits import DELIVERY_TIMEOUT_S

#: Sends in a round, then received (fewer than a channel's default capacity), and
#: rounds: enough for several refills of the layer's window.
ROUND = 40
ROUNDS = 8

_FAILING_RESERVE_ROOM = """
CREATE OR REPLACE FUNCTION {s}.reserve_room(p_ns text, p_channel text, p_client text,
                                            p_capacity integer, p_window integer,
                                            p_lapse_s double precision, p_holder text)
RETURNS integer LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'storage failing under the refill';
END $$
"""


@pytest.fixture
def schema_url() -> Iterator[tuple[str, str]]:
    """A PostgreSQL URL with a schema of this test's own, and the server's URL."""
    server = pg_server.backend_url("postgresql://").split("?", 1)[0]
    schema = f"{pg_server.session_schema}_{uuid.uuid4().hex[:6]}"
    yield pg_server.with_schema(server, schema), server
    pg_server.drop_schema(server, schema)


async def test_a_refill_that_storage_fails_does_not_end_the_connection(
    schema_url: tuple[str, str], unique: Callable[[str], str]
) -> None:
    """1. A daemon on its own schema; a layer sends one message (the schema is in).
    2. ``reserve_room`` now always fails; the layer sends ``ROUNDS`` rounds of ``ROUND``
       more (each received before the next), windowed while it holds room (each
       burst's refill fails).
    3. Every message comes, in order; the daemon logged the failed refills as warnings,
       and no traceback: no connection handler died."""
    url, server = schema_url
    daemon = BrokerProcess(url)
    daemon.start()
    layer = BrokerChannelLayer(hosts=[daemon.url])
    try:
        channel = unique("jobs")
        await layer.send(channel, {"n": 0})
        conn = await asyncpg.connect(server)
        try:
            schema = url.rsplit("schema=", 1)[1]
            await conn.execute(_FAILING_RESERVE_ROOM.format(s=f'"{schema}"'))
        finally:
            await conn.close()
        received = [(await layer.receive(channel))["n"]]
        for start in range(1, ROUND * ROUNDS + 1, ROUND):
            for number in range(start, start + ROUND):
                await layer.send(channel, {"n": number})
            received += [(await layer.receive(channel))["n"] for _ in range(ROUND)]
        assert received == list(range(ROUND * ROUNDS + 1))
        daemon.wait_for_log(lambda line: "could not reserve room" in line, DELIVERY_TIMEOUT_S)
        assert "Traceback" not in daemon.stderr_text()
    finally:
        await layer.close()
        daemon.cleanup()
