"""The PostgreSQL backend's tables and functions, versioned, and the migration that installs them.

Theory of operation. Everything lives in one schema (``channels_broker`` unless the URL
says otherwise), so one database can hold several independent brokers and ``DROP
SCHEMA ... CASCADE`` removes one whole. ``schema_version`` holds one number; each entry
of ``MIGRATIONS`` brings the schema from the previous number to its own, and
``migrate`` applies the missing ones in one transaction under an advisory lock, so
daemons starting together never race (the second finds the work done).

Every install replays the migrations, a new schema as much as an old one: one route
to each version, the one every existing schema took, exercised by every start.
``schema.sql`` holds the same schema at ``SCHEMA_VERSION`` written out once, to be
read (how the tables count and lock is told there); a test holds it equal to what the
migrations build (``current_schema_sql`` gives its text for one schema).
"""

from __future__ import annotations

import logging
import re
from importlib import resources
from typing import TYPE_CHECKING, Any

from backends import BackendError

from .migrations import EXPRESSIONS, MIGRATIONS

if TYPE_CHECKING:
    import asyncpg

    from .pool import Database
    from .url import PostgresOptions

__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "TABLES",
    "current_schema_sql",
    "current_version",
    "migrate",
    "migrate_with",
    "placeholders",
    "prepare_schema",
    "quote_ident",
    "quote_literal",
]

log = logging.getLogger("channels_broker.backends.postgres")

#: Tables whose persistence follows the ``unlogged`` option.
TABLES = ("channels", "takes", "messages", "groups", "senders", "pushes")
SCHEMA_VERSION = MIGRATIONS[-1][0]

#: ``schema.sql``'s placeholders, those ``placeholders`` gives, replaced by name: SQL's
#: own braces (``'{}'``, an empty array) stay as they are written.
_FILE_PLACEHOLDER = re.compile(r"\{(s|notify|unlogged|sweep_lock)\}")

#: Key of the transaction advisory lock taken by ``migrate`` (arbitrary, fixed: b"cbmigrat").
_MIGRATE_LOCK = 0x63626D6967726174


def quote_ident(name: str) -> str:
    """``name`` as a quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def quote_literal(text: str) -> str:
    """``text`` as a quoted SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


async def current_version(conn: asyncpg.Connection, schema: str) -> int:
    """The schema's version: 0 when it has no ``schema_version`` table yet."""
    exists = await conn.fetchval(
        "SELECT to_regclass($1) IS NOT NULL", f"{quote_ident(schema)}.schema_version"
    )
    if not exists:
        return 0
    version = await conn.fetchval(f"SELECT max(version) FROM {quote_ident(schema)}.schema_version")
    return int(version or 0)


async def migrate(
    conn: asyncpg.Connection, schema: str, *, unlogged: bool, up_to: int = SCHEMA_VERSION
) -> tuple[int, int]:
    """Bring ``schema`` to ``SCHEMA_VERSION`` (or the earlier ``up_to``, to test
    upgrades); return (version before, version after).

    Also sets the tables' persistence to match ``unlogged`` (a table rewrite when it
    changes). Raises ``ValueError`` if the schema is newer than this code knows.
    """
    quoted = quote_ident(schema)
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATE_LOCK)
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {quoted}")
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {quoted}.schema_version (version integer NOT NULL)"
        )
        before = await current_version(conn, schema)
        if before > SCHEMA_VERSION:
            raise ValueError(
                f"schema {schema} is at version {before}, newer than this daemon's "
                f"{SCHEMA_VERSION}: upgrade channels-broker"
            )
        values = placeholders(schema, unlogged=unlogged)
        values["held"] = EXPRESSIONS["held"]
        values["used"] = EXPRESSIONS["used"].format(**values)
        values["live_member"] = EXPRESSIONS["live_member"]
        for version, sql in MIGRATIONS:
            if before < version <= up_to:
                await conn.execute(sql.format(**values))
                await conn.execute(
                    f"DELETE FROM {quoted}.schema_version; "
                    f"INSERT INTO {quoted}.schema_version VALUES ({version})"
                )
        await _set_persistence(conn, schema, unlogged=unlogged)
    return before, max(before, up_to)


def placeholders(schema: str, *, unlogged: bool) -> dict[str, str]:
    """What the SQL's placeholders stand for in ``schema``: ``s`` (the quoted schema),
    ``notify`` (its notification channel, a literal), ``unlogged`` and ``sweep_lock``
    (the sweep's advisory lock key)."""
    return {
        "s": quote_ident(schema),
        "notify": quote_literal(schema),
        "unlogged": "UNLOGGED" if unlogged else "",
        "sweep_lock": str(_sweep_lock(schema)),
    }


def current_schema_sql(schema: str, *, unlogged: bool) -> str:
    """``schema.sql`` for ``schema``: the SQL that builds it at ``SCHEMA_VERSION`` in one
    go (to read, and to compare with what ``migrate`` builds; installs use ``migrate``)."""
    text = resources.files("backends.postgres").joinpath("schema.sql").read_text("utf-8")
    values = placeholders(schema, unlogged=unlogged)
    return _FILE_PLACEHOLDER.sub(lambda name: values[name[1]], text)


async def _set_persistence(conn: asyncpg.Connection, schema: str, *, unlogged: bool) -> None:
    wanted = "u" if unlogged else "p"
    for table in TABLES:
        name = f"{quote_ident(schema)}.{table}"
        current = await conn.fetchval(
            "SELECT relpersistence::text FROM pg_class WHERE oid = to_regclass($1)", name
        )
        if current is not None and current != wanted:
            await conn.execute(f"ALTER TABLE {name} SET {'UNLOGGED' if unlogged else 'LOGGED'}")


def _sweep_lock(schema: str) -> int:
    """A per-schema advisory lock key for the sweeper (stable across processes)."""
    value = 0
    for byte in f"channels-broker sweep {schema}".encode():
        value = (value * 131 + byte) % (1 << 62)
    return value


async def prepare_schema(db: Database, options: PostgresOptions) -> None:
    """A daemon's start: migrate the schema (``options.migrate``), or check that it is
    at ``SCHEMA_VERSION``; raise ``BackendError`` if it is not."""
    if options.migrate:
        before, after = await db.run(lambda conn: migrate_with(conn, options))
        if before != after:
            log.info("migrated schema %s from version %d to %d", options.schema, before, after)
        return
    version = await db.run(lambda conn: current_version(conn, options.schema))
    if version != SCHEMA_VERSION:
        raise BackendError(
            f"schema {options.schema} is at version {version}, this daemon needs "
            f"{SCHEMA_VERSION}: run 'channels-broker migrate' first, "
            "or start without --no-migrate"
        )


async def migrate_with(conn: Any, options: PostgresOptions) -> tuple[int, int]:
    """``migrate`` as ``options`` say, its refusal a ``BackendError``."""
    try:
        return await migrate(conn, options.schema, unlogged=options.unlogged)
    except ValueError as exc:
        raise BackendError(str(exc)) from exc
