//! Schema, applied once per version under an advisory lock and recorded in `exactly_migrations`.
//!
//! The outbox is plain SQL so a writer in any language can insert into it, in the same
//! transaction as its business change:
//!
//! ```sql
//! BEGIN;
//! UPDATE coupons SET used = true WHERE code = 'C-42';
//! INSERT INTO outbox (event_id, event_type, aggregate_type, aggregate_id, topic, payload, headers)
//! VALUES ('0190e0b4-5d6f-7a1c-9e2d-3f4a5b6c7d8e', 'CouponUsed', 'coupon', 'C-42', 'coupon-events',
//!         convert_to('{"code":"C-42"}', 'UTF8'), '{"trace":"abc"}');
//! COMMIT;
//! ```
//! `event_id` should be a UUIDv7 (`uuidv7()` on PostgreSQL 18; any UUID works, v4 keys cost the
//! consumer a key set). A statement trigger NOTIFYs `exactly_outbox` at commit, which wakes the
//! relay at once. Columns a writer may leave NULL by mistake are nullable on purpose: the relay
//! marks such a row DEAD with the reason instead of failing the business transaction.

use tokio_postgres::Client;

use crate::error::PgError;

/// The channel the outbox trigger notifies.
pub const NOTIFY_CHANNEL: &str = "exactly_outbox";

