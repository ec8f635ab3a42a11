-- The PostgreSQL backend's schema as it is at version 10 (SCHEMA_VERSION): every table,
-- index and function, each function at its latest version.
--
-- A schema is installed and upgraded by replaying the migrations (migrations.py, applied
-- by schema.py), never from this file: it is here to be read, and a test
-- (tests/backends/postgres/test_schema_file.py) checks that a schema built from it and
-- one built by the migrations have the same catalog. A change to the schema is a new
-- migration, and this file changed to match.
--
-- Placeholders, replaced by name (schema.current_schema_sql): {s} the quoted schema,
-- {notify} its notification channel (the schema's name as a literal), {unlogged}
-- UNLOGGED or nothing, {sweep_lock} the sweep's advisory lock key. Every other brace is
-- SQL's own ('{}' is an empty array).
--
-- Counting. A channel's messages are counted on two rows, so that senders and takers
-- never wait for each other: channels.waiting counts what senders put in (less the
-- expired messages removed), takes.taken what takers took out, and takes.held what was
-- taken with hold and not yet released. Senders lock the channels row while they check
-- waiting - taken + held against the capacity and insert, which makes check and insert
-- one step across daemons; they read takes without a lock (a take committing meanwhile
-- only makes the channel look fuller, as if the send came first). Takers lock only
-- takes rows. held lapses at held_until, the expiry of the newest held message, so a
-- daemon killed before releasing cannot shrink a channel for good. The sweep folds
-- taken back into waiting and forgets idle rows.
--
-- Leases. A take for a worker (a normal channel, without hold), or for a push (with
-- hold: see "Leased pushes", below, for those and for direct pushes), does not delete: it
-- leases the message (messages.lease, a token of the take, and lease_until), and a
-- daemon deletes it once the worker's layer acknowledged it (ack; or, for a layer that
-- does not, once the daemon has handed it out), or the taking daemon ends the lease
-- (unlease) to put it back in its place. A lease that lapses (its daemon was killed,
-- the DELIVER or the ACK was lost) leaves the message where it was, for any daemon to
-- take again, oldest first. A message is counted out (takes.taken) when first leased, as a take counts
-- out what it deletes; one whose lease lapsed was counted out already, so takes, the
-- sweep and reserve count only rows never leased (lease IS NULL), and unlease counts
-- back in (channels.waiting) what it puts back.
--
-- Durability. Sends commit as the session says (synchronous_commit, on unless the
-- server or the URL says otherwise); send_batch stores the sends of several clients
-- in one transaction (group commit). Takes, leases, acknowledgements, releases, the
-- sweep and notifications commit without waiting for the disk (set_config(
-- 'synchronous_commit', 'off', true)): one of those lost to a crash of PostgreSQL makes
-- a message come again (or be swept again), never lose it.
--
-- Two expressions recur in the functions: what counts against the capacity of the
-- channels row c (its "used" count),
--     (c.waiting - coalesce((SELECT t.taken - <held> FROM {s}.takes t
--                            WHERE t.ns = c.ns AND t.channel = c.channel), 0))
-- where <held>, a held count that counts only while its newest message is unexpired, is
--     (CASE WHEN t.held_until > now() THEN t.held ELSE 0 END)
-- and a membership still valid, g.expires_at - now() > interval '0', tested so that no
-- index on expires_at can serve it (see group_send).
--
-- Locks. Wherever several rows of one table are locked they are locked in name order,
-- and no statement waits for a channels lock while holding a takes one, so the
-- functions cannot deadlock with each other.
--
-- Notifications carry names only: "<ns> <channel> [<channel>...]", one per normal
-- channel and one per client for process-specific ones, chunked far below PostgreSQL's
-- 8000-byte limit (names are under 100 characters and never hold spaces). PostgreSQL
-- serializes the commits of all notifying transactions on the server, through their
-- wait for the disk, so the functions the daemons use to store messages (send_batch,
-- group_send_slice, send_direct) notify nobody: the daemon calls notify once they have
-- committed, in a transaction that does not wait for the disk. (send, send_many,
-- group_send and group_send_direct, of earlier versions, still notify.)

CREATE SCHEMA {s};

-- One row: the version the schema is at.
CREATE TABLE {s}.schema_version (version integer NOT NULL);
INSERT INTO {s}.schema_version VALUES (10);

-- Tables. A channel's counter rows (channels, takes) are updated at every send and take:
-- fillfactor 70 leaves room on each page for the new row versions. A large payload is
-- stored out of line and not compressed (STORAGE EXTERNAL).

CREATE {unlogged} TABLE {s}.channels (
    ns text NOT NULL,
    channel text NOT NULL,
    client text,
    waiting bigint NOT NULL DEFAULT 0,
    capacity integer NOT NULL DEFAULT 0,
    PRIMARY KEY (ns, channel)
) WITH (fillfactor = 70);
CREATE INDEX channels_by_client ON {s}.channels (ns, client) WHERE client IS NOT NULL;

CREATE {unlogged} TABLE {s}.takes (
    ns text NOT NULL,
    channel text NOT NULL,
    taken bigint NOT NULL DEFAULT 0,
    held integer NOT NULL DEFAULT 0,
    held_until timestamptz NOT NULL DEFAULT '-infinity',
    held_since timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (ns, channel)
) WITH (fillfactor = 70);

CREATE {unlogged} TABLE {s}.messages (
    id bigint GENERATED ALWAYS AS IDENTITY,
    ns text NOT NULL,
    channel text NOT NULL,
    client text,
    payload bytea NOT NULL,
    expires_at timestamptz NOT NULL,
    lease bigint,
    lease_until timestamptz
);
ALTER TABLE {s}.messages ALTER COLUMN payload SET STORAGE EXTERNAL;
CREATE INDEX messages_by_channel ON {s}.messages (ns, channel, id);
CREATE INDEX messages_by_client ON {s}.messages (ns, client) WHERE client IS NOT NULL;
CREATE INDEX messages_by_expiry ON {s}.messages (expires_at);

CREATE {unlogged} TABLE {s}.groups (
    ns text NOT NULL,
    grp text NOT NULL,
    channel text NOT NULL,
    client text,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (ns, grp, channel)
);
CREATE INDEX groups_by_expiry ON {s}.groups (expires_at);

-- reserve: count one more message in unless the channel is full; locks its row. A full
-- channel whose oldest message has expired is rid of its expired messages first (only
-- those never leased are counted out).
CREATE FUNCTION {s}.reserve(p_ns text, p_channel text, p_client text,
                                       p_capacity integer)
RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    v_purged integer;
    v_room boolean;
BEGIN
    IF p_capacity < 1 THEN
        RETURN false;
    END IF;
    INSERT INTO {s}.channels AS c (ns, channel, client, waiting, capacity)
    VALUES (p_ns, p_channel, p_client, 1, p_capacity)
    ON CONFLICT (ns, channel) DO UPDATE SET waiting = c.waiting + 1, capacity = p_capacity
    WHERE (c.waiting - coalesce((SELECT t.taken - (CASE WHEN t.held_until > now() THEN t.held ELSE 0 END) FROM {s}.takes t WHERE t.ns = c.ns AND t.channel = c.channel), 0)) < p_capacity;
    IF FOUND THEN
        RETURN true;
    END IF;
    -- Full, and the row is locked. Expired messages must not take up room: if the
    -- oldest has expired, remove this channel's expired ones (not those being taken;
    -- those ever leased were counted out already).
    IF NOT EXISTS (
        SELECT 1 FROM (
            SELECT m.expires_at FROM {s}.messages m
            WHERE m.ns = p_ns AND m.channel = p_channel ORDER BY m.id LIMIT 1
        ) head WHERE head.expires_at <= now()
    ) THEN
        RETURN false;
    END IF;
    WITH gone AS (
        DELETE FROM {s}.messages WHERE ctid = ANY(ARRAY(
            SELECT m.ctid FROM {s}.messages m
            WHERE m.ns = p_ns AND m.channel = p_channel AND m.expires_at <= now()
            FOR UPDATE SKIP LOCKED))
        RETURNING lease)
    SELECT count(*) FILTER (WHERE gone.lease IS NULL) INTO v_purged FROM gone;
    UPDATE {s}.channels AS c SET waiting = c.waiting - v_purged
    WHERE c.ns = p_ns AND c.channel = p_channel
    RETURNING (c.waiting - coalesce((SELECT t.taken - (CASE WHEN t.held_until > now() THEN t.held ELSE 0 END) FROM {s}.takes t WHERE t.ns = c.ns AND t.channel = c.channel), 0)) < p_capacity INTO v_room;
    IF v_room THEN
        UPDATE {s}.channels SET waiting = waiting + 1 WHERE ns = p_ns AND channel = p_channel;
    END IF;
    RETURN coalesce(v_room, false);
END $$;

-- send: reserve, insert, notify.
CREATE FUNCTION {s}.send(p_ns text, p_channel text, p_client text, p_payload bytea,
                         p_capacity integer, p_expiry_s double precision)
RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    IF NOT {s}.reserve(p_ns, p_channel, p_client, p_capacity) THEN
        RETURN false;
    END IF;
    INSERT INTO {s}.messages (ns, channel, client, payload, expires_at)
    VALUES (p_ns, p_channel, p_client, p_payload, now() + make_interval(secs => p_expiry_s));
    PERFORM pg_notify({notify}, p_ns || ' ' || p_channel);
    RETURN true;
END $$;

-- send_direct: 2 without storing anything when p_direct and the channel has nothing
-- waiting or held (the caller pushes it itself), else send's answer as 1 (stored; the
-- caller notifies, with notify) or 0 (full).
CREATE FUNCTION {s}.send_direct(p_ns text, p_channel text, p_client text, p_payload bytea,
                                p_capacity integer, p_expiry_s double precision,
                                p_direct boolean)
RETURNS integer LANGUAGE plpgsql AS $$
BEGIN
    IF p_direct AND NOT EXISTS (
        SELECT 1 FROM {s}.channels c
        WHERE c.ns = p_ns AND c.channel = p_channel AND (c.waiting - coalesce((SELECT t.taken - (CASE WHEN t.held_until > now() THEN t.held ELSE 0 END) FROM {s}.takes t WHERE t.ns = c.ns AND t.channel = c.channel), 0)) > 0
    ) THEN
        RETURN 2;
    END IF;
    IF NOT {s}.reserve(p_ns, p_channel, p_client, p_capacity) THEN
        RETURN 0;
    END IF;
    INSERT INTO {s}.messages (ns, channel, client, payload, expires_at)
    VALUES (p_ns, p_channel, p_client, p_payload, now() + make_interval(secs => p_expiry_s));
    RETURN 1;
END $$;

