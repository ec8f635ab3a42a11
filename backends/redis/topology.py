"""Which Redis connection serves which key: one server (direct, Unix socket, Sentinel) or a Cluster.

``Topology`` runs scripts and commands on the right ``Pipe`` and keeps wake-up channels
subscribed on the right ``Subscriber``. A single server has one of each. A Cluster has
one of each per primary, routed by slot from ``CLUSTER SLOTS``; a ``MOVED`` reply or a
lost node refreshes the map, ``ASK`` and ``TRYAGAIN`` are followed, and wake-up
subscriptions move with their slots (Redis tells a sharded subscriber with an
unasked ``sunsubscribe`` when a slot left its node).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable, Sequence
from typing import Any

from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
)
from redis.asyncio.sentinel import Sentinel
from redis.crc import key_slot
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    NoScriptError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TryAgainError,
)

from backends import BackendError, BackendUnavailable

from .lease_scripts import ALL_SCRIPTS as LEASE_SCRIPTS
from .link import ConnectionFactory
from .pipe import Pipe
from .pushed_scripts import PUSHED_SCRIPTS
from .room_scripts import ALL_SCRIPTS as ROOM_SCRIPTS
from .scripts import Script
from .subscriber import Subscriber
from .url import RedisSettings

__all__ = ["Topology"]

log = logging.getLogger("channels_broker.backends.redis")

Address = tuple[str, int]
Arg = str | bytes | int | float
#: Called with a wake-up channel and its message.
MessageHandler = Callable[[bytes, bytes], None]

SLOTS = 16384
#: How often a Cluster operation follows MOVED / ASK / TRYAGAIN before giving up.
REDIRECTS = 5
TRYAGAIN_PAUSE_S = 0.05
#: A Cluster map refresh is not repeated sooner than this, however many errors ask for one.
REFRESH_MIN_INTERVAL_S = 0.5
#: Every script of the backend (each module's list holds the common ones), loaded at
#: connect and found by SHA1 after a NOSCRIPT.
SCRIPTS = tuple(dict.fromkeys((*ROOM_SCRIPTS, *LEASE_SCRIPTS, *PUSHED_SCRIPTS)))


def _connection_kwargs(settings: RedisSettings) -> dict[str, Any]:
    return {
        "db": settings.db,
        "username": settings.username,
        "password": settings.password,
        # No socket read timeout: the subscriber idles for as long as nothing happens,
        # and command deadlines are the Pipe's (see pipe).
        "socket_timeout": None,
        "socket_connect_timeout": settings.connect_timeout_s,
        "socket_keepalive": True,
        "client_name": settings.client_name,
        "driver_info": None,  # no CLIENT SETINFO: one round trip less per connect
        "protocol": 2,
    }


def _make_connection(settings: RedisSettings, address: Address | None) -> AbstractConnection:
    kwargs = _connection_kwargs(settings)
    if settings.mode == "unix":
        del kwargs["socket_keepalive"]  # a TCP option
        return UnixDomainSocketConnection(path=settings.path, **kwargs)
    assert address is not None
    host, port = address
    if settings.tls:
        tls: dict[str, Any] = {"ssl_cert_reqs": "required", **settings.ssl}
        if tls["ssl_cert_reqs"] == "none":
            tls["ssl_cert_reqs"] = ssl.CERT_NONE
            tls.setdefault("ssl_check_hostname", False)
        return SSLConnection(host=host, port=port, **kwargs, **tls)
    return Connection(host=host, port=port, **kwargs)


async def _load_scripts(conn: AbstractConnection) -> None:
    """Load every script, so EVALSHA finds them (after a Redis restart too)."""
    await conn.send_packed_command(
        conn.pack_commands([("SCRIPT", "LOAD", script.source) for script in SCRIPTS])
    )
    for _ in SCRIPTS:
        await conn.read_response()


class Topology:
    """Routing of commands and subscriptions to the Redis servers of one backend."""

    def __init__(
        self,
        settings: RedisSettings,
        *,
        on_message: MessageHandler,
        on_subscribed: Callable[[bytes], None],
        on_up: Callable[[], None],
    ) -> None:
        self.settings = settings
        self.is_cluster = settings.mode == "cluster"
        self.publish_command = "SPUBLISH" if self.is_cluster else "PUBLISH"
        self._on_message = on_message
        self._on_subscribed = on_subscribed
        self._on_up = on_up
        self._sentinel: Sentinel | None = None
        self._pipes: dict[Address | None, Pipe] = {}
        self._subscribers: dict[Address | None, Subscriber] = {}
        self._slots: list[Address | None] = [None] * SLOTS
        self._placed: dict[bytes, Address | None] = {}  # wake-up channel -> its subscriber
        self._refreshed_at = -REFRESH_MIN_INTERVAL_S
        self._refreshing: asyncio.Task[None] | None = None
        self._opened = False

    # -- lifecycle -------------------------------------------------------------

    async def open(self) -> None:
        """Connect to every server needed now; raise ``BackendUnavailable``."""
        if self.is_cluster:
            await self._refresh()
            for address in {a for a in self._slots if a is not None}:
                await self._pipe(address).open()
                await self._subscriber(address).open()
        else:
            if self.settings.mode == "sentinel" and self._sentinel is None:
                self._sentinel = self._make_sentinel()
            await self._pipe(None).open()
            await self._subscriber(None).open()
        self._opened = True

    async def close(self) -> None:
        if self._refreshing is not None:
            self._refreshing.cancel()
        for link in [*self._pipes.values(), *self._subscribers.values()]:
            await link.close()
        self._pipes.clear()
        self._subscribers.clear()
        self._placed.clear()
        self._opened = False
        if self._sentinel is not None:
            for client in self._sentinel.sentinels:
                await client.aclose()
            self._sentinel = None

    def pipes(self) -> list[Pipe]:
        return list(self._pipes.values())

    def is_up(self) -> bool:
        links = [*self._pipes.values(), *self._subscribers.values()]
        return bool(links) and all(link.is_up for link in links)

    # -- commands --------------------------------------------------------------

    def pipe_for(self, key: str) -> Pipe:
        """The pipe of the server holding ``key`` (raises ``BackendUnavailable`` if none)."""
        if not self.is_cluster:
            return self._pipe(None)
        address = self._slots[_slot(key)]
        if address is None:
            self.refresh_soon()
            raise BackendUnavailable("no Redis Cluster node serves this slot right now")
        return self._pipe(address)

    async def run(self, script: Script, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        """Run ``script`` (EVALSHA, EVAL if unknown) on the node of ``keys[0]``."""
        return await self.command(keys[0], "EVALSHA", script.sha, len(keys), *keys, *args)

    async def command(self, key: str, *command: Arg) -> Any:
        """Run one command on the node of ``key``, following Cluster redirects."""
        asking: Address | None = None
        for _ in range(REDIRECTS):
            pipe = self._pipe(asking) if asking is not None else self.pipe_for(key)
            if not pipe.ever_up:  # a node we have not talked to yet (resharding)
                await pipe.open()
            try:
                if asking is not None:
                    pipe.call("ASKING")
                return await pipe.call(*command)
            except ResponseError as exc:
                command, asking = await self._after_refusal(exc, command, pipe)
            except BackendUnavailable:
                self.refresh_soon()
                raise
        raise BackendUnavailable(f"Redis Cluster kept redirecting {command[0]!r}")

    async def _after_refusal(
        self, exc: ResponseError, command: tuple[Arg, ...], pipe: Pipe
    ) -> tuple[tuple[Arg, ...], Address | None]:
        """What to try next after an error reply: (command, ASK target); or raise."""
        if isinstance(exc, NoScriptError):
            return _as_eval(command), None
        if isinstance(exc, MovedError):
            self._slots[exc.slot_id] = (exc.host, int(exc.port))
            self.refresh_soon()
            return command, None
        if isinstance(exc, AskError):
            return command, (exc.host, int(exc.port))
        if isinstance(exc, TryAgainError):
            await asyncio.sleep(TRYAGAIN_PAUSE_S)
            return command, None
        if isinstance(exc, ClusterDownError):
            self.refresh_soon()
            raise BackendUnavailable(f"Redis Cluster is down: {exc}") from exc
        if isinstance(exc, ReadOnlyError):
            # A failover made our server a replica: reconnect (Sentinel finds the master).
            if pipe.conn is not None:
                pipe.fail(pipe.conn, exc)
            raise BackendUnavailable(f"Redis is read-only (failover?): {exc}") from exc
        raise BackendError(f"Redis refused {command[0]!r}: {exc}") from exc

    # -- wake-up subscriptions -------------------------------------------------

    def subscribe(self, channels: Sequence[bytes]) -> None:
        for channel in channels:
            address = self._slots[_slot_of_bytes(channel)] if self.is_cluster else None
            self._placed[channel] = address
            self._subscriber(address).subscribe([channel])

    def is_listening(self, channel: bytes) -> bool:
        """True if Redis confirmed our subscription to ``channel`` and it still holds."""
        subscriber = self._subscribers.get(self._placed.get(channel))
        return subscriber is not None and channel in subscriber.active

    def unsubscribe(self, channels: Sequence[bytes]) -> None:
        for channel in channels:
            address = self._placed.pop(channel, None)
            subscriber = self._subscribers.get(address)
            if subscriber is not None:
                subscriber.unsubscribe([channel])

    # -- internals -------------------------------------------------------------

    def _pipe(self, address: Address | None) -> Pipe:
        pipe = self._pipes.get(address)
        if pipe is None:
            pipe = self._pipes[address] = Pipe(
                _name(address),
                self._factory(address),
                timeout_s=self.settings.timeout_s,
                setup=self._setup,
                on_up=self._on_up,
            )
        return pipe

    def _subscriber(self, address: Address | None) -> Subscriber:
        subscriber = self._subscribers.get(address)
        if subscriber is None:
            subscriber = self._subscribers[address] = Subscriber(
                f"{_name(address)} wake-ups",
                self._factory(address),
                timeout_s=self.settings.timeout_s,
                health_check_s=self.settings.health_check_s,
                sharded=self.is_cluster,
                on_message=self._on_message,
                on_subscribed=self._on_subscribed,
                on_dropped=self._dropped,
            )
            if address is not None and self._opened:
                subscriber.start()
        return subscriber

    def _factory(self, address: Address | None) -> ConnectionFactory:
        settings = self.settings

        async def make() -> AbstractConnection:
            if settings.mode == "sentinel":
                assert self._sentinel is not None
                try:
                    master = await self._sentinel.discover_master(settings.master_name)
                except RedisError as exc:
                    raise BackendUnavailable(f"Sentinel: {exc}") from exc
                return _make_connection(settings, (str(master[0]), int(master[1])))
            target = address if address is not None or not settings.hosts else settings.hosts[0]
            return _make_connection(settings, target)

        return make

    async def _setup(self, conn: AbstractConnection) -> None:
        if self.settings.mode == "sentinel":
            await conn.send_command("ROLE")
            role = await conn.read_response()
            if not role or role[0] != b"master":
                raise RedisError(f"{conn.host}:{conn.port} is not the master")  # type: ignore[attr-defined]
        await _load_scripts(conn)

    def _make_sentinel(self) -> Sentinel:
        s = self.settings
        sentinel_kwargs = {
            "username": s.sentinel_username,
            "password": s.sentinel_password,
            "socket_timeout": s.timeout_s,
            "socket_connect_timeout": s.connect_timeout_s,
        }
        return Sentinel(list(s.hosts), sentinel_kwargs=sentinel_kwargs)

    def refresh_soon(self) -> None:
        """Refresh the Cluster slot map in the background (debounced)."""
        if not self.is_cluster or self._refreshing is not None:
            return
        self._refreshing = asyncio.get_running_loop().create_task(self._refresh_quietly())

    async def _refresh_quietly(self) -> None:
        try:
            loop = asyncio.get_running_loop()
            await asyncio.sleep(max(0.0, self._refreshed_at + REFRESH_MIN_INTERVAL_S - loop.time()))
            await self._refresh()
        except BackendUnavailable as exc:
            log.warning("Redis Cluster map refresh failed: %s", exc)
        finally:
            self._refreshing = None

    async def _refresh(self) -> None:
        """Read the slot map from any node that answers, then move subscriptions."""
        self._refreshed_at = asyncio.get_running_loop().time()
        known = [a for a, p in self._pipes.items() if a is not None and p.is_up]
        candidates = known + [a for a in self.settings.hosts if a not in known]
        errors: list[str] = []
        for address in candidates:
            try:
                reply = await self._cluster_slots(address)
            except (RedisError, OSError, TimeoutError, BackendUnavailable) as exc:
                errors.append(f"{_name(address)}: {exc}")
                continue
            self._apply_slots(reply, address)
            return
        raise BackendUnavailable("no Redis Cluster node answered: " + "; ".join(errors))

    async def _cluster_slots(self, address: Address) -> Any:
        pipe = self._pipes.get(address)
        if pipe is not None and pipe.is_up:
            return await pipe.execute("CLUSTER", "SLOTS")
        conn = _make_connection(self.settings, address)
        try:
            async with asyncio.timeout(self.settings.timeout_s + self.settings.connect_timeout_s):
                await conn.connect()  # type: ignore[no-untyped-call]
                await conn.send_command("CLUSTER", "SLOTS")
                return await conn.read_response()
        finally:
            await conn.disconnect(nowait=True)

    def _apply_slots(self, reply: Any, asked: Address) -> None:
        slots: list[Address | None] = [None] * SLOTS
        for start, end, primary, *_ in reply:
            host: str = primary[0].decode() if primary[0] else asked[0]
            address: Address = (host, int(primary[1]))
            for slot in range(int(start), int(end) + 1):
                slots[slot] = address
        self._slots = slots
        for channel, placed in list(self._placed.items()):
            if slots[_slot_of_bytes(channel)] != placed:
                self.unsubscribe([channel])
                self.subscribe([channel])

    def _dropped(self, channel: bytes) -> None:
        """Redis unsubscribed us (its slot moved): subscribe again where it is now."""
        self._placed.pop(channel, None)
        self.refresh_soon()
        self.subscribe([channel])


def _as_eval(command: tuple[Arg, ...]) -> tuple[Arg, ...]:
    """EVALSHA sha ... -> EVAL source ... (the server lost its script cache)."""
    sha = command[1]
    script = next(s for s in SCRIPTS if s.sha == sha)
    return ("EVAL", script.source, *command[2:])


def _slot(key: str) -> int:
    return _slot_of_bytes(key.encode())


def _slot_of_bytes(key: bytes) -> int:
    return int(key_slot(key))


def _name(address: Address | None) -> str:
    return "server" if address is None else f"{address[0]}:{address[1]}"
