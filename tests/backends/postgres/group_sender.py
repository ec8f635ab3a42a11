"""A group send in a process of its own, timing each of its statements.

``python -m tests.backends.postgres.group_sender URL NS GROUP`` sends one message to
the group and prints one JSON line: the members it reached, and how long each
statement took (seconds, from the client). A test that probes other clients meanwhile
runs this apart, so that the group send's own Python work does not slow its probes.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import Any
from urllib.parse import urlsplit

from backends.postgres.backend import PostgresBackend
from broker.daemon.capacity import CapacityPolicy
from tests.run_queue import waited_s

#: Hosts whose server processes are this machine's (a Unix socket has no host).
LOCAL_HOSTS = {None, "", "127.0.0.1", "localhost", "::1"}


async def group_send(url: str, ns: str, group: str) -> dict[str, Any]:
    backend = PostgresBackend.from_url(url)
    await backend.connect()
    took: list[float] = []
    waited: list[float] = []
    fetchrow = backend._db.fetchrow
    is_local = urlsplit(url).hostname in LOCAL_HOSTS

    async def timed(sql: str, *args: Any) -> Any:
        # Our connections' server processes (``own_pids``): the statement runs in one.
        pids = [os.getpid(), *backend._db.own_pids] if is_local else []
        waited_before = sum(map(waited_s, pids))
        started = time.perf_counter()
        try:
            return await fetchrow(sql, *args)
        finally:
            took.append(time.perf_counter() - started)
            waited.append(sum(map(waited_s, pids)) - waited_before)

    backend._db.fetchrow = timed  # type: ignore[method-assign]
    try:
        result = await backend.group_send(
            ns, group, b"hello", capacity_of=CapacityPolicy(100), expiry_s=60
        )
    finally:
        await backend.close()
    delivered, skipped = len(result.delivered), result.skipped
    return {"delivered": delivered, "skipped": skipped, "took": took, "waited": waited}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(group_send(*sys.argv[1:4]))))
