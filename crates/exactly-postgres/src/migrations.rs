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
