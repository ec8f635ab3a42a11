"""The statements the PostgreSQL backend sends, for one schema; each is one round trip."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Statements"]

#: Each statement's SQL, formatted with ``s`` (the quoted schema).
_TEMPLATES = {
    "send": "SELECT {s}.send_direct($1, $2, $3, $4, $5, $6, $7)",
    # send_direct, a direct push written leased to this daemon (see ``pushed``).
    "push_direct": "SELECT {s}.push_direct($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    "send_batch": "SELECT {s}.send_batch($1, $2, $3, $4, $5, $6)",
    "group_send": (
        "SELECT delivered, skipped, unknown, direct, known, last, members"
        " FROM {s}.group_push_slice($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12,"
        " $13, $14)"
    ),
    "sweep": "SELECT * FROM {s}.sweep($1, $2, $3)",
    "take_many": "SELECT * FROM {s}.take_many($1, $2, $3, $4)",
    # Takes that delete (process-specific channels, takes with hold): the oldest
    # unexpired messages nobody holds, counted out or as held; "more" says whether
    # others wait (from the statement's snapshot: a send since then wakes by itself).
    "take": "SELECT * FROM {s}.take($1, $2, $3, $4)",
    # Takes for workers: the messages stay, leased to this daemon, until it has
    # handed them out (ack) or gives them back (unlease); see schema.sql.
    "lease": "SELECT * FROM {s}.lease($1, $2, $3, $4, $5)",
    "ack": "SELECT {s}.ack($1, $2, $3, $4)",
    "unlease": "SELECT {s}.unlease($1, $2, $3, $4)",
    # Consumers' leases this daemon delivered, not yet acknowledged (``consumer_leases``):
    # each runs a whole lease from now. A row matches by its id and the take's token, so
    # one taken again since (a new token) is left alone, and one locked (being
    # acknowledged, or taken again after it lapsed) is skipped: renewed next time, if
    # still ours. Not a function of the schema: any version 7 or later runs it.
    "renew_leases": """
            UPDATE {s}.messages SET lease_until = now() + make_interval(secs => $5)
            WHERE ctid = ANY(ARRAY(
                SELECT x.ctid
                FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[])
                    AS k(ns, channel, id, lease)
                CROSS JOIN LATERAL (
                    SELECT m.ctid FROM {s}.messages m
                    WHERE m.ns = k.ns AND m.channel = k.channel AND m.id = k.id
                      AND m.lease = k.lease
                    FOR UPDATE SKIP LOCKED
                ) x))
        """,
    # Pushes to a client's own channels: leased until its layer acknowledges them
    # (``pushed``; schema.sql).
    # push_take of the schema (version 8), except that a message taken again after its
    # lease lapsed is not counted as held again: its first taker's count is still in
    # takes.held, and a daemon killed (SIGKILL) never releases it, so counting it twice
    # left the channel full of its dead daemon's pushes for as long as it stayed busy
    # (held_until kept moving). Its new taker's ACK releases that count. Not a function
    # of the schema: any version 8 or later runs it.
    "push_take": """
            WITH picked AS (
                SELECT p.ctid, p.fresh FROM unnest($2::text[]) AS k(name)
                CROSS JOIN LATERAL (
                    SELECT m.ctid, m.lease IS NULL AS fresh FROM {s}.messages m
                    WHERE m.ns = $1 AND m.channel = k.name AND m.expires_at > now()
                      AND (m.lease IS NULL OR m.lease_until <= now())
                    ORDER BY m.id LIMIT $3 FOR UPDATE SKIP LOCKED
                ) p
            ), leased AS (
                UPDATE {s}.messages m
                SET lease = $4, lease_until = now() + make_interval(secs => $5)
                FROM picked p WHERE m.ctid = p.ctid
                RETURNING m.channel, m.id, m.payload, m.expires_at, p.fresh
            ), counted AS (
                INSERT INTO {s}.takes AS t (ns, channel, taken, held, held_until)
                SELECT $1, l.channel, count(*) FILTER (WHERE l.fresh),
                       count(*) FILTER (WHERE l.fresh), max(l.expires_at)
                FROM leased l GROUP BY l.channel ORDER BY l.channel
                ON CONFLICT (ns, channel) DO UPDATE SET
                    taken = t.taken + excluded.taken,
                    held = CASE WHEN t.held_until > now() THEN t.held ELSE 0 END
                        + excluded.held,
                    held_until = greatest(t.held_until, excluded.held_until)
            ), quick AS (  -- as the function: the commit does not wait for the disk
                SELECT set_config('synchronous_commit', 'off', true)
            )
            SELECT l.channel, l.id, l.payload,
                   extract(epoch FROM l.expires_at - now())::float8
            FROM leased l, quick ORDER BY l.channel, l.id
        """,
    "ack_pushed": "SELECT {s}.ack_pushed($1, $2, $3, $4)",
    "unlease_pushed": "SELECT {s}.unlease_pushed($1, $2, $3, $4)",
    # What takes whose answer was lost leased ($3: their leases), back in its places.
    "unlease_lost": (
        "SELECT {s}.unlease_pushed($1, $2, array_agg(m.id), array_agg(m.lease)), count(*)"
        " FROM {s}.messages m WHERE m.ns = $1 AND m.channel = $2 AND m.lease = ANY($3)"
    ),
    "renew_pushed": "SELECT {s}.renew_pushed($1, $2, $3, $4, $5)",
    "end_pushes": "SELECT {s}.end_pushes($1)",
    "expand_pushes": "SELECT {s}.expand_pushes($1)",
    # Notifications of what committed transactions stored (see ``notifier``).
    "notify": "SELECT {s}.notify($1)",
    "release_many": "SELECT {s}.release_many($1, $2, $3)",
    # Messages pushed to a client and not acknowledged (Backend.give_back), back at the
    # head of their channel: ids below its oldest (ids need not be unique; none is
    # waiting: below the next one), counted in again.
    "give_back": """
            WITH c AS (
                INSERT INTO {s}.channels AS c (ns, channel, client, waiting)
                VALUES ($1, $2, $3, cardinality($4::bytea[]))
                ON CONFLICT (ns, channel) DO UPDATE SET waiting = c.waiting + excluded.waiting
                RETURNING 1
            ), head AS (
                SELECT coalesce(
                    (SELECT min(m.id) FROM {s}.messages m WHERE m.ns = $1 AND m.channel = $2),
                    nextval(pg_get_serial_sequence('{s}.messages', 'id'))) AS id
            )
            INSERT INTO {s}.messages (id, ns, channel, client, payload, expires_at)
            OVERRIDING SYSTEM VALUE
            SELECT head.id - cardinality($4::bytea[]) - 1 + g.i, $1, $2, $3, g.payload,
                   now() + make_interval(secs => g.ttl)
            FROM head, c, unnest($4::bytea[], $5::float8[]) WITH ORDINALITY AS g(payload, ttl, i)
        """,
    # A client's channels with messages to push: not leased (pushed and held by a
    # daemon), or leased and lapsed (its daemon died: the re-check finds those too).
    "channels_with_messages": """
            SELECT DISTINCT channel FROM {s}.messages
            WHERE ns = $1 AND client = $2 AND expires_at > now()
              AND (lease IS NULL OR lease_until <= now())
        """,
    "group_add": """
            INSERT INTO {s}.groups (ns, grp, channel, client, expires_at)
            VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5))
            ON CONFLICT (ns, grp, channel) DO UPDATE SET expires_at = excluded.expires_at
        """,
    "group_discard": "DELETE FROM {s}.groups WHERE ns = $1 AND grp = $2 AND channel = $3",
    # A page of a group's live members in name order (as group_send_slice reads them;
    # the expiry tested so that the sweep's index on it cannot serve the query).
    "members": """
            SELECT g.channel FROM {s}.groups g
            WHERE g.ns = $1 AND g.grp = $2 AND g.channel > $3
              AND g.expires_at - now() > interval '0'
            ORDER BY g.channel LIMIT $4
        """,
    "flush": """
            WITH m AS (DELETE FROM {s}.messages WHERE ns = $1),
                 p AS (DELETE FROM {s}.pushes WHERE ns = $1),
                 c AS (DELETE FROM {s}.channels WHERE ns = $1),
                 t AS (DELETE FROM {s}.takes WHERE ns = $1)
            DELETE FROM {s}.groups WHERE ns = $1
        """,
    # Waiting channels among watched keys: a client id's channels, or a channel itself,
    # with a message nobody holds (never leased, or its lease lapsed: its daemon died).
    "recheck": """
            SELECT DISTINCT m.ns, m.channel
            FROM unnest($1::text[], $2::text[]) AS w(ns, key)
            CROSS JOIN LATERAL (
                SELECT x.ns, x.channel FROM {s}.messages x
                WHERE x.ns = w.ns AND x.client = w.key AND x.expires_at > now()
                  AND (x.lease IS NULL OR x.lease_until <= now())
                UNION ALL
                (SELECT x.ns, x.channel FROM {s}.messages x
                 WHERE x.ns = w.ns AND x.channel = w.key AND x.expires_at > now()
                   AND (x.lease IS NULL OR x.lease_until <= now()) LIMIT 1)
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

    ack: str
    ack_pushed: str
    channels_with_messages: str
    end_pushes: str
    expand_pushes: str
    flush: str
    give_back: str
    group_add: str
    group_discard: str
    group_send: str
    lease: str
    members: str
    notify: str
    push_direct: str
    push_take: str
    recheck: str
    release_many: str
    renew_leases: str
    renew_pushed: str
    send: str
    send_batch: str
    stats: str
    sweep: str
    take: str
    take_many: str
    top_channels: str
    unlease: str
    unlease_lost: str
    unlease_pushed: str

    @classmethod
    def for_schema(cls, s: str) -> Statements:
        """The statements for the schema ``s`` (already quoted)."""
        return cls(**{name: sql.format(s=s) for name, sql in _TEMPLATES.items()})
