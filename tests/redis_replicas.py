"""Replicated Redis for failover tests: a primary with a replica watched by three
Sentinels, and a Cluster of three primaries each with a replica.

Both are throwaway redis-server processes on free ports, as in ``tests.servers``, and
each can be failed over while traffic runs: ``SentinelGroup.fail_over()`` asks the
Sentinels to promote the replica; ``ReplicatedCluster.fail_over(slot)`` promotes the
replica of the primary serving a slot (``CLUSTER FAILOVER``, the graceful kind, which
waits for the replica to catch up); ``ReplicatedCluster.move_slot(slot)`` migrates one
slot, key by key, to another primary, as ``redis-cli --cluster reshard`` would.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import redis

from tests.servers import (
    RedisCluster,
    RedisServer,
    cluster_port,
    note_own,
    ping,
    server_command,
)
from tests.waits import POLL_S, START_TIMEOUT_S

__all__ = ["SWITCH_TIMEOUT_S", "ReplicatedCluster", "SentinelGroup"]

#: How long a Sentinel waits before it calls an unanswering primary down, and how long
#: a failover may take: short, so that a test's failover takes seconds, not a minute.
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 5000
#: A failover (or a slot move) that takes longer than this is a broken test setup.
SWITCH_TIMEOUT_S = 30.0


#: How long one ``CLUSTER FAILOVER`` is given before it is asked again.
MANUAL_FAILOVER_S = 10.0


def _became(condition: Callable[[], bool], timeout_s: float) -> bool:
    """Whether ``condition`` holds within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL_S)
    return True


def _wait_until(what: str, condition: Callable[[], bool], timeout_s: float) -> None:
    if not _became(condition, timeout_s):
        raise RuntimeError(f"{what}: not within {timeout_s} s")


def _client(port: int) -> redis.Redis:
    return redis.Redis(port=port, decode_responses=True, socket_timeout=5)


def _role(port: int) -> str:
    """``master`` or ``slave``, as the server itself says."""
    return str(_client(port).execute_command("ROLE")[0])


def _caught_up(primary: int, replica: int) -> bool:
    """Whether ``replica`` has every write of ``primary`` (their offsets are equal)."""
    offset = _client(primary).info("replication")["master_repl_offset"]
    return bool(_client(replica).info("replication")["slave_repl_offset"] == offset)


def _is_synced_replica(port: int) -> bool:
    info = _client(port).info("replication")
    return info.get("role") == "slave" and info.get("master_link_status") == "up"


