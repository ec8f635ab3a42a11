"""The statements the PostgreSQL backend sends, for one schema; each is one round trip."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Statements"]

#: A held count counts only while its newest message is unexpired (``t``: its takes row).
_HELD = "(CASE WHEN t.held_until > now() THEN t.held ELSE 0 END)"

#: Each statement's SQL, formatted with ``s`` (the quoted schema), ``notify`` (its
#: notification channel, a quoted literal) and ``held``.
_TEMPLATES = {
    "send": "SELECT {s}.send_direct($1, $2, $3, $4, $5, $6, $7)",
    "send_many": "SELECT {s}.send_many($1, $2, $3, $4, $5, $6)",
    "group_send": (
        "SELECT delivered, skipped, unknown, stale, direct"
        " FROM {s}.group_send_direct($1, $2, $3, $4, $5, $6, $7, $8, $9)"
    ),
    "sweep": "SELECT * FROM {s}.sweep($1, $2, $3)",
    "take_many": "SELECT * FROM {s}.take_many($1, $2, $3, $4)",
    # Lock the oldest unexpired rows that no other taker holds, delete them, and
    # count them out (or as held) on the channel's ``takes`` row, in one statement;
    # also say whether more wait (from the statement's snapshot: a send since
    # then wakes by itself; expired rows not yet removed count: a spare wake-up).
    "take": """
            WITH picked AS (
                SELECT m.ctid FROM {s}.messages m
                WHERE m.ns = $1 AND m.channel = $2 AND m.expires_at > now()
                ORDER BY m.id LIMIT $3 FOR UPDATE SKIP LOCKED
            ), gone AS (
                DELETE FROM {s}.messages WHERE ctid = ANY(ARRAY(SELECT ctid FROM picked))
                RETURNING id, payload, expires_at
            ), counted AS (
                INSERT INTO {s}.takes AS t (ns, channel, taken, held, held_until)
                SELECT $1, $2, n.taken, CASE WHEN $4 THEN n.taken ELSE 0 END,
                       CASE WHEN $4 THEN n.last ELSE '-infinity'::timestamptz END
                FROM (SELECT count(*) AS taken, max(expires_at) AS last FROM gone) n
                WHERE n.taken > 0
                ON CONFLICT (ns, channel) DO UPDATE SET
                    taken = t.taken + excluded.taken,
                    held = CASE WHEN $4 THEN {held} + excluded.held ELSE t.held END,
                    held_until = greatest(t.held_until, excluded.held_until)
                RETURNING t.taken
            )
            SELECT id, payload, extract(epoch FROM expires_at - now())::float8,
                   coalesce((SELECT c.waiting FROM {s}.channels c
                             WHERE c.ns = $1 AND c.channel = $2), 0)
                   > (SELECT taken FROM counted)
            FROM gone ORDER BY id
        """,
    # Messages taken ahead and not handed out, back under their old ids (their
    # place in the queue) with what is left of their lives, counted in again
    # (the take counted them out); other daemons are told.
    "give_back": """
            WITH back AS (
                INSERT INTO {s}.messages (id, ns, channel, payload, expires_at)
                OVERRIDING SYSTEM VALUE
                SELECT b.id, $1, $2, b.payload, now() + make_interval(secs => b.ttl)
                FROM unnest($3::bigint[], $4::bytea[], $5::float8[]) AS b(id, payload, ttl)
                WHERE b.ttl > 0
                RETURNING 1
            ), counted AS (
                INSERT INTO {s}.channels AS c (ns, channel, waiting)
                SELECT $1, $2, n FROM (SELECT count(*) AS n FROM back) k WHERE k.n > 0
                ON CONFLICT (ns, channel) DO UPDATE SET waiting = c.waiting + excluded.waiting
                RETURNING 1
            )
            SELECT pg_notify({notify}, $1 || ' ' || $2) FROM counted
        """,
    "release_many": "SELECT {s}.release_many($1, $2, $3)",
    "channels_with_messages": """
            SELECT DISTINCT channel FROM {s}.messages
            WHERE ns = $1 AND client = $2 AND expires_at > now()
        """,
    "group_add": """
            INSERT INTO {s}.groups (ns, grp, channel, client, expires_at)
            VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5))
            ON CONFLICT (ns, grp, channel) DO UPDATE SET expires_at = excluded.expires_at
        """,
    "group_discard": "DELETE FROM {s}.groups WHERE ns = $1 AND grp = $2 AND channel = $3",
    "flush": """
            WITH m AS (DELETE FROM {s}.messages WHERE ns = $1),
                 c AS (DELETE FROM {s}.channels WHERE ns = $1),
                 t AS (DELETE FROM {s}.takes WHERE ns = $1)
            DELETE FROM {s}.groups WHERE ns = $1
        """,
    # Waiting channels among watched keys: a client id's channels, or a channel itself.
    "recheck": """
            SELECT DISTINCT m.ns, m.channel
            FROM unnest($1::text[], $2::text[]) AS w(ns, key)
            CROSS JOIN LATERAL (
                SELECT x.ns, x.channel FROM {s}.messages x
                WHERE x.ns = w.ns AND x.client = w.key AND x.expires_at > now()
                UNION ALL
                (SELECT x.ns, x.channel FROM {s}.messages x
                 WHERE x.ns = w.ns AND x.channel = w.key AND x.expires_at > now() LIMIT 1)
            ) m
        """,
    "top_channels": """
            SELECT c.ns, c.channel, c.waiting - coalesce(t.taken, 0) AS backlog
            FROM {s}.channels c LEFT JOIN {s}.takes t USING (ns, channel)
            WHERE c.waiting - coalesce(t.taken, 0) > 0
            ORDER BY backlog DESC, c.ns, c.channel LIMIT $1
        """,
    "stats": """
            WITH w AS (
                SELECT c.waiting - coalesce(t.taken, 0) AS left
                FROM {s}.channels c LEFT JOIN {s}.takes t USING (ns, channel)
            )
            SELECT (SELECT count(*) FROM w WHERE w.left > 0),
                   (SELECT coalesce(sum(w.left), 0)::bigint FROM w WHERE w.left > 0),
                   (SELECT count(*) FROM (SELECT DISTINCT ns, grp FROM {s}.groups) g),
                   (SELECT count(*) FROM {s}.groups)
        """,
}


@dataclass(frozen=True, slots=True)
class Statements:
    """SQL text for one schema; asyncpg prepares each once."""

    channels_with_messages: str
    flush: str
    give_back: str
    group_add: str
    group_discard: str
    group_send: str
    recheck: str
    release_many: str
    send: str
    send_many: str
    stats: str
    sweep: str
    take: str
    take_many: str
    top_channels: str

    @classmethod
    def for_schema(cls, s: str, notify: str) -> Statements:
        """The statements for the schema ``s`` (already quoted) and its notification
        channel ``notify`` (a quoted literal)."""
        values = {"s": s, "notify": notify, "held": _HELD}
        return cls(**{name: sql.format(**values) for name, sql in _TEMPLATES.items()})