-- send_many: set-based, a few statements for any number of messages; returns the
-- indexes (from 0) refused as full.
CREATE FUNCTION {s}.send_many(p_ns text, p_channels text[], p_clients text[],
                              p_payloads bytea[], p_capacities integer[],
                              p_expiry_s double precision)
RETURNS integer[] LANGUAGE plpgsql AS $$
DECLARE
    v_names text[];
    v_room bigint[];
    v_accepted integer[];
    v_full integer[];
    v_refused integer[] := '{}';
    v_i integer;
    v_room_of jsonb;
    v_added_to jsonb;
    v_capacity_of jsonb;
    v_distinct integer := (SELECT count(DISTINCT k) FROM unnest(p_channels) AS k);
BEGIN
    -- Every channel's row exists; then all are locked in name order and each takes
    -- as many of its messages, in send order, as it has room for. Each row is looked
    -- up (and locked) by its key, whatever the planner believes of the table's size.
    -- Between the two steps the sweep may remove a row it found idle: then it is made
    -- again (a message left out of both lists would be lost without a word).
    LOOP
        INSERT INTO {s}.channels AS c (ns, channel, client)
        SELECT DISTINCT p_ns, k.channel, k.client
        FROM unnest(p_channels, p_clients) AS k(channel, client) ORDER BY 2
        ON CONFLICT (ns, channel) DO NOTHING;
        SELECT array_agg(w.channel ORDER BY w.channel),
               array_agg(greatest(0, w.capacity - (c.waiting - coalesce((SELECT t.taken - (CASE WHEN t.held_until > now() THEN t.held ELSE 0 END) FROM {s}.takes t WHERE t.ns = c.ns AND t.channel = c.channel), 0))) ORDER BY w.channel)
        INTO v_names, v_room
        FROM (SELECT k.channel, min(k.capacity) AS capacity
              FROM unnest(p_channels, p_capacities) AS k(channel, capacity)
              GROUP BY k.channel ORDER BY k.channel) w
        CROSS JOIN LATERAL (
            SELECT x.ns, x.channel, x.waiting FROM {s}.channels x
            WHERE x.ns = p_ns AND x.channel = w.channel FOR UPDATE
        ) c;
        EXIT WHEN coalesce(cardinality(v_names), 0) = v_distinct;
    END LOOP;
    v_room_of := jsonb_object(v_names, v_room::text[]);
    SELECT coalesce(array_agg(x.i ORDER BY x.i) FILTER (WHERE x.nth <= x.room), '{}'),
           coalesce(array_agg(x.i ORDER BY x.i) FILTER (WHERE x.nth > x.room), '{}')
    INTO v_accepted, v_full
    FROM (
        SELECT k.i::integer AS i, (v_room_of ->> k.channel)::bigint AS room,
               row_number() OVER (PARTITION BY k.channel ORDER BY k.i) AS nth
        FROM unnest(p_channels) WITH ORDINALITY AS k(channel, i)
    ) x;
    SELECT jsonb_object_agg(n.channel, n.added), jsonb_object_agg(n.channel, n.capacity)
    INTO v_added_to, v_capacity_of
    FROM (
        SELECT p_channels[a.i] AS channel, count(*) AS added,
               min(p_capacities[a.i]) AS capacity
        FROM unnest(v_accepted) AS a(i) GROUP BY 1
    ) n;
    UPDATE {s}.channels c SET waiting = c.waiting + (v_added_to ->> c.channel)::bigint,
        capacity = (v_capacity_of ->> c.channel)::integer
    WHERE c.ns = p_ns AND c.channel = ANY(v_names) AND v_added_to ? c.channel;
    -- The rest met a full channel; if its oldest message has expired, ``reserve``
    -- makes room (rarely: the sweep usually has).
    FOREACH v_i IN ARRAY v_full LOOP
        IF {s}.reserve(p_ns, p_channels[v_i], p_clients[v_i], p_capacities[v_i]) THEN
            v_accepted := v_accepted || v_i;
        ELSE
            v_refused := v_refused || (v_i - 1);
        END IF;
    END LOOP;
    INSERT INTO {s}.messages (ns, channel, client, payload, expires_at)
    SELECT p_ns, p_channels[a.i], p_clients[a.i], p_payloads[a.i],
           now() + make_interval(secs => p_expiry_s)
    FROM unnest(v_accepted) AS a(i) ORDER BY a.i;
    PERFORM pg_notify({notify}, p_ns || ' ' || n.channel)
    FROM (SELECT DISTINCT p_channels[a.i] AS channel FROM unnest(v_accepted) AS a(i)) n;
    RETURN v_refused;
END $$;

-- take_many: the oldest unexpired messages of several channels that no other taker
-- holds (locked, or leased), removed and counted out (or counted as held) in one
-- statement; for pushes to process-specific channels, which are never leased.
CREATE FUNCTION {s}.take_many(p_ns text, p_channels text[], p_limit integer,
                                         p_hold boolean)
RETURNS TABLE (taken_channel text, taken_payload bytea, taken_ttl_s double precision)
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    RETURN QUERY
    WITH picked AS (
        SELECT p.ctid FROM unnest(p_channels) AS k(name)
        CROSS JOIN LATERAL (
            SELECT m.ctid FROM {s}.messages m
            WHERE m.ns = p_ns AND m.channel = k.name AND m.expires_at > now()
              AND (m.lease IS NULL OR m.lease_until <= now())
            ORDER BY m.id LIMIT p_limit FOR UPDATE SKIP LOCKED
        ) p
    ), gone AS (
        DELETE FROM {s}.messages m WHERE m.ctid = ANY(ARRAY(SELECT x.ctid FROM picked x))
        RETURNING m.channel, m.id, m.payload, m.expires_at, m.lease IS NULL AS fresh
    ), counted AS (
        INSERT INTO {s}.takes AS t (ns, channel, taken, held, held_until)
        SELECT p_ns, g.channel, count(*) FILTER (WHERE g.fresh),
               CASE WHEN p_hold THEN count(*) ELSE 0 END,
               CASE WHEN p_hold THEN max(g.expires_at) ELSE '-infinity' END
        FROM gone g GROUP BY g.channel ORDER BY g.channel
        ON CONFLICT (ns, channel) DO UPDATE SET
            taken = t.taken + excluded.taken,
            held = CASE WHEN p_hold THEN (CASE WHEN t.held_until > now() THEN t.held ELSE 0 END) + excluded.held ELSE t.held END,
            held_until = greatest(t.held_until, excluded.held_until),
            held_since = CASE WHEN p_hold AND t.held_until <= now() THEN now()
                              ELSE t.held_since END
    )
    SELECT g.channel, g.payload, extract(epoch FROM g.expires_at - now())::float8
    FROM gone g ORDER BY g.channel, g.id;
END $$;

-- release_many: uncount held messages of several channels.
CREATE FUNCTION {s}.release_many(p_ns text[], p_channels text[], p_counts integer[])
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_key record;
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    -- One row at a time, by its key, in name order (the caller sorts and merges).
    FOR v_key IN SELECT k.ns, k.channel, k.n
                 FROM unnest(p_ns, p_channels, p_counts) AS k(ns, channel, n)
                 ORDER BY k.ns, k.channel LOOP
        UPDATE {s}.takes t SET held = greatest(0, (CASE WHEN t.held_until > now() THEN t.held ELSE 0 END) - v_key.n)
        WHERE t.ns = v_key.ns AND t.channel = v_key.channel;
    END LOOP;
END $$;