class _Sentinel:
    """One ``redis-server --sentinel`` process watching ``name``."""

    def __init__(self, name: str, primary_port: int, quorum: int) -> None:
        self.port = cluster_port()
        self.dir = Path(tempfile.mkdtemp(prefix="cb-sentinel-"))
        (self.dir / "sentinel.conf").write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {self.dir}\n"
            f"sentinel monitor {name} 127.0.0.1 {primary_port} {quorum}\n"
            f"sentinel down-after-milliseconds {name} {DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {name} {FAILOVER_TIMEOUT_MS}\n"
        )
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        note_own(self.port)
        self.process = subprocess.Popen(
            [shutil.which("redis-server") or "redis-server", str(self.dir / "sentinel.conf")]
            + ["--sentinel", "--logfile", str(self.dir / "log")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
        )
        _wait_until(f"sentinel on {self.port}", lambda: ping("127.0.0.1", self.port), 10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


class SentinelGroup:
    """A primary, one replica of it, and three Sentinels (quorum two) naming it."""

    NAME = "mymaster"

    def __init__(self) -> None:
        self.primary = RedisServer()
        self.replica = RedisServer(extra=("--replicaof", "127.0.0.1", str(self.primary.port)))
        self.sentinels = [_Sentinel(self.NAME, self.primary.port, quorum=2) for _ in range(3)]

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{sentinel.port}" for sentinel in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.NAME}"

    def start(self) -> None:
        self.primary.start()
        self.replica.start()
        _wait_until("replica in sync", lambda: _is_synced_replica(self.replica.port), 10)
        for sentinel in self.sentinels:
            sentinel.start()
        _wait_until("sentinels know each other and the replica", self._is_watched, 20)

    def _is_watched(self) -> bool:
        for sentinel in self.sentinels:
            client = _client(sentinel.port)
            replicas = client.execute_command("SENTINEL", "REPLICAS", self.NAME)
            peers = client.execute_command("SENTINEL", "SENTINELS", self.NAME)
            if len(replicas) != 1 or len(peers) != 2:
                return False
        return True

    def primary_port(self) -> int:
        """The port the Sentinels now name as primary."""
        _, port = _client(self.sentinels[0].port).execute_command(
            "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.NAME
        )
        return int(port)

    def fail_over(self) -> int:
        """Promote the replica (``SENTINEL FAILOVER``) without losing a write; return the
        new primary's port once every Sentinel names it and the old primary follows it.

        ``SENTINEL FAILOVER`` alone loses writes: the old primary goes on accepting them
        after the replica's promotion, until Sentinel demotes it (seconds later), and
        then drops them for the new primary's data (redis/redis#6062). So, as for a
        switchover that must lose nothing, writes are paused on the old primary (until
        the replica has them all), and it is made a replica of the new one as soon as
        the Sentinels name that; the writes it held back then meet a replica (READONLY)."""
        old = self.primary_port()
        new = self.replica.port if old == self.primary.port else self.primary.port
        old_url = f"redis://127.0.0.1:{old}"
        server_command(old_url, "CLIENT", "PAUSE", str(int(SWITCH_TIMEOUT_S * 1000)), "WRITE")
        try:
            _wait_until("replica caught up", lambda: _caught_up(old, new), SWITCH_TIMEOUT_S)
            sentinel_url = f"redis://127.0.0.1:{self.sentinels[0].port}"
            server_command(sentinel_url, "SENTINEL", "FAILOVER", self.NAME)
            _wait_until("Sentinels name the replica", lambda: self._named(new), SWITCH_TIMEOUT_S)
            server_command(old_url, "REPLICAOF", "127.0.0.1", str(new))
        finally:
            server_command(old_url, "CLIENT", "UNPAUSE")
        _wait_until("old primary follows", lambda: _is_synced_replica(old), SWITCH_TIMEOUT_S)
        return new

    def _named(self, port: int) -> bool:
        """Whether every Sentinel names ``port`` as the primary."""
        return {
            int(
                _client(s.port).execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.NAME)[1]
            )
            for s in self.sentinels
        } == {port}

    def stop(self) -> None:
        for sentinel in self.sentinels:
            sentinel.stop()
        self.replica.stop()
        self.primary.stop()


class ReplicatedCluster(RedisCluster):
    """Three primaries, each with one replica, joined by ``redis-cli --cluster create``."""

    def __init__(self) -> None:
        super().__init__(nodes=6, replicas=1)

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{server.port}" for server in self.servers[:3])
        return f"redis+cluster://{hosts}"

    def _wait_ok(self) -> None:
        """Until every node says the cluster is ok and every replica is in sync."""
        _wait_until("cluster ok on every node", self._is_ok, START_TIMEOUT_S * 3)

    def _is_ok(self) -> bool:
        for server in self.servers:
            if _client(server.port).cluster("info").get("cluster_state") != "ok":
                return False
            role = _client(server.port).info("replication").get("role")
            if role == "slave" and not _is_synced_replica(server.port):
                return False
        return True

    def _replica_port(self, primary_id: str) -> int | None:
        """The port of a replica of the primary ``primary_id``, if one is listed."""
        ports = [int(row["port"]) for row in self._nodes() if row["master"] == primary_id]
        return ports[0] if ports else None

    def _nodes(self) -> list[dict[str, str]]:
        """CLUSTER NODES as seen by the first node: id, port, flags, master, slots."""
        text = _client(self.servers[0].port).execute_command("CLUSTER", "NODES")
        rows = []
        for line in str(text).splitlines():
            fields = line.split()
            rows.append(
                {
                    "id": fields[0],
                    "port": fields[1].split(":")[1].split("@")[0],
                    "flags": fields[2],
                    "master": fields[3],
                    "slots": " ".join(fields[8:]),
                }
            )
        return rows

    def owner_port(self, slot: int) -> int:
        """The port of the primary that serves ``slot`` (as any node tells it)."""
        for start, end, primary, *_ in _client(self.servers[0].port).execute_command(
            "CLUSTER", "SLOTS"
        ):
            if start <= slot <= end:
                return int(primary[1])
        raise RuntimeError(f"no node serves slot {slot}")

    def _id_of(self, port: int) -> str:
        return str(_client(port).execute_command("CLUSTER", "MYID"))

    def fail_over(self, slot: int) -> int:
        """Promote the replica of the primary serving ``slot``; return its port once
        every node sees it serve the slot."""
        old_id = self._id_of(self.owner_port(slot))
        # After an earlier failover the old primary may not be listed as a replica yet
        # (and a StopIteration in a thread's future hangs the test instead of failing it).
        what = f"a replica of the primary serving slot {slot}"
        _wait_until(what, lambda: self._replica_port(old_id) is not None, SWITCH_TIMEOUT_S)
        port = self._replica_port(old_id)
        assert port is not None

        def switched() -> bool:
            return all(self._serves(s.port, slot, port) for s in self.servers) and (
                _is_synced_replica(self._port_of(old_id))
            )

        # Redis drops a manual failover that does not complete within 5 s (a replica
        # that catches up slowly on a loaded machine): asked again, as an operator would.
        for _ in range(int(SWITCH_TIMEOUT_S // MANUAL_FAILOVER_S)):
            server_command(f"redis://127.0.0.1:{port}", "CLUSTER", "FAILOVER")
            if _became(switched, MANUAL_FAILOVER_S):
                return port
        raise RuntimeError(f"Cluster failover: not within {SWITCH_TIMEOUT_S} s")

    def _port_of(self, node_id: str) -> int:
        return int(next(row["port"] for row in self._nodes() if row["id"] == node_id))

    def _serves(self, asked: int, slot: int, port: int) -> bool:
        for start, end, primary, *_ in _client(asked).execute_command("CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return int(primary[1]) == port
        return False

    def move_slot(self, slot: int, *, on_importing: Callable[[], None] = lambda: None) -> int:
        """Move ``slot`` to another primary, migrating its keys as ``redis-cli --cluster
        reshard`` does (IMPORTING, MIGRATING, MIGRATE per batch of keys, then NODE);
        ``on_importing`` runs while the slot is half moved. Return the new owner's port."""
        source_port = self.owner_port(slot)
        # A primary by its own account: right after a failover another node's view
        # (CLUSTER NODES) may still call the demoted one a master.
        target_port = next(
            server.port
            for server in self.servers
            if server.port != source_port and _role(server.port) == "master"
        )
        source, target = _client(source_port), _client(target_port)
        source_id, target_id = self._id_of(source_port), self._id_of(target_port)
        target.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        source.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        on_importing()
        while keys := source.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
            source.execute_command("MIGRATE", "127.0.0.1", target_port, "", 0, 5000, "KEYS", *keys)
        for port in (target_port, source_port):
            _client(port).execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        _wait_until(
            "slot moved on every node",
            lambda: all(self._serves(s.port, slot, target_port) for s in self.servers),
            SWITCH_TIMEOUT_S,
        )
        return target_port
