"""A group send in a process of its own, timing each of its statements.

``python -m tests.backends.postgres.group_sender URL NS GROUP`` sends one message to
the group and prints one JSON line: the members it reached, and how long each
statement took (seconds, from the client). A test that probes other clients meanwhile
runs this apart, so that the group send's own Python work does not slow its probes.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

from backends.postgres.backend import PostgresBackend
from broker.daemon.capacity import CapacityPolicy


async def group_send(url: str, ns: str, group: str) -> dict[str, Any]:
    backend = PostgresBackend.from_url(url)
    await backend.connect()
    took: list[float] = []
    fetchrow = backend._db.fetchrow

    async def timed(sql: str, *args: Any) -> Any:
        started = time.perf_counter()
        try:
            return await fetchrow(sql, *args)
        finally:
            took.append(time.perf_counter() - started)

    backend._db.fetchrow = timed  # type: ignore[method-assign]
    try:
        result = await backend.group_send(
            ns, group, b"hello", capacity_of=CapacityPolicy(100), expiry_s=60
        )
    finally:
        await backend.close()
    return {"delivered": len(result.delivered), "skipped": result.skipped, "took": took}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(group_send(*sys.argv[1:4]))))
