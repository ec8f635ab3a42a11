"""``schema.sql``, the schema written out at its current version, against the migrations.

Installs replay the migrations; the file is there to be read. These tests hold the two
to one catalog on the real server: a schema built by replaying every migration and one
built from the file have the same functions (``pg_get_functiondef``), relations,
columns, indexes and constraints, the schema's own name normalised away.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import asyncpg
import pytest

from backends import SEQ_SPAN
from backends.postgres.schema import (
    SCHEMA_VERSION,
    current_schema_sql,
    current_version,
    migrate,
    placeholders,
)
from tests import pg_server

#: Catalog queries, each for the schema named by $1 and ordered, so rows compare as lists.
CATALOG = {
    "functions": """
        SELECT p.proname, pg_get_function_identity_arguments(p.oid), pg_get_functiondef(p.oid)
        FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = $1 ORDER BY 1, 2
    """,
    "relations": """
        SELECT c.relname, c.relkind::text, c.relpersistence::text, c.reloptions
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = $1 ORDER BY 1
    """,
    "columns": """
        SELECT c.relname, a.attnum, a.attname, format_type(a.atttypid, a.atttypmod),
               a.attnotnull, a.attidentity::text, a.attgenerated::text, a.attstorage::text,
               pg_get_expr(d.adbin, d.adrelid)
        FROM pg_attribute a
        JOIN pg_class c ON c.oid = a.attrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        WHERE n.nspname = $1 AND c.relkind = 'r' AND a.attnum > 0 AND NOT a.attisdropped
        ORDER BY 1, 2
    """,
    "indexes": """
        SELECT t.relname, i.relname, pg_get_indexdef(x.indexrelid)
        FROM pg_index x
        JOIN pg_class i ON i.oid = x.indexrelid
        JOIN pg_class t ON t.oid = x.indrelid
        JOIN pg_namespace n ON n.oid = t.relnamespace
        WHERE n.nspname = $1 ORDER BY 1, 2
    """,
    "constraints": """
        SELECT t.relname, k.conname, k.contype::text, pg_get_constraintdef(k.oid)
        FROM pg_constraint k
        JOIN pg_class t ON t.oid = k.conrelid
        JOIN pg_namespace n ON n.oid = k.connamespace
        WHERE n.nspname = $1 ORDER BY 1, 2
    """,
}


@pytest.fixture
def schemas(server_url: str) -> Iterator[tuple[str, str]]:
    """Two schemas of this test's own, (to replay the migrations in, to build from the
    file), dropped after it. Neither name holds the other, so each normalises alone."""
    base = f"{pg_server.session_schema}_{uuid.uuid4().hex[:6]}"
    names = (f"{base}_replayed", f"{base}_from_file")
    yield names
    for name in names:
        pg_server.drop_schema(server_url, name)


async def catalog(conn: asyncpg.Connection, schema: str) -> dict[str, list[tuple[object, ...]]]:
    """The schema's catalog, its own name and sweep lock key replaced by placeholders."""
    values = placeholders(schema, unlogged=False)

    def normalised(value: object) -> object:
        if isinstance(value, str):
            return value.replace(values["sweep_lock"], "{sweep_lock}").replace(schema, "{s}")
        if isinstance(value, list):
            return [normalised(item) for item in value]
        return value

    found: dict[str, list[tuple[object, ...]]] = {}
    for name, query in CATALOG.items():
        rows = await conn.fetch(query, schema)
        found[name] = [tuple(normalised(value) for value in row) for row in rows]
    return found


@pytest.mark.parametrize("unlogged", [False, True], ids=["logged", "unlogged"])
async def test_the_schema_file_builds_what_the_migrations_build(
    server_url: str, schemas: tuple[str, str], unlogged: bool
) -> None:
    replayed, from_file = schemas
    conn = await asyncpg.connect(server_url)
    try:
        assert await migrate(conn, replayed, unlogged=unlogged) == (0, SCHEMA_VERSION)
        async with conn.transaction():
            await conn.execute(current_schema_sql(from_file, unlogged=unlogged))
        assert await current_version(conn, from_file) == SCHEMA_VERSION
        expected, built = await catalog(conn, replayed), await catalog(conn, from_file)
        for part in CATALOG:
            assert expected[part], f"no {part} found: the query looks in the wrong place"
            assert built[part] == expected[part], part
        assert await migrate(conn, from_file, unlogged=unlogged) == (
            SCHEMA_VERSION,
            SCHEMA_VERSION,
        ), "migrate finds a schema built from the file up to date"
    finally:
        await conn.close()


async def test_version_6_reads_a_version_5_record_of_numbered_sends_the_same(
    server_url: str, schema: str
) -> None:
    """Version 5 kept a client's highest seq and the seqs up to it not stored; version 6
    keeps a bit per seq, set by a store. A record made before the upgrade says the same
    after it: stored below the highest but for those listed, nothing above it."""
    conn = await asyncpg.connect(server_url)
    try:
        assert await migrate(conn, schema, unlogged=False, up_to=5) == (0, 5)
        await conn.execute(
            f'INSERT INTO "{schema}".senders (ns, client, highest, unstored, expires_at)'
            " VALUES ('ns', 'c', 3000, '{2995, 2998, 500}', now() + interval '1 hour')"
        )
        assert await migrate(conn, schema, unlogged=False) == (5, SCHEMA_VERSION)
        stored = await conn.fetch(
            f'SELECT s.seq, "{schema}".seq_stored(r.highest, r.kept, s.seq, $1)'
            f' FROM "{schema}".senders r, unnest($2::bigint[]) AS s(seq) ORDER BY s.seq',
            SEQ_SPAN,
            [500, 2994, 2995, 2998, 3000, 3001],
        )
        assert [tuple(row) for row in stored] == [
            (500, True),  # more than SEQ_SPAN back: taken for stored, as before
            (2994, True),
            (2995, False),
            (2998, False),
            (3000, True),
            (3001, False),
        ]
    finally:
        await conn.close()