-- group_send: p_channels/p_capacities give the capacity of the members the caller knows
-- (no duplicates); a live member missing from them is returned in unknown and not sent
-- to; stale says some of p_channels are no longer members.
--
-- Its plans, and group_send_direct's, send_many's and release_many's, hold whatever the
-- planner believes of a table's size. Once VACUUM has seen a table empty (its pages
-- kept, no live row), the planner takes it for a one-row table: it would join the
-- group's members with unnest()ed capacity arrays by nested loop, running the unnest
-- again for every member (200 members: 40,000 comparisons, 4.5 ms a call), and scan
-- members through the expiry index (every live membership of every group). So these
-- functions look the caller's values up in jsonb objects, send_many and release_many
-- find each row by its key, and a member is found by the primary key's (ns, grp)
-- prefix, its expiry tested so that the expiry index (the sweep's) cannot serve it.
CREATE FUNCTION {s}.group_send(p_ns text, p_group text, p_payload bytea,
                               p_expiry_s double precision, p_channels text[],
                               p_capacities integer[],
                               OUT delivered text[], OUT skipped integer, OUT unknown text[],
                               OUT stale boolean)
LANGUAGE plpgsql AS $$
DECLARE
    v_capacity_of jsonb := jsonb_object(p_channels, p_capacities::text[]);
    v_channels text[];
    v_clients text[];
    v_capacities integer[];
    v_full text[];
    v_full_clients text[];
    v_full_capacities integer[];
    v_clients_in text[];
BEGIN
    SELECT coalesce(array_agg(k.channel ORDER BY k.channel)
                    FILTER (WHERE k.capacity IS NOT NULL), '{}'),
           coalesce(array_agg(k.client ORDER BY k.channel)
                    FILTER (WHERE k.capacity IS NOT NULL), '{}'),
           coalesce(array_agg(k.capacity ORDER BY k.channel)
                    FILTER (WHERE k.capacity IS NOT NULL), '{}'),
           coalesce(array_agg(k.channel) FILTER (WHERE k.capacity IS NULL), '{}')
    INTO v_channels, v_clients, v_capacities, unknown
    FROM (
        SELECT g.channel, g.client, (v_capacity_of ->> g.channel)::integer AS capacity
        FROM {s}.groups g
        WHERE g.ns = p_ns AND g.grp = p_group AND g.expires_at - now() > interval '0'
    ) k;
    -- One upsert for all members, in name order: those with room count one more.
    WITH room AS (
        INSERT INTO {s}.channels AS c (ns, channel, client, waiting, capacity)
        SELECT p_ns, k.channel, k.client, 1, k.capacity
        FROM unnest(v_channels, v_clients, v_capacities) AS k(channel, client, capacity)
        WHERE k.capacity > 0 ORDER BY k.channel
        ON CONFLICT (ns, channel) DO UPDATE SET waiting = c.waiting + 1,
            capacity = excluded.capacity
        WHERE (c.waiting - coalesce((SELECT t.taken - (CASE WHEN t.held_until > now() THEN t.held ELSE 0 END) FROM {s}.takes t WHERE t.ns = c.ns AND t.channel = c.channel), 0)) < excluded.capacity
        RETURNING c.channel, c.client
    )
    SELECT coalesce(array_agg(r.channel), '{}'), coalesce(array_agg(r.client), '{}')
    INTO delivered, v_clients_in FROM room r;
    stale := cardinality(p_channels) <> cardinality(v_channels);
    IF cardinality(delivered) < cardinality(v_channels) THEN
        -- Some were full (rarely for long: expired messages may be in the way).
        SELECT coalesce(array_agg(k.channel ORDER BY k.channel), '{}'),
               coalesce(array_agg(k.client ORDER BY k.channel), '{}'),
               coalesce(array_agg(k.capacity ORDER BY k.channel), '{}')
        INTO v_full, v_full_clients, v_full_capacities
        FROM unnest(v_channels, v_clients, v_capacities) AS k(channel, client, capacity)
        WHERE k.channel <> ALL(delivered);
        FOR i IN 1 .. coalesce(array_length(v_full, 1), 0) LOOP
            IF {s}.reserve(p_ns, v_full[i], v_full_clients[i], v_full_capacities[i]) THEN
                delivered := delivered || v_full[i];
                v_clients_in := v_clients_in || v_full_clients[i];
            END IF;
        END LOOP;
    END IF;
    skipped := cardinality(v_channels) - cardinality(delivered);
    INSERT INTO {s}.messages (ns, channel, client, payload, expires_at)
    SELECT p_ns, k.channel, k.client, p_payload, now() + make_interval(secs => p_expiry_s)
    FROM unnest(delivered, v_clients_in) AS k(channel, client);
    -- One notification per client (its channels, 60 at most per notification) and
    -- one per normal channel.
    PERFORM pg_notify({notify}, p_ns || ' ' || string_agg(w.channel, ' '))
    FROM (
        SELECT k.channel, coalesce(k.client, k.channel) AS target,
               (row_number() OVER (PARTITION BY coalesce(k.client, k.channel)) - 1) / 60 AS chunk
        FROM unnest(delivered, v_clients_in) AS k(channel, client)
    ) w
    GROUP BY w.target, w.chunk;
END $$;

-- group_send_direct: group_send, except that the live members named in p_direct with
-- nothing waiting or held are not stored: they come back in direct, for the caller to
-- push itself (the others among them are stored, with p_direct_capacities).
-- p_channels/p_capacities are the other members the caller knows, p_clients the client
-- ids of p_direct. Name lists are passed as one space-separated text each (names never
-- hold spaces): for a group of hundreds, arrays cost more to build, send and read than
-- the query itself. A send committing meanwhile from another daemon is stored, and
-- arrives after it. One pass over the members sorts them (the busy ones found through
-- their clients' channel rows, by channels_by_client: a few, where a probe per member
-- would cost more than the rest together); group_send stores for the rest.
CREATE FUNCTION {s}.group_send_direct(p_ns text, p_group text, p_payload bytea,
                                      p_expiry_s double precision, p_channels text,
                                      p_capacities text, p_direct text,
                                      p_direct_capacities text, p_clients text,
                                      OUT delivered text[], OUT skipped integer,
                                      OUT unknown text[], OUT stale boolean,
                                      OUT direct text)
LANGUAGE plpgsql AS $$
DECLARE
    v_channels text[] := string_to_array(p_channels, ' ');
    v_direct text[] := string_to_array(p_direct, ' ');
    v_capacity_of jsonb := jsonb_object(v_channels, string_to_array(p_capacities, ' '));
    v_pushed_capacity_of jsonb :=
        jsonb_object(v_direct, string_to_array(p_direct_capacities, ' '));
    v_busy text[];
    v_known integer;
    v_rest text[];
    v_rest_capacities integer[];
BEGIN
    SELECT coalesce(array_agg(c.channel), '{}') INTO v_busy FROM {s}.channels c
    WHERE c.ns = p_ns AND c.client = ANY(string_to_array(p_clients, ' ')) AND (c.waiting - coalesce((SELECT t.taken - (CASE WHEN t.held_until > now() THEN t.held ELSE 0 END) FROM {s}.takes t WHERE t.ns = c.ns AND t.channel = c.channel), 0)) > 0;
    SELECT coalesce(string_agg(m.channel, ' ') FILTER (WHERE m.direct), ''),
           coalesce(array_agg(m.channel) FILTER (WHERE m.stored), '{}'),
           coalesce(array_agg(m.capacity) FILTER (WHERE m.stored), '{}'),
           coalesce(array_agg(m.channel) FILTER (WHERE NOT m.known), '{}'),
           count(*) FILTER (WHERE m.known)
    INTO direct, v_rest, v_rest_capacities, unknown, v_known
    FROM (
        SELECT k.channel, k.capacity IS NOT NULL OR k.pushed IS NOT NULL AS known,
               k.pushed IS NOT NULL AND NOT k.channel = ANY(v_busy) AS direct,
               k.capacity IS NOT NULL OR (k.pushed IS NOT NULL AND k.channel = ANY(v_busy))
                   AS stored,
               coalesce(k.capacity, k.pushed) AS capacity
        FROM (
            SELECT g.channel, (v_capacity_of ->> g.channel)::integer AS capacity,
                   (v_pushed_capacity_of ->> g.channel)::integer AS pushed
            FROM {s}.groups g
            WHERE g.ns = p_ns AND g.grp = p_group AND g.expires_at - now() > interval '0'
        ) k
    ) m;
    stale := v_known < cardinality(v_channels) + cardinality(v_direct);
    delivered := '{}';
    skipped := 0;
    IF cardinality(v_rest) > 0 THEN
        SELECT r.delivered, r.skipped INTO delivered, skipped
        FROM {s}.group_send(p_ns, p_group, p_payload, p_expiry_s, v_rest, v_rest_capacities) r;
    END IF;
END $$;

-- sweep: one daemon at a time (the others skip) removes a batch of expired messages and
-- a batch of lapsed memberships, and for a batch of channel names (a cursor going round
-- the table) folds taken into waiting and forgets idle rows. Busy rows are skipped, to
-- be seen next time round. An expired message ever leased was counted out when it was:
-- only the others are uncounted. Its commit does not wait for the disk (a sweep lost to
-- a crash is done again), so the rows it locks are not held through that wait.
CREATE FUNCTION {s}.sweep(p_batch integer, p_after_ns text, p_after_channel text,
                                     OUT expired integer, OUT lapsed integer,
                                     OUT forgotten integer, OUT next_ns text,
                                     OUT next_channel text)
LANGUAGE plpgsql AS $$
DECLARE
    v_ns text[];
    v_channels text[];
    v_counts integer[];
BEGIN
    expired := 0; lapsed := 0; forgotten := 0;
    IF NOT pg_try_advisory_xact_lock({sweep_lock}) THEN
        RETURN;
    END IF;
    PERFORM set_config('synchronous_commit', 'off', true);
    WITH gone AS (
        DELETE FROM {s}.messages WHERE ctid = ANY(ARRAY(
            SELECT m.ctid FROM {s}.messages m WHERE m.expires_at <= now()
            ORDER BY m.expires_at LIMIT p_batch FOR UPDATE SKIP LOCKED))
        RETURNING ns, channel, lease IS NULL AS counted
    )
    SELECT coalesce(array_agg(x.ns ORDER BY x.ns, x.channel), '{}'),
           coalesce(array_agg(x.channel ORDER BY x.ns, x.channel), '{}'),
           coalesce(array_agg(x.n ORDER BY x.ns, x.channel), '{}'),
           coalesce(sum(x.total), 0)
    INTO v_ns, v_channels, v_counts, expired
    FROM (SELECT g.ns, g.channel, (count(*) FILTER (WHERE g.counted))::integer AS n,
                 count(*) AS total
          FROM gone g GROUP BY 1, 2) x;
    PERFORM 1 FROM {s}.channels c
    JOIN unnest(v_ns, v_channels) AS k(ns, channel) ON c.ns = k.ns AND c.channel = k.channel
    ORDER BY c.ns, c.channel FOR UPDATE OF c;
    UPDATE {s}.channels c SET waiting = c.waiting - k.n
    FROM unnest(v_ns, v_channels, v_counts) AS k(ns, channel, n)
    WHERE c.ns = k.ns AND c.channel = k.channel;
    DELETE FROM {s}.groups WHERE ctid = ANY(ARRAY(
        SELECT g.ctid FROM {s}.groups g WHERE g.expires_at <= now()
        ORDER BY g.expires_at LIMIT p_batch FOR UPDATE SKIP LOCKED));
    GET DIAGNOSTICS lapsed = ROW_COUNT;
    -- The next batch of channel names, and the free ones among them locked.
    SELECT coalesce(array_agg(b.ns ORDER BY b.ns, b.channel), '{}'),
           coalesce(array_agg(b.channel ORDER BY b.ns, b.channel), '{}')
    INTO v_ns, v_channels
    FROM (
        SELECT c.ns, c.channel FROM {s}.channels c
        WHERE (c.ns, c.channel) > (p_after_ns, p_after_channel)
        ORDER BY c.ns, c.channel LIMIT p_batch
    ) b;
    IF cardinality(v_ns) = p_batch THEN
        next_ns := v_ns[p_batch];
        next_channel := v_channels[p_batch];
    END IF;
    SELECT coalesce(array_agg(l.ns), '{}'), coalesce(array_agg(l.channel), '{}')
    INTO v_ns, v_channels
    FROM (
        SELECT c.ns, c.channel FROM {s}.channels c
        JOIN unnest(v_ns, v_channels) AS k(ns, channel) ON c.ns = k.ns AND c.channel = k.channel
        ORDER BY c.ns, c.channel FOR UPDATE OF c SKIP LOCKED
    ) l;
    -- Their takes rows, where free too: fold what was taken into waiting.
    WITH free AS (
        SELECT t.ns, t.channel, t.taken FROM {s}.takes t
        JOIN unnest(v_ns, v_channels) AS k(ns, channel) ON t.ns = k.ns AND t.channel = k.channel
        ORDER BY t.ns, t.channel FOR UPDATE OF t SKIP LOCKED
    ), folded AS (
        UPDATE {s}.takes t SET taken = 0 FROM free f
        WHERE t.ns = f.ns AND t.channel = f.channel AND f.taken <> 0
        RETURNING t.ns, t.channel, f.taken
    )
    UPDATE {s}.channels c SET waiting = c.waiting - f.taken FROM folded f
    WHERE c.ns = f.ns AND c.channel = f.channel;
    -- Idle: nothing waiting, nothing held, and no taker at work on it right now.
    WITH idle AS (
        DELETE FROM {s}.channels c
        USING unnest(v_ns, v_channels) AS k(ns, channel)
        WHERE c.ns = k.ns AND c.channel = k.channel AND c.waiting = 0
          AND NOT EXISTS (
              SELECT 1 FROM {s}.takes t WHERE t.ns = c.ns AND t.channel = c.channel
                AND (t.taken <> 0 OR (CASE WHEN t.held_until > now() THEN t.held ELSE 0 END) > 0))
        RETURNING c.ns, c.channel
    ), idle_takes AS (
        DELETE FROM {s}.takes t USING idle i WHERE t.ns = i.ns AND t.channel = i.channel
    )
    SELECT count(*) INTO forgotten FROM idle;
END $$;

-- lease: up to p_limit of a channel's oldest unexpired messages that nobody holds
-- (never leased, or their lease lapsed), leased to p_lease for p_lease_s seconds; those
-- never leased before are counted out. lapsed: taken again after its lease lapsed (its
-- consumer never acknowledged it). more: whether others wait unleased, or may wait
-- after a lapsed lease (which the counters count out already).
CREATE FUNCTION {s}.lease(p_ns text, p_channel text, p_limit integer, p_lease bigint,
                          p_lease_s double precision)
RETURNS TABLE (leased_id bigint, leased_payload bytea, leased_ttl_s double precision,
               more boolean, lapsed boolean)
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    RETURN QUERY
    WITH picked AS (
        SELECT m.ctid, m.id, m.lease IS NULL AS fresh FROM {s}.messages m
        WHERE m.ns = p_ns AND m.channel = p_channel AND m.expires_at > now()
          AND (m.lease IS NULL OR m.lease_until <= now())
        ORDER BY m.id LIMIT p_limit FOR UPDATE SKIP LOCKED
    ), leased AS (
        UPDATE {s}.messages m
        SET lease = p_lease, lease_until = now() + make_interval(secs => p_lease_s)
        WHERE m.ctid = ANY(ARRAY(SELECT p.ctid FROM picked p))
        RETURNING m.id, m.payload, m.expires_at
    ), counted AS (
        INSERT INTO {s}.takes AS t (ns, channel, taken)
        SELECT p_ns, p_channel, n.fresh
        FROM (SELECT count(*) FILTER (WHERE p.fresh) AS fresh FROM picked p) n
        WHERE n.fresh > 0
        ON CONFLICT (ns, channel) DO UPDATE SET taken = t.taken + excluded.taken
        RETURNING t.taken
    )
    SELECT l.id, l.payload, extract(epoch FROM l.expires_at - now())::float8,
           coalesce((SELECT c.waiting FROM {s}.channels c
                     WHERE c.ns = p_ns AND c.channel = p_channel), 0)
           > coalesce((SELECT k.taken FROM counted k),
                      (SELECT t.taken FROM {s}.takes t
                       WHERE t.ns = p_ns AND t.channel = p_channel), 0)
           OR EXISTS (SELECT 1 FROM picked q WHERE NOT q.fresh),
           NOT p.fresh
    FROM leased l JOIN picked p ON p.id = l.id ORDER BY l.id;
END $$;

-- ack: delete messages handed out under their leases (each by its id and lease); one
-- whose lease another daemon took over meanwhile is left to it.
CREATE FUNCTION {s}.ack(p_ns text[], p_channels text[], p_ids bigint[], p_leases bigint[])
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    DELETE FROM {s}.messages WHERE ctid = ANY(ARRAY(
        SELECT x.ctid FROM unnest(p_ns, p_channels, p_ids, p_leases) AS k(ns, channel, id, lease)
        CROSS JOIN LATERAL (
            SELECT m.ctid FROM {s}.messages m
            WHERE m.ns = k.ns AND m.channel = k.channel AND m.id = k.id AND m.lease = k.lease
            FOR UPDATE SKIP LOCKED
        ) x));
END $$;

-- unlease: messages leased and not handed out go back to their places (their ids, so
-- their order holds), counted in again; other daemons are told.
CREATE FUNCTION {s}.unlease(p_ns text, p_channel text, p_ids bigint[], p_leases bigint[])
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_back bigint;
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    WITH back AS (
        UPDATE {s}.messages SET lease = NULL, lease_until = NULL
        WHERE ctid = ANY(ARRAY(
            SELECT x.ctid FROM unnest(p_ids, p_leases) AS k(id, lease)
            CROSS JOIN LATERAL (
                SELECT m.ctid FROM {s}.messages m
                WHERE m.ns = p_ns AND m.channel = p_channel AND m.id = k.id
                  AND m.lease = k.lease
                FOR UPDATE SKIP LOCKED
            ) x))
        RETURNING 1)
    SELECT count(*) INTO v_back FROM back;
    IF v_back > 0 THEN
        INSERT INTO {s}.channels AS c (ns, channel, waiting) VALUES (p_ns, p_channel, v_back)
        ON CONFLICT (ns, channel) DO UPDATE SET waiting = c.waiting + excluded.waiting;
        PERFORM pg_notify({notify}, p_ns || ' ' || p_channel);
    END IF;
END $$;

-- take: remove the oldest unexpired messages nobody holds and count them out (or as
-- held); for process-specific channels and takes with hold, which are never leased.
CREATE FUNCTION {s}.take(p_ns text, p_channel text, p_limit integer, p_hold boolean)
RETURNS TABLE (taken_id bigint, taken_payload bytea, taken_ttl_s double precision,
               more boolean)
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    RETURN QUERY
    WITH picked AS (
        SELECT m.ctid FROM {s}.messages m
        WHERE m.ns = p_ns AND m.channel = p_channel AND m.expires_at > now()
          AND (m.lease IS NULL OR m.lease_until <= now())
        ORDER BY m.id LIMIT p_limit FOR UPDATE SKIP LOCKED
    ), gone AS (
        DELETE FROM {s}.messages m WHERE m.ctid = ANY(ARRAY(SELECT p.ctid FROM picked p))
        RETURNING m.id, m.payload, m.expires_at, m.lease IS NULL AS fresh
    ), counted AS (
        INSERT INTO {s}.takes AS t (ns, channel, taken, held, held_until)
        SELECT p_ns, p_channel, n.fresh, CASE WHEN p_hold THEN n.taken ELSE 0 END,
               CASE WHEN p_hold THEN n.last ELSE '-infinity'::timestamptz END
        FROM (SELECT count(*) AS taken, count(*) FILTER (WHERE g.fresh) AS fresh,
                     max(g.expires_at) AS last FROM gone g) n
        WHERE n.taken > 0
        ON CONFLICT (ns, channel) DO UPDATE SET
            taken = t.taken + excluded.taken,
            held = CASE WHEN p_hold THEN (CASE WHEN t.held_until > now() THEN t.held ELSE 0 END) + excluded.held ELSE t.held END,
            held_until = greatest(t.held_until, excluded.held_until),
            held_since = CASE WHEN p_hold AND t.held_until <= now() THEN now()
                              ELSE t.held_since END
        RETURNING t.taken
    )
    SELECT g.id, g.payload, extract(epoch FROM g.expires_at - now())::float8,
           coalesce((SELECT c.waiting FROM {s}.channels c
                     WHERE c.ns = p_ns AND c.channel = p_channel), 0)
           > (SELECT k.taken FROM counted k)
    FROM gone g ORDER BY g.id;
END $$;

-- send_batch: the sends gathered while the statement before was committing, from any
-- clients: message i goes to channel p_channels[i] of namespace p_ns[i], with its own
-- capacity and expiry. As send_many, set-based, channels locked in (ns, channel) order,
-- notifying nobody; returns the indexes (from 0) refused as full.
CREATE FUNCTION {s}.send_batch(p_ns text[], p_channels text[], p_clients text[],
                               p_payloads bytea[], p_capacities integer[],
                               p_expiry_s double precision[])
RETURNS integer[] LANGUAGE plpgsql AS $$
DECLARE
    v_keys text[];
    v_room bigint[];
    v_accepted integer[];
    v_full integer[];
    v_refused integer[] := '{}';
    v_i integer;
    v_room_of jsonb;
    v_added_to jsonb;
    v_capacity_of jsonb;
    v_spaces text[] := ARRAY(SELECT DISTINCT n FROM unnest(p_ns) AS n);
    v_distinct integer := (SELECT count(DISTINCT (k.ns, k.channel))
                           FROM unnest(p_ns, p_channels) AS k(ns, channel));
BEGIN
    -- As in send_many: every channel's row exists, then all are locked in order, each
    -- by its key, and made again if the sweep removed one meanwhile. A channel is
    -- keyed by "<ns> <channel>" in the jsonb objects (names never hold spaces).
    LOOP
        INSERT INTO {s}.channels AS c (ns, channel, client)
        SELECT DISTINCT k.ns, k.channel, k.client
        FROM unnest(p_ns, p_channels, p_clients) AS k(ns, channel, client) ORDER BY 1, 2
        ON CONFLICT (ns, channel) DO NOTHING;
        SELECT array_agg(w.ns || ' ' || w.channel ORDER BY w.ns, w.channel),
               array_agg(greatest(0, w.capacity - (c.waiting - coalesce((SELECT t.taken - (CASE WHEN t.held_until > now() THEN t.held ELSE 0 END) FROM {s}.takes t WHERE t.ns = c.ns AND t.channel = c.channel), 0))) ORDER BY w.ns, w.channel)
        INTO v_keys, v_room
        FROM (SELECT k.ns, k.channel, min(k.capacity) AS capacity
              FROM unnest(p_ns, p_channels, p_capacities) AS k(ns, channel, capacity)
              GROUP BY k.ns, k.channel ORDER BY k.ns, k.channel) w
        CROSS JOIN LATERAL (
            SELECT x.ns, x.channel, x.waiting FROM {s}.channels x
            WHERE x.ns = w.ns AND x.channel = w.channel FOR UPDATE
        ) c;
        EXIT WHEN coalesce(cardinality(v_keys), 0) = v_distinct;
    END LOOP;
    v_room_of := jsonb_object(v_keys, v_room::text[]);
    SELECT coalesce(array_agg(x.i ORDER BY x.i) FILTER (WHERE x.nth <= x.room), '{}'),
           coalesce(array_agg(x.i ORDER BY x.i) FILTER (WHERE x.nth > x.room), '{}')
    INTO v_accepted, v_full
    FROM (
        SELECT k.i::integer AS i, (v_room_of ->> (k.ns || ' ' || k.channel))::bigint AS room,
               row_number() OVER (PARTITION BY k.ns, k.channel ORDER BY k.i) AS nth
        FROM unnest(p_ns, p_channels) WITH ORDINALITY AS k(ns, channel, i)
    ) x;
    SELECT jsonb_object_agg(n.key, n.added), jsonb_object_agg(n.key, n.capacity)
    INTO v_added_to, v_capacity_of
    FROM (
        SELECT p_ns[a.i] || ' ' || p_channels[a.i] AS key, count(*) AS added,
               min(p_capacities[a.i]) AS capacity
        FROM unnest(v_accepted) AS a(i) GROUP BY 1
    ) n;
    UPDATE {s}.channels c
    SET waiting = c.waiting + (v_added_to ->> (c.ns || ' ' || c.channel))::bigint,
        capacity = (v_capacity_of ->> (c.ns || ' ' || c.channel))::integer
    WHERE c.ns = ANY(v_spaces) AND c.channel = ANY(p_channels)
      AND v_added_to ? (c.ns || ' ' || c.channel);
    -- The rest met a full channel; if its oldest message has expired, reserve makes
    -- room (rarely: the sweep usually has).
    FOREACH v_i IN ARRAY v_full LOOP
        IF {s}.reserve(p_ns[v_i], p_channels[v_i], p_clients[v_i], p_capacities[v_i]) THEN
            v_accepted := v_accepted || v_i;
        ELSE
            v_refused := v_refused || (v_i - 1);
        END IF;
    END LOOP;
    INSERT INTO {s}.messages (ns, channel, client, payload, expires_at)
    SELECT p_ns[a.i], p_channels[a.i], p_clients[a.i], p_payloads[a.i],
           now() + make_interval(secs => p_expiry_s[a.i])
    FROM unnest(v_accepted) AS a(i) ORDER BY a.i;
    RETURN v_refused;
END $$;

-- group_store: one message for each of the members p_channels (in name order, no
-- duplicates, with their clients and capacities) that has room; notifying nobody.
CREATE FUNCTION {s}.group_store(p_ns text, p_channels text[], p_clients text[],
                                p_capacities integer[], p_payload bytea,
                                p_expiry_s double precision,
                                OUT delivered text[], OUT skipped integer)
LANGUAGE plpgsql AS $$
DECLARE
    v_clients_in text[];
    v_full text[];
    v_full_clients text[];
    v_full_capacities integer[];
BEGIN
    -- One upsert for all, in name order: those with room count one more.
    WITH room AS (
        INSERT INTO {s}.channels AS c (ns, channel, client, waiting, capacity)
        SELECT p_ns, k.channel, k.client, 1, k.capacity
        FROM unnest(p_channels, p_clients, p_capacities) AS k(channel, client, capacity)
        WHERE k.capacity > 0 ORDER BY k.channel
        ON CONFLICT (ns, channel) DO UPDATE SET waiting = c.waiting + 1,
            capacity = excluded.capacity
        WHERE (c.waiting - coalesce((SELECT t.taken - (CASE WHEN t.held_until > now() THEN t.held ELSE 0 END) FROM {s}.takes t WHERE t.ns = c.ns AND t.channel = c.channel), 0)) < excluded.capacity
        RETURNING c.channel, c.client
    )
    SELECT coalesce(array_agg(r.channel), '{}'), coalesce(array_agg(r.client), '{}')
    INTO delivered, v_clients_in FROM room r;
    IF cardinality(delivered) < cardinality(p_channels) THEN
        -- Some were full (rarely for long: expired messages may be in the way).
        SELECT coalesce(array_agg(k.channel ORDER BY k.channel), '{}'),
               coalesce(array_agg(k.client ORDER BY k.channel), '{}'),
               coalesce(array_agg(k.capacity ORDER BY k.channel), '{}')
        INTO v_full, v_full_clients, v_full_capacities
        FROM unnest(p_channels, p_clients, p_capacities) AS k(channel, client, capacity)
        WHERE k.channel <> ALL(delivered);
        FOR i IN 1 .. coalesce(array_length(v_full, 1), 0) LOOP
            IF {s}.reserve(p_ns, v_full[i], v_full_clients[i], v_full_capacities[i]) THEN
                delivered := delivered || v_full[i];
                v_clients_in := v_clients_in || v_full_clients[i];
            END IF;
        END LOOP;
    END IF;
    skipped := cardinality(p_channels) - cardinality(delivered);
    INSERT INTO {s}.messages (ns, channel, client, payload, expires_at)
    SELECT p_ns, k.channel, k.client, p_payload, now() + make_interval(secs => p_expiry_s)
    FROM unnest(delivered, v_clients_in) AS k(channel, client);
END $$;

-- group_send_slice: group_send_direct for one slice of a group: its live members after
-- p_after (in name order; '' for the first) up to p_upto (NULL: no bound), at most
-- p_limit of them, so that no statement grows with the group (the daemon sends slice
-- after slice). The members the caller names come as in group_send_direct
-- (p_channels/p_capacities stored, p_direct pushed by the caller if nothing of theirs
-- waits, p_clients their clients); a member it does not name is returned in unknown
-- and not sent to. known: the named members found in the slice; last: its last member
-- if it holds p_limit (the next slice starts after it), else NULL (the group ends
-- here); members: the slice's members in order, only where they differ from those
-- named (the caller's list needs mending).
CREATE FUNCTION {s}.group_send_slice(p_ns text, p_group text, p_payload bytea,
                                     p_expiry_s double precision, p_after text,
                                     p_upto text, p_limit integer, p_channels text,
                                     p_capacities text, p_direct text,
                                     p_direct_capacities text, p_clients text,
                                     OUT delivered text[], OUT skipped integer,
                                     OUT unknown text[], OUT direct text,
                                     OUT known integer, OUT last text, OUT members text)
LANGUAGE plpgsql AS $$
DECLARE
    v_named text[] := string_to_array(p_channels, ' ') || string_to_array(p_direct, ' ');
    v_capacity_of jsonb :=
        jsonb_object(string_to_array(p_channels, ' '), string_to_array(p_capacities, ' '));
    v_pushed_capacity_of jsonb :=
        jsonb_object(string_to_array(p_direct, ' '), string_to_array(p_direct_capacities, ' '));
    v_busy text[] := '{}';
    v_found integer;
    v_unnamed integer;
    v_stored text[];
    v_stored_clients text[];
    v_stored_capacities integer[];
BEGIN
    IF p_clients <> '' THEN
        SELECT coalesce(array_agg(c.channel), '{}') INTO v_busy FROM {s}.channels c
        WHERE c.ns = p_ns AND c.client = ANY(string_to_array(p_clients, ' ')) AND (c.waiting - coalesce((SELECT t.taken - (CASE WHEN t.held_until > now() THEN t.held ELSE 0 END) FROM {s}.takes t WHERE t.ns = c.ns AND t.channel = c.channel), 0)) > 0;
    END IF;
    SELECT count(*), max(m.channel), count(*) FILTER (WHERE m.named),
           count(*) FILTER (WHERE NOT m.named),
           coalesce(string_agg(m.channel, ' ') FILTER (WHERE m.direct), ''),
           coalesce(array_agg(m.channel ORDER BY m.channel) FILTER (WHERE m.stored), '{}'),
           coalesce(array_agg(m.client ORDER BY m.channel) FILTER (WHERE m.stored), '{}'),
           coalesce(array_agg(m.capacity ORDER BY m.channel) FILTER (WHERE m.stored), '{}'),
           coalesce(array_agg(m.channel) FILTER (WHERE NOT m.named), '{}'),
           string_agg(m.channel, ' ' ORDER BY m.channel)
    INTO v_found, last, known, v_unnamed, direct, v_stored, v_stored_clients,
         v_stored_capacities, unknown, members
    FROM (
        SELECT k.channel, k.client, k.capacity IS NOT NULL OR k.pushed IS NOT NULL AS named,
               k.pushed IS NOT NULL AND NOT k.channel = ANY(v_busy) AS direct,
               coalesce(k.capacity, k.pushed) AS capacity,
               k.capacity IS NOT NULL OR (k.pushed IS NOT NULL AND k.channel = ANY(v_busy))
                   AS stored
        FROM (
            SELECT g.channel, g.client, (v_capacity_of ->> g.channel)::integer AS capacity,
                   (v_pushed_capacity_of ->> g.channel)::integer AS pushed
            FROM {s}.groups g
            WHERE g.ns = p_ns AND g.grp = p_group AND g.channel > p_after
              AND (p_upto IS NULL OR g.channel <= p_upto) AND g.expires_at - now() > interval '0'
            ORDER BY g.channel LIMIT p_limit
        ) k
    ) m;
    IF v_found < p_limit THEN
        last := NULL;
    END IF;
    -- Named members missing from the slice (gone, or past its end) or members not
    -- named: the caller's list of members is out of date here.
    IF v_unnamed = 0 AND known = (
        SELECT count(*) FROM unnest(v_named) AS n(channel)
        WHERE n.channel > p_after AND (last IS NULL OR n.channel <= last)
          AND (p_upto IS NULL OR n.channel <= p_upto)
    ) THEN
        members := NULL;
    END IF;
    delivered := '{}';
    skipped := 0;
    IF cardinality(v_stored) > 0 THEN
        SELECT r.delivered, r.skipped INTO delivered, skipped
        FROM {s}.group_store(p_ns, v_stored, v_stored_clients, v_stored_capacities,
                             p_payload, p_expiry_s) r;
    END IF;
END $$;

-- notify: the notifications of messages stored by transactions that committed, in a
-- transaction that does not wait for the disk (so it holds PostgreSQL's notification
-- lock only a moment). Each payload: "<ns> <channel> [<channel>...]".
CREATE FUNCTION {s}.notify(p_payloads text[])
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    PERFORM pg_notify({notify}, p.payload) FROM unnest(p_payloads) AS p(payload);
END $$;

-- Send windows (docs/flow.md): a client's record of numbered sends, and send room
-- reserved per connection (rooms) and counted as held (takes.held), so that every
-- capacity check counts it. Each connection's room lapses on its own (rooms.until): the
-- sweep's lapse_rooms takes it off takes.held (version 9), so room whose release
-- failed comes back even on a channel where newer room keeps held from lapsing.
-- takes.held_since, when held last started from nothing, tells whether a lapsed row's
-- count is still in it (uncount_room).
CREATE {unlogged} TABLE {s}.senders (
    ns text NOT NULL,
    client text NOT NULL,
    highest bigint NOT NULL DEFAULT 0,
    kept bytea NOT NULL DEFAULT '',
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (ns, client)
);
CREATE INDEX senders_by_expiry ON {s}.senders (expires_at);
CREATE {unlogged} TABLE {s}.rooms (
    ns text NOT NULL,
    channel text NOT NULL,
    holder text NOT NULL,
    count integer NOT NULL,
    until timestamptz NOT NULL,
    PRIMARY KEY (ns, channel, holder)
);

-- hold_room: p_room more units of send room for a holder (a connection: "<client>
-- <number> ..."), counted as held on the channel too (whose channels row the caller
-- locked). The holder's room lapses p_lapse_s from now; the held count with it (the
-- sweep's lapse_rooms uncounts it) or when its held messages do. Room of the holder
-- that had lapsed is uncounted here, as the new room replaces it.
CREATE FUNCTION {s}.hold_room(p_ns text, p_channel text, p_holder text, p_room integer,
                              p_lapse_s double precision)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_old record;
BEGIN
    SELECT r.count, r.until INTO v_old FROM {s}.rooms r
    WHERE r.ns = p_ns AND r.channel = p_channel AND r.holder = p_holder FOR UPDATE;
    IF v_old.until <= now() THEN
        PERFORM {s}.uncount_room(p_ns, p_channel, v_old.count, v_old.until);
    END IF;
    INSERT INTO {s}.rooms AS r (ns, channel, holder, count, until)
    VALUES (p_ns, p_channel, p_holder, p_room, now() + make_interval(secs => p_lapse_s))
    ON CONFLICT (ns, channel, holder) DO UPDATE SET
        count = (CASE WHEN r.until > now() THEN r.count ELSE 0 END) + excluded.count,
        until = excluded.until;
    INSERT INTO {s}.takes AS t (ns, channel, held, held_until)
    VALUES (p_ns, p_channel, p_room, now() + make_interval(secs => p_lapse_s))
    ON CONFLICT (ns, channel) DO UPDATE SET held = (CASE WHEN t.held_until > now() THEN t.held ELSE 0 END) + excluded.held,
        held_until = greatest(t.held_until, excluded.held_until),
        held_since = CASE WHEN t.held_until > now() THEN t.held_since ELSE now() END;
END $$;

-- room_for: half of what still fits a channel (its row locked), up to p_window.
CREATE FUNCTION {s}.room_for(p_ns text, p_channel text, p_capacity integer, p_window integer)
RETURNS integer LANGUAGE sql AS $$
    SELECT least(p_window, greatest(0, (p_capacity - (c.waiting - coalesce((SELECT t.taken - (CASE WHEN t.held_until > now() THEN t.held ELSE 0 END) FROM {s}.takes t WHERE t.ns = c.ns AND t.channel = c.channel), 0))) / 2))::integer
    FROM {s}.channels c WHERE c.ns = p_ns AND c.channel = p_channel
$$;

-- spend_left: a unit of the room another connection of the client p_client holds on
-- the channel (its channels row locked by the caller), uncounted; false if none. The
-- client sends again what its dead daemon had not stored: into the room kept for it.
CREATE FUNCTION {s}.spend_left(p_ns text, p_channel text, p_client text, p_holder text)
RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    UPDATE {s}.rooms SET count = count - 1 WHERE ctid = (
        SELECT r.ctid FROM {s}.rooms r
        WHERE r.ns = p_ns AND r.channel = p_channel AND r.holder <> p_holder
          AND starts_with(r.holder, p_client || ' ') AND r.count > 0 AND r.until > now()
        LIMIT 1 FOR UPDATE);
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    UPDATE {s}.takes t SET held = greatest(0, (CASE WHEN t.held_until > now() THEN t.held ELSE 0 END) - 1)
    WHERE t.ns = p_ns AND t.channel = p_channel;
    RETURN true;
END $$;

-- seq_stored: whether a client's record (its highest seq, its bits) says p_seq was
-- stored. Only a store sets a seq's bit (bit p_seq % p_span); a seq more than p_span
-- behind the highest is taken for stored: a client never sends one that old again.
CREATE FUNCTION {s}.seq_stored(p_highest bigint, p_kept bytea, p_seq bigint,
                               p_span integer)
RETURNS boolean LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN p_seq > p_highest THEN false
                WHEN p_seq <= p_highest - p_span THEN true
                WHEN length(p_kept) * 8 < p_span THEN false
                ELSE get_bit(p_kept, p_seq % p_span) = 1 END
$$;

-- seq_kept: a record's bits once p_seq's outcome is in. The bits of the seqs the
-- highest passes over are cleared: no store of theirs was seen.
CREATE FUNCTION {s}.seq_kept(p_highest bigint, p_kept bytea, p_seq bigint,
                             p_stored boolean, p_span integer)
RETURNS bytea LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    v_kept bytea := p_kept;
    v_skipped bigint;
BEGIN
    IF p_seq <= p_highest - p_span THEN
        RETURN v_kept;
    END IF;
    IF length(v_kept) * 8 < p_span OR p_seq - p_highest >= p_span THEN
        v_kept := decode(repeat('00', p_span / 8), 'hex');
    ELSE
        FOR v_skipped IN p_highest + 1 .. p_seq - 1 LOOP
            v_kept := set_bit(v_kept, v_skipped % p_span, 0);
        END LOOP;
    END IF;
    RETURN set_bit(v_kept, p_seq % p_span, p_stored::integer);
END $$;

-- sender_seqs: a client's record of numbered sends, locked (made if missing): the
-- highest seq recorded, and which of the latest up to it were stored (seq_stored).
CREATE FUNCTION {s}.sender_seqs(p_ns text, p_sender text, p_expiry_s double precision,
                                OUT highest bigint, OUT kept bytea)
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO {s}.senders (ns, client, expires_at)
    VALUES (p_ns, p_sender, now() + make_interval(secs => p_expiry_s))
    ON CONFLICT (ns, client) DO NOTHING;
    SELECT r.highest, r.kept INTO highest, kept FROM {s}.senders r
    WHERE r.ns = p_ns AND r.client = p_sender FOR UPDATE;
END $$;

-- stored_into: p_seq's outcome into the client's record (locked by sender_seqs).
CREATE FUNCTION {s}.stored_into(p_ns text, p_sender text, p_seq bigint, p_stored boolean,
                                p_expiry_s double precision, p_span integer)
RETURNS void LANGUAGE sql AS $$
    UPDATE {s}.senders r SET highest = greatest(r.highest, p_seq),
        kept = {s}.seq_kept(r.highest, r.kept, p_seq, p_stored, p_span),
        expires_at = greatest(r.expires_at, now() + make_interval(secs => p_expiry_s))
    WHERE r.ns = p_ns AND r.client = p_sender
$$;

-- send_reserving: a request of a windowed client. -1 if its seq (p_seq > 0) was stored
-- before; else stored into room another connection of the client left (spend_left),
-- or reserved and inserted as send does (-2 if full); then the room reserved for the
-- connection p_holder, counted as held. Locks: the sender's record, the channel's
-- rows (channels, rooms, takes).
CREATE FUNCTION {s}.send_reserving(p_ns text, p_channel text, p_client text, p_payload bytea,
                                   p_capacity integer, p_expiry_s double precision,
                                   p_window integer, p_lapse_s double precision,
                                   p_sender text, p_seq bigint, p_span integer,
                                   p_holder text)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    v_seqs record;
    v_stored boolean := false;
    v_room integer := 0;
BEGIN
    IF p_seq > 0 THEN
        SELECT * INTO v_seqs FROM {s}.sender_seqs(p_ns, p_sender, p_expiry_s);
        IF {s}.seq_stored(v_seqs.highest, v_seqs.kept, p_seq, p_span) THEN
            RETURN -1;
        END IF;
        IF EXISTS (SELECT 1 FROM {s}.rooms r
                   WHERE r.ns = p_ns AND r.channel = p_channel AND r.holder <> p_holder
                     AND starts_with(r.holder, p_sender || ' ') AND r.count > 0) THEN
            PERFORM 1 FROM {s}.channels c
            WHERE c.ns = p_ns AND c.channel = p_channel FOR UPDATE;
            v_stored := FOUND AND {s}.spend_left(p_ns, p_channel, p_sender, p_holder);
            IF v_stored THEN
                UPDATE {s}.channels SET waiting = waiting + 1
                WHERE ns = p_ns AND channel = p_channel;
            END IF;
        END IF;
    END IF;
    IF NOT v_stored THEN
        v_stored := {s}.reserve(p_ns, p_channel, p_client, p_capacity);
    END IF;
    IF v_stored THEN
        INSERT INTO {s}.messages (ns, channel, client, payload, expires_at)
        VALUES (p_ns, p_channel, p_client, p_payload,
                now() + make_interval(secs => p_expiry_s));
        v_room := {s}.room_for(p_ns, p_channel, p_capacity, p_window);
        IF v_room > 0 THEN
            PERFORM {s}.hold_room(p_ns, p_channel, p_holder, v_room, p_lapse_s);
        END IF;
    END IF;
    IF p_seq > 0 THEN
        PERFORM {s}.stored_into(p_ns, p_sender, p_seq, v_stored, p_expiry_s, p_span);
    END IF;
    IF NOT v_stored THEN
        RETURN -2;
    END IF;
    RETURN v_room;
END $$;

-- send_reserved: windowed sends, in order, each into a unit of its channel's room
-- (p_holder's), unchecked; one whose seq was stored before spends its unit and is not
-- stored again (room that lapsed and was uncounted is not uncounted again). Returns
-- per message 1 (stored) or 2 (stored before). Locks: the
-- sender's record, then channels, rooms and takes rows, each in name order.
CREATE FUNCTION {s}.send_reserved(p_ns text, p_channels text[], p_clients text[],
                                  p_payloads bytea[], p_expiry_s double precision,
                                  p_sender text, p_seqs bigint[], p_holder text,
                                  p_span integer)
RETURNS integer[] LANGUAGE plpgsql AS $$
DECLARE
    v_seqs record;
    v_highest bigint;
    v_kept bytea;
    v_new integer[] := '{}';
    v_i integer;
    v_key record;
BEGIN
    SELECT * INTO v_seqs FROM {s}.sender_seqs(p_ns, p_sender, p_expiry_s);
    v_highest := v_seqs.highest;
    v_kept := v_seqs.kept;
    FOR v_i IN 1 .. coalesce(array_length(p_seqs, 1), 0) LOOP
        IF p_seqs[v_i] > 0 THEN
            CONTINUE WHEN {s}.seq_stored(v_highest, v_kept, p_seqs[v_i], p_span);
            v_kept := {s}.seq_kept(v_highest, v_kept, p_seqs[v_i], true, p_span);
            v_highest := greatest(v_highest, p_seqs[v_i]);
        END IF;
        v_new := v_new || v_i;
    END LOOP;
    INSERT INTO {s}.channels AS c (ns, channel, client, waiting)
    SELECT p_ns, p_channels[a.i], min(p_clients[a.i]), count(*)
    FROM unnest(v_new) AS a(i) GROUP BY p_channels[a.i] ORDER BY 2
    ON CONFLICT (ns, channel) DO UPDATE SET waiting = c.waiting + excluded.waiting;
    FOR v_key IN SELECT k.channel, count(*) AS n FROM unnest(p_channels) AS k(channel)
                 GROUP BY k.channel ORDER BY k.channel LOOP
        UPDATE {s}.rooms r SET count = greatest(0, r.count - v_key.n)
        WHERE r.ns = p_ns AND r.channel = v_key.channel AND r.holder = p_holder;
        CONTINUE WHEN NOT FOUND;  -- its room lapsed and lapse_rooms uncounted it
        UPDATE {s}.takes t SET held = greatest(0, (CASE WHEN t.held_until > now() THEN t.held ELSE 0 END) - v_key.n)
        WHERE t.ns = p_ns AND t.channel = v_key.channel;
    END LOOP;
    INSERT INTO {s}.messages (ns, channel, client, payload, expires_at)
    SELECT p_ns, p_channels[a.i], p_clients[a.i], p_payloads[a.i],
           now() + make_interval(secs => p_expiry_s)
    FROM unnest(v_new) AS a(i) ORDER BY a.i;
    UPDATE {s}.senders r
    SET highest = v_highest, kept = v_kept,
        expires_at = greatest(r.expires_at, now() + make_interval(secs => p_expiry_s))
    WHERE r.ns = p_ns AND r.client = p_sender;
    RETURN ARRAY(SELECT CASE WHEN k.i = ANY(v_new) THEN 1 ELSE 2 END
                 FROM generate_subscripts(p_channels, 1) AS k(i) ORDER BY k.i);
END $$;

-- send_reserved_direct (version 10): send_reserved, except that a message the caller
-- can push itself (p_leases[i] > 0: its channel's owner is connected to the caller)
-- is not stored to wait when nothing of its channel waits untaken (what was taken for
-- a push went out before it, or goes out first: the caller waits for its push takes
-- under way): it is written to pushes under p_leases[i] (one row each, leased to the
-- caller, not counted as waiting), for the caller to push once this has committed, and
-- its unit of room is spent all the same (the caller counts it as a direct push).
-- Returns per message 1 (stored), 2 (stored before) or 3 (written to pushes). A call
-- that stores nothing to wait commits without waiting for the disk (as push_direct).
CREATE FUNCTION {s}.send_reserved_direct(p_ns text, p_channels text[], p_clients text[],
                                         p_payloads bytea[], p_expiry_s double precision,
                                         p_sender text, p_seqs bigint[], p_holder text,
                                         p_span integer, p_leases bigint[],
                                         p_lease_s double precision)
RETURNS integer[] LANGUAGE plpgsql AS $$
DECLARE
    v_seqs record;
    v_highest bigint;
    v_kept bytea;
    v_new integer[] := '{}';
    v_direct integer[] := '{}';
    v_busy text[];
    v_i integer;
    v_key record;
BEGIN
    SELECT * INTO v_seqs FROM {s}.sender_seqs(p_ns, p_sender, p_expiry_s);
    v_highest := v_seqs.highest;
    v_kept := v_seqs.kept;
    -- Channels with messages waiting untaken: a direct push would overtake them.
    v_busy := ARRAY(
        SELECT c.channel FROM {s}.channels c
        WHERE c.ns = p_ns AND c.channel = ANY(ARRAY(
            SELECT p_channels[k.i] FROM generate_subscripts(p_channels, 1) AS k(i)
            WHERE p_leases[k.i] > 0))
          AND c.waiting - coalesce((SELECT t.taken FROM {s}.takes t
                                    WHERE t.ns = c.ns AND t.channel = c.channel), 0) > 0);
    FOR v_i IN 1 .. coalesce(array_length(p_seqs, 1), 0) LOOP
        IF p_seqs[v_i] > 0 THEN
            CONTINUE WHEN {s}.seq_stored(v_highest, v_kept, p_seqs[v_i], p_span);
            v_kept := {s}.seq_kept(v_highest, v_kept, p_seqs[v_i], true, p_span);
            v_highest := greatest(v_highest, p_seqs[v_i]);
        END IF;
        IF p_leases[v_i] > 0 AND NOT p_channels[v_i] = ANY(v_busy) THEN
            v_direct := v_direct || v_i;
        ELSE
            v_new := v_new || v_i;
        END IF;
    END LOOP;
    IF cardinality(v_new) = 0 THEN
        PERFORM set_config('synchronous_commit', 'off', true);
    END IF;
    INSERT INTO {s}.channels AS c (ns, channel, client, waiting)
    SELECT p_ns, p_channels[a.i], min(p_clients[a.i]), count(*)
    FROM unnest(v_new) AS a(i) GROUP BY p_channels[a.i] ORDER BY 2
    ON CONFLICT (ns, channel) DO UPDATE SET waiting = c.waiting + excluded.waiting;
    FOR v_key IN SELECT k.channel, count(*) AS n FROM unnest(p_channels) AS k(channel)
                 GROUP BY k.channel ORDER BY k.channel LOOP
        UPDATE {s}.rooms r SET count = greatest(0, r.count - v_key.n)
        WHERE r.ns = p_ns AND r.channel = v_key.channel AND r.holder = p_holder;
        CONTINUE WHEN NOT FOUND;  -- its room lapsed and lapse_rooms uncounted it
        UPDATE {s}.takes t SET held = greatest(0, (CASE WHEN t.held_until > now() THEN t.held ELSE 0 END) - v_key.n)
        WHERE t.ns = p_ns AND t.channel = v_key.channel;
    END LOOP;
    INSERT INTO {s}.messages (ns, channel, client, payload, expires_at)
    SELECT p_ns, p_channels[a.i], p_clients[a.i], p_payloads[a.i],
           now() + make_interval(secs => p_expiry_s)
    FROM unnest(v_new) AS a(i) ORDER BY a.i;
    INSERT INTO {s}.pushes (lease, ns, payload, expires_at, lease_until, channels)
    SELECT p_leases[a.i], p_ns, p_payloads[a.i], now() + make_interval(secs => p_expiry_s),
           now() + make_interval(secs => p_lease_s), ARRAY[p_channels[a.i]]
    FROM unnest(v_direct) AS a(i);
    UPDATE {s}.senders r
    SET highest = v_highest, kept = v_kept,
        expires_at = greatest(r.expires_at, now() + make_interval(secs => p_expiry_s))
    WHERE r.ns = p_ns AND r.client = p_sender;
    RETURN ARRAY(SELECT CASE WHEN k.i = ANY(v_new) THEN 1
                             WHEN k.i = ANY(v_direct) THEN 3 ELSE 2 END
                 FROM generate_subscripts(p_channels, 1) AS k(i) ORDER BY k.i);
END $$;

-- reserve_room: room for a connection that keeps sending, storing nothing (locks the
-- channel's rows: channels, rooms, takes). Lost to a crash, room only comes back early.
CREATE FUNCTION {s}.reserve_room(p_ns text, p_channel text, p_client text,
                                 p_capacity integer, p_window integer,
                                 p_lapse_s double precision, p_holder text)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    v_room integer;
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    INSERT INTO {s}.channels AS c (ns, channel, client, capacity)
    VALUES (p_ns, p_channel, p_client, p_capacity)
    ON CONFLICT (ns, channel) DO UPDATE SET capacity = p_capacity;
    v_room := {s}.room_for(p_ns, p_channel, p_capacity, p_window);
    IF v_room > 0 THEN
        PERFORM {s}.hold_room(p_ns, p_channel, p_holder, v_room, p_lapse_s);
    END IF;
    RETURN v_room;
END $$;

-- release_room: a connection gives back up to p_count units of its room on a channel;
-- all of it if its room lapsed (uncount_room: what is still counted of it).
CREATE FUNCTION {s}.release_room(p_ns text, p_channel text, p_holder text, p_count integer)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_row record;
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    SELECT r.count, r.until INTO v_row FROM {s}.rooms r
    WHERE r.ns = p_ns AND r.channel = p_channel AND r.holder = p_holder FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF v_row.until > now() AND v_row.count > p_count THEN
        UPDATE {s}.rooms r SET count = r.count - p_count
        WHERE r.ns = p_ns AND r.channel = p_channel AND r.holder = p_holder;
        PERFORM {s}.uncount_room(p_ns, p_channel, p_count, v_row.until);
    ELSE
        DELETE FROM {s}.rooms r
        WHERE r.ns = p_ns AND r.channel = p_channel AND r.holder = p_holder;
        PERFORM {s}.uncount_room(p_ns, p_channel, v_row.count, v_row.until);
    END IF;
END $$;

-- uncount_room: p_count units of a holder's room, whose row said until p_until, no
-- longer held on the channel, if they still are: room reserved before the channel's
-- held count last lapsed (held_since) lapsed with it. Room still reserved always counts
-- (held_until is at least its until), and so does room that lapsed since.
CREATE FUNCTION {s}.uncount_room(p_ns text, p_channel text, p_count integer,
                                 p_until timestamptz)
RETURNS void LANGUAGE sql AS $$
    UPDATE {s}.takes t SET held = greatest(0, (CASE WHEN t.held_until > now() THEN t.held ELSE 0 END) - p_count)
    WHERE t.ns = p_ns AND t.channel = p_channel AND p_until > t.held_since AND p_count > 0
$$;

-- lapse_rooms: the rooms rows that lapsed (their daemon died, or could not release
-- them), deleted and uncounted (uncount_room), channel by channel in name order, each
-- channel's rooms rows before its takes row, as every function locks them; rows
-- another transaction holds wait for the next sweep. Run by the sweep, so room a
-- release missed comes back within room_lapse (and a sweep) even on a channel whose
-- held count never lapses, room being reserved there all the time.
CREATE FUNCTION {s}.lapse_rooms()
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_key record;
    v_gone record;
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    FOR v_key IN SELECT DISTINCT r.ns, r.channel FROM {s}.rooms r WHERE r.until <= now()
                 ORDER BY r.ns, r.channel LOOP
        FOR v_gone IN
            SELECT l.ctid, l.count, l.until FROM {s}.rooms l
            WHERE l.ns = v_key.ns AND l.channel = v_key.channel AND l.until <= now()
            ORDER BY l.holder FOR UPDATE SKIP LOCKED
        LOOP
            DELETE FROM {s}.rooms r WHERE r.ctid = v_gone.ctid;
            PERFORM {s}.uncount_room(v_key.ns, v_key.channel, v_gone.count, v_gone.until);
        END LOOP;
    END LOOP;
END $$;

-- Leased pushes (version 8): a message pushed to a client's own channel outlives its
-- daemon until the client's layer acknowledges it, so a daemon killed outright
-- (SIGKILL) with pushes in flight loses none. Each daemon leases under its own range of
-- lease values (a random base, its low 32 bits 0), new at each start, renewed every
-- third of the lease while it holds pushes (renew_pushed). A message taken from the
-- table for a push stays there, leased under the base itself, its id naming it
-- (push_take), until acknowledged (ack_pushed) or given back (unlease_pushed). A direct
-- push, never stored to wait, is written as one row of pushes per send or group send
-- slice, the payload once for all its members, under a lease the daemon chose before
-- the call (push_direct, group_push_slice); the daemon deletes it once every member
-- has acknowledged it (end_pushes). A lapsed lease (its daemon died) leaves a taken
-- message in its place for the next push_take of its channel, and turns a pushes row
-- into a waiting message for each of its members (expand_pushes), in order, notified:
-- a member that had acknowledged it gets it again, and its layer drops it by its id.

CREATE {unlogged} TABLE {s}.pushes (
    lease bigint PRIMARY KEY,
    ns text NOT NULL,
    payload bytea NOT NULL,
    expires_at timestamptz NOT NULL,
    lease_until timestamptz NOT NULL,
    channels text[] NOT NULL
);
ALTER TABLE {s}.pushes ALTER COLUMN payload SET STORAGE EXTERNAL;
CREATE INDEX pushes_by_lease_until ON {s}.pushes (lease_until);

-- push_take: take_many for pushes: the oldest unexpired messages of several channels
-- that nobody holds (never leased, or their lease lapsed), leased to p_lease for
-- p_lease_s seconds instead of removed; those never leased before are counted out, and
-- all of them counted as held.
CREATE FUNCTION {s}.push_take(p_ns text, p_channels text[], p_limit integer,
                              p_lease bigint, p_lease_s double precision)
RETURNS TABLE (taken_channel text, taken_id bigint, taken_payload bytea,
               taken_ttl_s double precision)
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    RETURN QUERY
    WITH picked AS (
        SELECT p.ctid, p.fresh FROM unnest(p_channels) AS k(name)
        CROSS JOIN LATERAL (
            SELECT m.ctid, m.lease IS NULL AS fresh FROM {s}.messages m
            WHERE m.ns = p_ns AND m.channel = k.name AND m.expires_at > now()
              AND (m.lease IS NULL OR m.lease_until <= now())
            ORDER BY m.id LIMIT p_limit FOR UPDATE SKIP LOCKED
        ) p
    ), leased AS (
        UPDATE {s}.messages m
        SET lease = p_lease, lease_until = now() + make_interval(secs => p_lease_s)
        FROM picked p WHERE m.ctid = p.ctid
        RETURNING m.channel, m.id, m.payload, m.expires_at, p.fresh
    ), counted AS (
        INSERT INTO {s}.takes AS t (ns, channel, taken, held, held_until)
        SELECT p_ns, l.channel, count(*) FILTER (WHERE l.fresh), count(*), max(l.expires_at)
        FROM leased l GROUP BY l.channel ORDER BY l.channel
        ON CONFLICT (ns, channel) DO UPDATE SET
            taken = t.taken + excluded.taken,
            held = (CASE WHEN t.held_until > now() THEN t.held ELSE 0 END) + excluded.held,
            held_until = greatest(t.held_until, excluded.held_until)
    )
    SELECT l.channel, l.id, l.payload, extract(epoch FROM l.expires_at - now())::float8
    FROM leased l ORDER BY l.channel, l.id;
END $$;

-- push_direct: send_direct, and when it answers 2 (push it yourself) the message is
-- written to pushes under p_lease. Such a transaction writes only that row, for a
-- message already in its daemon's hands: its commit does not wait for the disk.
CREATE FUNCTION {s}.push_direct(p_ns text, p_channel text, p_client text, p_payload bytea,
                                p_capacity integer, p_expiry_s double precision,
                                p_direct boolean, p_lease bigint,
                                p_lease_s double precision)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    v_outcome integer;
BEGIN
    v_outcome := {s}.send_direct(p_ns, p_channel, p_client, p_payload, p_capacity,
                                 p_expiry_s, p_direct);
    IF v_outcome = 2 THEN
        PERFORM set_config('synchronous_commit', 'off', true);
        INSERT INTO {s}.pushes (lease, ns, payload, expires_at, lease_until, channels)
        VALUES (p_lease, p_ns, p_payload, now() + make_interval(secs => p_expiry_s),
                now() + make_interval(secs => p_lease_s), ARRAY[p_channel]);
    END IF;
    RETURN v_outcome;
END $$;

-- group_push_slice: group_send_slice, and one pushes row, under p_lease, for the
-- members it leaves to the caller to push (direct). A slice that stores nothing else
-- commits without waiting for the disk (as push_direct).
CREATE FUNCTION {s}.group_push_slice(p_ns text, p_group text, p_payload bytea,
                                     p_expiry_s double precision, p_after text,
                                     p_upto text, p_limit integer, p_channels text,
                                     p_capacities text, p_direct text,
                                     p_direct_capacities text, p_clients text,
                                     p_lease bigint, p_lease_s double precision,
                                     OUT delivered text[], OUT skipped integer,
                                     OUT unknown text[], OUT direct text,
                                     OUT known integer, OUT last text, OUT members text)
LANGUAGE plpgsql AS $$
BEGIN
    SELECT r.delivered, r.skipped, r.unknown, r.direct, r.known, r.last, r.members
    INTO delivered, skipped, unknown, direct, known, last, members
    FROM {s}.group_send_slice(p_ns, p_group, p_payload, p_expiry_s, p_after, p_upto,
                              p_limit, p_channels, p_capacities, p_direct,
                              p_direct_capacities, p_clients) r;
    IF direct <> '' THEN
        IF cardinality(delivered) = 0 THEN
            PERFORM set_config('synchronous_commit', 'off', true);
        END IF;
        INSERT INTO {s}.pushes (lease, ns, payload, expires_at, lease_until, channels)
        VALUES (p_lease, p_ns, p_payload, now() + make_interval(secs => p_expiry_s),
                now() + make_interval(secs => p_lease_s), string_to_array(direct, ' '));
    END IF;
END $$;

-- end_pushes: pushes rows whose every member acknowledged the message (or gave it back).
CREATE FUNCTION {s}.end_pushes(p_leases bigint[])
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    DELETE FROM {s}.pushes WHERE lease = ANY(p_leases);
END $$;

-- expand_pushes: up to p_limit pushes rows whose lease lapsed (their daemon died)
-- become a waiting message for each member, in the order they were written, counted in
-- and notified (each with its client, the name's part before '!' after its last '.');
-- expired ones are dropped.
CREATE FUNCTION {s}.expand_pushes(p_limit integer)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    v_ns text[];
    v_channels text[];
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    WITH gone AS (
        DELETE FROM {s}.pushes WHERE lease = ANY(ARRAY(
            SELECT p.lease FROM {s}.pushes p WHERE p.lease_until <= now()
            ORDER BY p.lease_until LIMIT p_limit FOR UPDATE SKIP LOCKED))
        RETURNING lease, ns, payload, expires_at, channels
    ), stored AS (
        INSERT INTO {s}.messages (ns, channel, client, payload, expires_at)
        SELECT g.ns, k.channel, substring(split_part(k.channel, '!', 1) FROM '[^.]*$'),
               g.payload, g.expires_at
        FROM gone g CROSS JOIN LATERAL unnest(g.channels) WITH ORDINALITY AS k(channel, i)
        WHERE g.expires_at > now()
        ORDER BY g.lease, k.i
        RETURNING ns, channel, client
    ), counted AS (
        INSERT INTO {s}.channels AS c (ns, channel, client, waiting)
        SELECT x.ns, x.channel, min(x.client), count(*) FROM stored x
        GROUP BY x.ns, x.channel ORDER BY x.ns, x.channel
        ON CONFLICT (ns, channel) DO UPDATE SET waiting = c.waiting + excluded.waiting
        RETURNING c.ns, c.channel
    )
    SELECT coalesce(array_agg(n.ns), '{}'), coalesce(array_agg(n.channel), '{}')
    INTO v_ns, v_channels FROM counted n;
    PERFORM pg_notify({notify}, k.ns || ' ' || k.channel)
    FROM unnest(v_ns, v_channels) AS k(ns, channel);
    RETURN cardinality(v_channels);
END $$;

-- ack_pushed: delete messages taken for a push and acknowledged, each by its id and
-- lease; one whose lease lapsed and was taken again meanwhile is left to its new taker.
CREATE FUNCTION {s}.ack_pushed(p_ns text[], p_channels text[], p_ids bigint[],
                               p_leases bigint[])
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    DELETE FROM {s}.messages WHERE ctid = ANY(ARRAY(
        SELECT x.ctid FROM unnest(p_ns, p_channels, p_ids, p_leases) AS k(ns, channel, id, lease)
        CROSS JOIN LATERAL (
            SELECT m.ctid FROM {s}.messages m
            WHERE m.ns = k.ns AND m.channel = k.channel AND m.id = k.id AND m.lease = k.lease
            FOR UPDATE SKIP LOCKED
        ) x));
END $$;

-- unlease_pushed: messages taken for a push and not acknowledged (their connection
-- closed) go back to their places, unleased and counted in, as unlease does; those
-- that expired meanwhile are deleted (behind a live head no purge would reach them).
CREATE FUNCTION {s}.unlease_pushed(p_ns text, p_channel text, p_ids bigint[],
                                   p_leases bigint[])
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_back bigint;
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    DELETE FROM {s}.messages m
    USING unnest(p_ids, p_leases) AS k(id, lease)
    WHERE m.ns = p_ns AND m.channel = p_channel AND m.id = k.id AND m.lease = k.lease
      AND m.expires_at <= now();
    WITH back AS (
        UPDATE {s}.messages SET lease = NULL, lease_until = NULL
        WHERE ctid = ANY(ARRAY(
            SELECT x.ctid FROM unnest(p_ids, p_leases) AS k(id, lease)
            CROSS JOIN LATERAL (
                SELECT m.ctid FROM {s}.messages m
                WHERE m.ns = p_ns AND m.channel = p_channel AND m.id = k.id
                  AND m.lease = k.lease
                FOR UPDATE SKIP LOCKED
            ) x))
        RETURNING 1)
    SELECT count(*) INTO v_back FROM back;
    IF v_back > 0 THEN
        INSERT INTO {s}.channels AS c (ns, channel, waiting) VALUES (p_ns, p_channel, v_back)
        ON CONFLICT (ns, channel) DO UPDATE SET waiting = c.waiting + excluded.waiting;
        PERFORM pg_notify({notify}, p_ns || ' ' || p_channel);
    END IF;
END $$;

-- renew_pushed: the leases of a daemon's range (p_low to p_high) run p_lease_s seconds
-- from now: its taken messages' on the channels it holds pushes of, and its pushes rows.
CREATE FUNCTION {s}.renew_pushed(p_ns text[], p_channels text[], p_low bigint,
                                 p_high bigint, p_lease_s double precision)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    UPDATE {s}.messages m SET lease_until = now() + make_interval(secs => p_lease_s)
    FROM unnest(p_ns, p_channels) AS k(ns, channel)
    WHERE m.ns = k.ns AND m.channel = k.channel AND m.lease BETWEEN p_low AND p_high;
    UPDATE {s}.pushes SET lease_until = now() + make_interval(secs => p_lease_s)
    WHERE lease BETWEEN p_low AND p_high;
END $$;
