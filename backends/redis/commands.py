"""How the Redis backend's operations reach Redis: in order, queued releases first.

Theory of operation. Every script and command of the backend goes through one
``Commands``, which holds the ``Topology`` while connected. A ``release`` (held
messages acknowledged) is not sent, nor waited for, on its own: it is queued, and the
releases queued during one loop pass go out together as one RELEASE script per slot,
at the end of the pass or before the next command of this daemon, whichever comes
first. Commands of a daemon on one connection run in the order they were issued (see
``pipe``), so a send or take issued after a release sees its effect without waiting
for it. If the connection breaks before Redis runs a release, the count lapses with
the held messages' deadlines.

Work nobody awaits (grabbed messages going back, a release re-sent as EVAL, a
client's channels looked at again) runs as background tasks kept here, so that
``close`` can give them a moment to finish and then cancel the rest.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import defaultdict
from collections.abc import Coroutine, Sequence
from typing import Any

from redis.exceptions import AskError, NoScriptError

from backends import BackendError, BackendUnavailable

from .keys import Keys
from .pushed_scripts import END_PUSHED
from .scripts import RELEASE, Script
from .topology import Topology

__all__ = ["Commands"]

log = logging.getLogger("channels_broker.backends.redis")


class Commands:
    """The topology while connected, releases not yet sent, and background tasks."""

    def __init__(self) -> None:
        self.topology: Topology | None = None
        self._releases: dict[str, int] = {}  # held-count key -> count, not yet sent
        #: (held, lease hash, lease zset) -> leases of pushed messages to end, not yet sent.
        self._ends: dict[tuple[str, ...], list[str]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    def require(self) -> Topology:
        """The topology; raise ``BackendError`` when the backend is not connected."""
        if self.topology is None:
            raise BackendError("the Redis backend is not connected")
        return self.topology

    async def run(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run a script on the node of ``keys[0]``, after the queued releases."""
        topology = self.require()
        if self._releases or self._ends:
            self.send_releases()  # releases go first: later commands see their effect
        return await topology.run(script, keys, args)

    async def command(self, key: str, *command: str | bytes | int | float) -> Any:
        """Run one command on the node of ``key``, after the queued releases."""
        topology = self.require()
        if self._releases or self._ends:
            self.send_releases()
        return await topology.command(key, *command)

    # -- releases --------------------------------------------------------------

    def release(self, key: str, count: int) -> None:
        """Queue ``count`` off the held count at ``key``; sent with this pass's others."""
        if count <= 0:
            return
        self.require()
        self._releases[key] = self._releases.get(key, 0) + count
        if len(self._releases) == 1 and not self._ends:
            asyncio.get_running_loop().call_soon(self.send_releases)

    def end_leases(self, keys: Sequence[str], leases: Sequence[str]) -> None:
        """Queue the end of pushed messages' leases (``pushed``), which uncounts them as
        held: sent with this pass's releases. ``keys``: held, lease hash, lease zset."""
        if not leases:
            return
        self.require()
        if not (self._releases or self._ends):
            asyncio.get_running_loop().call_soon(self.send_releases)
        self._ends.setdefault(tuple(keys), []).extend(leases)

    def send_releases(self) -> None:
        """Send the queued releases and ends of leases: one script each per slot
        (Cluster) or one in all."""
        if self._ends:
            self._send_ends()
        releases, self._releases = self._releases, {}
        topology = self.topology
        if not releases or topology is None:
            return
        groups: dict[int, list[str]] = defaultdict(list)
        for key in releases:
            groups[Keys.slot(key) if topology.is_cluster else 0].append(key)
        for keys in groups.values():
            counts = [releases[key] for key in keys]
            try:
                future = topology.pipe_for(keys[0]).call(
                    "EVALSHA", RELEASE.sha, len(keys), *keys, *counts
                )
            except BackendUnavailable as exc:
                log.warning("release of held messages failed: %s", exc)
                continue
            future.add_done_callback(functools.partial(self._released, keys=keys, counts=counts))

    def _send_ends(self) -> None:
        ends, self._ends = self._ends, {}
        topology = self.topology
        if topology is None:
            return
        groups: dict[int, list[tuple[str, ...]]] = defaultdict(list)
        for three in ends:
            groups[Keys.slot(three[0]) if topology.is_cluster else 0].append(three)
        for channels in groups.values():
            keys = [key for three in channels for key in three]
            args: list[Any] = []
            for three in channels:
                args += [len(ends[three]), *ends[three]]
            try:  # on the pipe now, as releases are: later commands see the ends
                future = topology.pipe_for(keys[0]).call(
                    "EVALSHA", END_PUSHED.sha, len(keys), *keys, *args
                )
            except BackendUnavailable as exc:
                log.warning("ending the leases of pushed messages failed: %s", exc)
                continue
            future.add_done_callback(functools.partial(self._ended, keys=keys, args=args))

    def _ended(self, done: asyncio.Future[Any], *, keys: list[str], args: list[Any]) -> None:
        if done.cancelled() or done.exception() is None or self.topology is None:
            return
        if isinstance(done.exception(), NoScriptError | AskError):
            self.spawn(self.require().run(END_PUSHED, keys, args))
        else:  # they lapse, and their messages come again: the layer drops the copies
            log.warning("ending the leases of pushed messages failed: %s", done.exception())

    def _released(self, done: asyncio.Future[Any], *, keys: list[str], counts: list[int]) -> None:
        if done.cancelled() or done.exception() is None or self.topology is None:
            return
        exc = done.exception()
        if isinstance(exc, NoScriptError | AskError):  # AskError covers MOVED too
            self.spawn(self.require().run(RELEASE, keys, counts))
        else:
            log.warning("release of held messages failed: %s", exc)

    # -- background work -------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run ``coro`` in the background; a failure is logged, not raised."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("Redis background operation failed: %s", task.exception())

    async def settle(self, timeout_s: float) -> None:
        """Give the background tasks up to ``timeout_s`` to finish."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout_s)

    async def close(self) -> None:
        """Cancel the background tasks and close the topology. Idempotent."""
        for task in self._tasks:
            task.cancel()
        self._tasks.clear()
        topology, self.topology = self.topology, None
        if topology is not None:
            await topology.close()