/// Ordered migrations; never edit one that has shipped, add a new one.
const MIGRATIONS: &[(i32, &str)] = &[
    (
        1,
        r#"
CREATE TABLE outbox (
    id              BIGSERIAL PRIMARY KEY,
    event_id        UUID UNIQUE,
    event_type      TEXT,
    aggregate_type  TEXT,
    aggregate_id    TEXT,
    topic           TEXT,
    payload         BYTEA,
    headers         JSONB,
    occurred_at     TIMESTAMPTZ,
    status          TEXT NOT NULL DEFAULT 'NEW' CHECK (status IN ('NEW', 'SENDING', 'SENT', 'DEAD')),
    retry_count     INTEGER NOT NULL DEFAULT 0,
    next_retry_at   TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    lease_owner     TEXT,
    sequence        BIGINT,
    last_error      TEXT,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    sent_at         TIMESTAMPTZ
);
CREATE INDEX outbox_claimable ON outbox (next_retry_at, id) WHERE status IN ('NEW', 'SENDING');
CREATE INDEX outbox_pending_by_aggregate ON outbox (aggregate_type, aggregate_id, id)
    WHERE status IN ('NEW', 'SENDING');
CREATE SEQUENCE outbox_sequence AS BIGINT;

CREATE FUNCTION exactly_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('exactly_outbox', '');
    RETURN NULL;
END $$;
CREATE TRIGGER outbox_notify AFTER INSERT ON outbox FOR EACH STATEMENT EXECUTE FUNCTION exactly_outbox_notify();

CREATE TABLE exactly_processed (
    consumer      TEXT NOT NULL,
    key           TEXT NOT NULL,
    event_id      UUID NOT NULL,
    topic         TEXT NOT NULL,
    partition     INTEGER NOT NULL,
    "offset"      BIGINT NOT NULL,
    processed_at  TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (consumer, key)
);
CREATE INDEX exactly_processed_age ON exactly_processed (consumer, processed_at);

CREATE TABLE exactly_watermarks (
    consumer     TEXT NOT NULL,
    source       TEXT NOT NULL,
    topic        TEXT NOT NULL,
    partition    INTEGER NOT NULL,
    high_key     TEXT NOT NULL,
    next_offset  BIGINT NOT NULL,
    PRIMARY KEY (consumer, source, topic, partition)
);

CREATE TABLE exactly_parked (
    id          BIGSERIAL PRIMARY KEY,
    consumer    TEXT NOT NULL,
    topic       TEXT NOT NULL,
    partition   INTEGER NOT NULL,
    "offset"    BIGINT NOT NULL,
    reason      TEXT NOT NULL,
    detail      TEXT NOT NULL,
    key_text    TEXT,
    record_key  BYTEA,
    headers     TEXT NOT NULL,
    payload     BYTEA,
    parked_at   TIMESTAMPTZ NOT NULL,
    UNIQUE (consumer, topic, partition, "offset")
);
"#,
    ),
    (
        2,
        r#"
ALTER TABLE exactly_watermarks ADD COLUMN source_epoch BIGINT NOT NULL DEFAULT 0;

-- Outbox events the WAL relay can never publish, kept before the slot moves past them.
CREATE TABLE exactly_relay_dead (
    key_text    TEXT PRIMARY KEY,
    outbox_id   BIGINT NOT NULL,
    reason      TEXT NOT NULL,
    raw         TEXT NOT NULL,
    dead_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);
"#,
    ),
    (
        3,
        r#"
-- Applying a message removes a parked copy of it (a parked message is one not applied), and
-- `exactly parked` finds messages by key.
CREATE INDEX exactly_parked_by_key ON exactly_parked (consumer, key_text);
"#,
    ),
    (
        4,
        r#"
-- Consumers in any language: exactly_claim records a key inside the caller's own transaction
-- (true the first time, false on a repeat), with the Rust consumer's rules; exactly_forget
-- prunes the key set; exactly_enqueue writes an outbox row and returns its event id.
-- Refusals raise with their own SQLSTATE so a caller can park the message:
--   EXK01 a time-ordered key older than the horizon (its record may be pruned already),
--   EXK02 a sequence key the epoch watermark refuses (the source went backwards, or an
--         abandoned history), EXK03 not an exactly key or a missing argument.
ALTER TABLE exactly_processed ALTER COLUMN event_id DROP NOT NULL;

CREATE FUNCTION exactly_key_time_ms(p_key text) RETURNS bigint LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    alphabet constant text := '0123456789ABCDEFGHJKMNPQRSTVWXYZ';
    body text := upper(substr(p_key, 6));
    ms bigint := 0;
    digit int;
BEGIN
    IF p_key LIKE 'v7:%' THEN
        RETURN ('x' || lpad(substr(replace(substr(p_key, 4), '-', ''), 1, 12), 16, '0'))::bit(64)::bigint;
    ELSIF p_key LIKE 'ulid:%' THEN
        FOR i IN 1..10 LOOP
            digit := strpos(alphabet, substr(body, i, 1)) - 1;
            IF digit < 0 THEN
                RAISE EXCEPTION USING ERRCODE = 'EXK03', MESSAGE = format('not an exactly key: %L', p_key);
            END IF;
            ms := ms * 32 + digit;
        END LOOP;
        RETURN ms;
    END IF;
    RETURN NULL;
END $$;

CREATE FUNCTION exactly_claim(
    p_consumer text,
    p_key text,
    p_topic text DEFAULT NULL,
    p_partition integer DEFAULT NULL,
    p_offset bigint DEFAULT NULL,
    p_source_epoch bigint DEFAULT NULL,
    p_horizon interval DEFAULT interval '7 days'
) RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    kind text := split_part(p_key, ':', 1);
    body text := substr(p_key, length(split_part(p_key, ':', 1)) + 2);
    now_ms bigint := (extract(epoch FROM clock_timestamp()) * 1000)::bigint;
    at_ms bigint;
    hex text;
    src text;
    stored record;
    epoch bigint;
    inserted int;
BEGIN
    IF p_consumer IS NULL OR p_key IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'EXK03', MESSAGE = 'exactly_claim needs a consumer and a key';
    END IF;
    IF kind = 'seq' THEN
        hex := lower(split_part(body, ':', 1));
        src := substr(body, 34);
        IF hex !~ '^[0-9a-f]{32}$' OR src = '' THEN
            RAISE EXCEPTION USING ERRCODE = 'EXK03', MESSAGE = format('not an exactly key: %L', p_key);
        END IF;
        IF p_topic IS NULL OR p_partition IS NULL OR p_offset IS NULL THEN
            RAISE EXCEPTION USING ERRCODE = 'EXK03',
                MESSAGE = 'a sequence key is judged per topic and partition: pass topic, partition and offset';
        END IF;
        SELECT w.high_key, w.source_epoch INTO stored FROM exactly_watermarks w
        WHERE w.consumer = p_consumer AND w.source = src AND w.topic = p_topic AND w.partition = p_partition
        FOR UPDATE;
        IF FOUND THEN
            epoch := coalesce(p_source_epoch, stored.source_epoch);
            IF hex <= stored.high_key THEN
                IF epoch > stored.source_epoch THEN
                    RAISE EXCEPTION USING ERRCODE = 'EXK02', MESSAGE = format(
                        'source went backwards: key %s (epoch %s) is at or below the watermark %s of epoch %s',
                        p_key, epoch, stored.high_key, stored.source_epoch);
                END IF;
                RETURN false;
            END IF;
            IF epoch < stored.source_epoch THEN
                RAISE EXCEPTION USING ERRCODE = 'EXK02', MESSAGE = format(
                    'key %s comes from epoch %s, older than the watermark''s epoch %s: an abandoned history',
                    p_key, epoch, stored.source_epoch);
            END IF;
            UPDATE exactly_watermarks w SET high_key = hex, next_offset = p_offset + 1,
                source_epoch = greatest(stored.source_epoch, epoch)
            WHERE w.consumer = p_consumer AND w.source = src AND w.topic = p_topic AND w.partition = p_partition;
            RETURN true;
        END IF;
        INSERT INTO exactly_watermarks (consumer, source, topic, partition, high_key, next_offset, source_epoch)
        VALUES (p_consumer, src, p_topic, p_partition, hex, p_offset + 1, coalesce(p_source_epoch, 0))
        ON CONFLICT DO NOTHING;
        GET DIAGNOSTICS inserted = ROW_COUNT;
        IF inserted = 0 THEN
            -- Another transaction created the row first: judge again against it.
            RETURN exactly_claim(p_consumer, p_key, p_topic, p_partition, p_offset, p_source_epoch, p_horizon);
        END IF;
        RETURN true;
    ELSIF kind IN ('v4', 'v7') THEN
        IF body !~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
           OR substr(body, 15, 1) <> substr(kind, 2, 1) THEN
            RAISE EXCEPTION USING ERRCODE = 'EXK03', MESSAGE = format('not an exactly key: %L', p_key);
        END IF;
    ELSIF kind = 'ulid' THEN
        IF upper(body) !~ '^[0-7][0-9A-HJKMNP-TV-Z]{25}$' THEN
            RAISE EXCEPTION USING ERRCODE = 'EXK03', MESSAGE = format('not an exactly key: %L', p_key);
        END IF;
    ELSE
        RAISE EXCEPTION USING ERRCODE = 'EXK03', MESSAGE = format('not an exactly key: %L', p_key);
    END IF;
    at_ms := exactly_key_time_ms(p_key);
    IF at_ms IS NOT NULL AND now_ms - at_ms > (extract(epoch FROM p_horizon) * 1000)::bigint THEN
        RAISE EXCEPTION USING ERRCODE = 'EXK01', MESSAGE = format(
            'key %s is %s ms old, beyond the horizon %s: its record may be pruned, so it is refused',
            p_key, now_ms - at_ms, p_horizon);
    END IF;
    INSERT INTO exactly_processed (consumer, key, event_id, topic, partition, "offset", processed_at)
    VALUES (p_consumer, p_key, CASE WHEN kind IN ('v4', 'v7') THEN body::uuid END,
            coalesce(p_topic, ''), coalesce(p_partition, -1), coalesce(p_offset, -1), clock_timestamp())
    ON CONFLICT DO NOTHING;
    GET DIAGNOSTICS inserted = ROW_COUNT;
    RETURN inserted = 1;
END $$;

CREATE FUNCTION exactly_forget(
    p_consumer text,
    p_retention interval DEFAULT interval '7 days',
    p_max_rows integer DEFAULT 5000
) RETURNS bigint LANGUAGE sql AS $$
    WITH gone AS (
        DELETE FROM exactly_processed WHERE ctid = ANY (ARRAY(
            SELECT ctid FROM exactly_processed
            WHERE consumer = p_consumer AND processed_at < clock_timestamp() - p_retention
            LIMIT p_max_rows))
        RETURNING 1)
    SELECT count(*) FROM gone
$$;

-- A UUIDv7 from the clock (PostgreSQL 18 has uuidv7(); this works on every version).
CREATE FUNCTION exactly_uuidv7() RETURNS uuid LANGUAGE sql VOLATILE AS $$
    SELECT encode(
        set_bit(set_bit(overlay(uuid_send(gen_random_uuid())
            PLACING substring(int8send((extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3)
            FROM 1 FOR 6), 52, 1), 53, 1), 'hex')::uuid
$$;

CREATE FUNCTION exactly_enqueue(
    p_topic text,
    p_event_type text,
    p_aggregate_type text,
    p_aggregate_id text,
    p_payload jsonb,
    p_headers jsonb DEFAULT NULL,
    p_occurred_at timestamptz DEFAULT NULL
) RETURNS uuid LANGUAGE plpgsql AS $$
DECLARE
    id uuid := exactly_uuidv7();
BEGIN
    INSERT INTO outbox (event_id, event_type, aggregate_type, aggregate_id, topic, payload, headers, occurred_at)
    VALUES (id, p_event_type, p_aggregate_type, p_aggregate_id, p_topic,
            convert_to(p_payload::text, 'UTF8'), coalesce(p_headers, '{}'::jsonb),
            coalesce(p_occurred_at, clock_timestamp()));
    RETURN id;
END $$;
"#,
    ),
    (
        5,
        r#"
-- The claim takes the first pending rows in id order. With only the primary key to walk, it
-- stepped over every SENT row before them, on every claim: with 150,000 rows sent, a 2,000-row
-- claim skipped all 150,000 (49 ms of its 75). This index holds pending rows only, so a claim
-- reads what it takes. Nothing read outbox_pending_by_aggregate (the claim finds the aggregates
-- held back through outbox_claimable), and it cost every insert and every claim one more entry
-- over two text columns.
DROP INDEX IF EXISTS outbox_pending_by_aggregate;
-- IF NOT EXISTS: on a very large outbox, create it first with CREATE INDEX CONCURRENTLY (which
-- cannot run inside this migration's transaction) and writers are never blocked by the build.
CREATE INDEX IF NOT EXISTS outbox_pending ON outbox (id) WHERE status IN ('NEW', 'SENDING');
"#,
    ),
    (
        6,
        r#"
-- The UPSERT sink's positions: per sink, topic and partition the next offset to apply, written
-- in the transaction that applies the rows before it, so a record read again changes nothing.
CREATE TABLE IF NOT EXISTS exactly_sink_positions (
    sink        TEXT NOT NULL,
    topic       TEXT NOT NULL,
    partition   INTEGER NOT NULL,
    next_offset BIGINT NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (sink, topic, partition)
);
"#,
    ),
];

/// Brings the schema up to date; safe to call from several processes at once.
pub async fn migrate(client: &mut Client) -> Result<(), PgError> {
    let tx = client
        .transaction()
        .await
        .map_err(PgError::at("begin migration"))?;
    tx.batch_execute(
        "SELECT pg_advisory_xact_lock(7384615000);
         CREATE TABLE IF NOT EXISTS exactly_migrations (version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
    )
    .await
    .map_err(PgError::at("create exactly_migrations"))?;
    for (version, sql) in MIGRATIONS {
        let done = tx
            .query_opt("SELECT 1 FROM exactly_migrations WHERE version = $1", &[version])
            .await
            .map_err(PgError::at("read exactly_migrations"))?
            .is_some();
        if !done {
            tx.batch_execute(sql)
                .await
                .map_err(PgError::at("apply migration"))?;
            tx.execute("INSERT INTO exactly_migrations (version) VALUES ($1)", &[version])
                .await
                .map_err(PgError::at("record migration"))?;
        }
    }
    tx.commit().await.map_err(PgError::at("commit migration"))
}
