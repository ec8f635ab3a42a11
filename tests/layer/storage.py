"""Reading a shared backend's storage raw, as someone with access to Redis or PostgreSQL
(or to their backups) would: every value under the test session's key prefix, every row
of the session's schema. For tests of what the daemon leaves readable there."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg
import redis.asyncio as redis

__all__ = ["storage_holds"]


async def storage_holds(backend_url: str, needle: bytes) -> bool:
    """Whether ``needle`` occurs anywhere the backend at ``backend_url`` keeps data."""
    scheme = urlsplit(backend_url).scheme
    if scheme.startswith("redis"):
        return any(needle in value for value in await _redis_values(backend_url))
    if scheme.startswith("postgres"):
        # A row as text shows bytea as \x and lowercase hex.
        rows = await _postgres_rows(backend_url)
        return any(needle.hex() in row or needle.decode(errors="replace") in row for row in rows)
    raise ValueError(f"no raw reader for {scheme}://")


async def _redis_values(backend_url: str) -> list[bytes]:
    """Every member of every key under the URL's ``prefix``, on each node (Cluster too)."""
    parts = urlsplit(backend_url)
    prefix = parse_qs(parts.query)["prefix"][0]
    db = int(parts.path.strip("/") or 0)
    values: list[bytes] = []
    for node in parts.netloc.split(","):
        host, _, port = node.rpartition(":")
        async with redis.Redis(host=host, port=int(port), db=db) as client:
            async for key in client.scan_iter(match=f"{prefix}:*", count=1000):
                values += await _values_of(client, key)
    return values


async def _values_of(client: Any, key: bytes) -> list[bytes]:
    """The values of ``key`` (bytes: the client does not decode responses)."""
    kind = (await client.type(key)).decode()
    if kind == "string":
        value = await client.get(key)
        return [value] if value is not None else []
    if kind == "list":
        return list(await client.lrange(key, 0, -1))
    if kind == "set":
        return list(await client.smembers(key))
    if kind == "zset":
        return list(await client.zrange(key, 0, -1))
    if kind == "hash":
        return [item for pair in (await client.hgetall(key)).items() for item in pair]
    if kind == "none":  # expired between SCAN and TYPE
        return []
    raise AssertionError(f"a {kind} key {key!r}: teach this reader to read it")


async def _postgres_rows(backend_url: str) -> list[str]:
    """Every row of every table in the URL's ``schema``, each as PostgreSQL's text of it."""
    parts = urlsplit(backend_url)
    schema = parse_qs(parts.query)["schema"][0]
    conn = await asyncpg.connect(parts._replace(query="").geturl(), timeout=5)
    try:
        tables = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = $1", schema)
        assert tables, f"no tables in schema {schema}"
        rows: list[str] = []
        for table in tables:
            name = f'"{schema}"."{table["tablename"]}"'
            rows += [row[0] for row in await conn.fetch(f"SELECT t::text FROM {name} t")]
        return rows
    finally:
        await conn.close()
