//! The outbox on PostgreSQL: enqueue in the caller's transaction; claim and settle for a relay.

use std::sync::Arc;
use std::time::Duration;

use exactly_core::record::headers_to_json;
use exactly_core::wal::PayloadType;
use exactly_core::{
    ClaimRequest, Claimed, Envelope, KeyMode, OutboxStats, OutboxStatus, OutboxStore, RawRow, Settlement,
    StoreError, UnixMillis,
};
use futures::StreamExt;
use tokio::sync::{Mutex, Notify};
use tokio_postgres::types::Type;
use tokio_postgres::{AsyncMessage, Client, GenericClient, Row};

use crate::db::{connect, reconnect_if_closed};
use crate::error::PgError;
use crate::migrations::{migrate, NOTIFY_CHANNEL};

/// Inserts `event` for `topic` through the caller's client or transaction, so it commits or
/// rolls back with the caller's business change. Returns the row id.
pub async fn enqueue<C: GenericClient>(client: &C, topic: &str, event: &Envelope) -> Result<i64, PgError> {
    let headers = (!event.headers.is_empty()).then(|| headers_to_json(&event.headers));
    // Typed parameters: parse, bind and execute in one round trip, where an untyped statement
    // is prepared first (a second round trip inside every business transaction).
    let row = client
        .query_typed_one(
            "INSERT INTO outbox (event_id, event_type, aggregate_type, aggregate_id, topic, payload, headers, occurred_at)
             VALUES ($1::text::uuid, $2, $3, $4, $5, $6, $7::text::jsonb, to_timestamp($8::float8 / 1000))
             RETURNING id",
            &[
                (&event.event_id.hyphenated().to_string(), Type::TEXT),
                (&event.event_type, Type::TEXT),
                (&event.aggregate_type, Type::TEXT),
                (&event.aggregate_id, Type::TEXT),
                (&topic, Type::TEXT),
                (&event.payload, Type::BYTEA),
                (&headers, Type::TEXT),
                (&(event.occurred_at.0 as f64), Type::FLOAT8),
            ],
        )
        .await
        .map_err(PgError::at("insert outbox row"))?;
    Ok(row.get(0))
}

/// Inserts the event and deletes it again in the caller's transaction (Debezium's
/// remove-after-insert): the WAL relay reads the insert from the log, and the table never grows.
/// Only the WAL relay sees such events.
pub async fn enqueue_deleted<C: GenericClient>(
    client: &C,
    topic: &str,
    event: &Envelope,
) -> Result<i64, PgError> {
    let id = enqueue(client, topic, event).await?;
    client
        .execute("DELETE FROM outbox WHERE id = $1", &[&id])
        .await
        .map_err(PgError::at("delete outbox row after insert"))?;
    Ok(id)
}

/// Writes the event to the WAL only, with `pg_logical_emit_message(true, 'exactly', …)`, in the
/// caller's transaction: no table at all. Only the WAL relay sees such events.
pub async fn emit_event<C: GenericClient>(client: &C, topic: &str, event: &Envelope) -> Result<(), PgError> {
    client
        .execute(
            "SELECT pg_logical_emit_message(true, $1, $2::text)",
            &[
                &exactly_core::wal::MESSAGE_PREFIX,
                &exactly_core::wal::encode_message_event(topic, event),
            ],
        )
        .await
        .map_err(PgError::at("emit outbox message"))?;
    Ok(())
}

/// The relay's handle on a PostgreSQL outbox.
///
/// The query connection is reopened on the next call after it closed (a server restart), and the
/// LISTEN connection by its own task, so a relay outlives a PostgreSQL restart: calls fail with a
/// retryable [`StoreError`] meanwhile, and the relay backs off. Claimed rows stay leased, so a
/// settle lost to the restart only means they are published again when the lease expires.
pub struct PgOutbox {
    url: String,
    client: Mutex<Client>,
    /// Settles on its own connection, so a relay can settle one batch while claiming the next.
    settle_client: Mutex<Client>,
    wake: Arc<Notify>,
    listener: tokio::task::JoinHandle<()>,
    // Keeps the session-level leader lock of sequence mode alive: it is released when this
    // connection closes, including when the process is killed.
    leader: Option<Client>,
    /// The claim's column list, for this outbox's payload type.
    columns: String,
}

impl Drop for PgOutbox {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

/// Serializes claims (held for one claim transaction). With claims in a row, a relay never
/// sees another's uncommitted lease, which the per-aggregate ordering rule depends on.
const CLAIM_LOCK: i64 = 7_384_615_001;
/// Held for a whole session by the one relay allowed to publish sequence keys.
const SEQUENCE_LEADER_LOCK: i64 = 7_384_615_002;

/// The claimed columns. A timestamp of `infinity` has no Unix milliseconds (the cast would fail
/// the whole claim, and every relay after it): it reads as NULL, and the row is DEAD. A JSON or
/// text payload column is read as its UTF-8 bytes.
fn claimed_columns(payload: PayloadType) -> String {
    let payload = payload_bytes_sql(payload);
    format!(
        "o.id, o.event_id::text, o.event_type, o.aggregate_type, o.aggregate_id, o.topic, {payload},
        o.headers::text,
        CASE WHEN isfinite(COALESCE(o.occurred_at, o.created_at))
             THEN (extract(epoch from COALESCE(o.occurred_at, o.created_at)) * 1000)::bigint END,
        o.retry_count, o.sequence"
    )
}

/// `o.payload` as bytes, whatever its type.
pub(crate) fn payload_bytes_sql(payload: PayloadType) -> &'static str {
    match payload {
        PayloadType::Bytea => "o.payload",
        PayloadType::Jsonb | PayloadType::Text => "convert_to(o.payload::text, 'UTF8')",
    }
}

/// The type of `outbox.payload`: `bytea` as the migration creates it, or `jsonb`, `json`,
/// `text`, `varchar` where a team altered it.
pub async fn payload_type(client: &Client) -> Result<PayloadType, PgError> {
    let name: String = client
        .query_one(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute
             WHERE attrelid = 'outbox'::regclass AND attname = 'payload' AND NOT attisdropped",
            &[],
        )
        .await
        .map_err(PgError::at("read the outbox payload type"))?
        .get(0);
    PayloadType::from_type_name(&name).ok_or_else(|| {
        PgError::Corrupt(format!(
            "outbox.payload is {name}; exactly reads bytea, jsonb, json, text or varchar"
        ))
    })
}

impl PgOutbox {
    /// Connects three times (claims and queries, settles, and LISTEN for the outbox trigger's
    /// NOTIFY) and migrates.
    pub async fn connect(url: &str) -> Result<Self, PgError> {
        let mut client = connect(url).await?;
        migrate(&mut client).await?;
        let columns = claimed_columns(payload_type(&client).await?);
        let settle_client = connect(url).await?;
        let wake = Arc::new(Notify::new());
        let listener = tokio::spawn(listen(url.to_owned(), wake.clone()));
        Ok(PgOutbox {
            url: url.to_owned(),
            client: Mutex::new(client),
            settle_client: Mutex::new(settle_client),
            wake,
            listener,
            leader: None,
            columns,
        })
    }

    /// Connects as the sequence-key leader: waits until this process holds the session
    /// advisory lock, so exactly one relay assigns and publishes sequences, in order.
    pub async fn connect_as_sequence_leader(url: &str, poll: Duration) -> Result<Self, PgError> {
        let mut outbox = PgOutbox::connect(url).await?;
        let leader = connect(url).await?;
        loop {
            let row = leader
                .query_one("SELECT pg_try_advisory_lock($1)", &[&SEQUENCE_LEADER_LOCK])
                .await
                .map_err(PgError::at("take leader lock"))?;
            if row.get::<_, bool>(0) {
                break;
            }
            tokio::time::sleep(poll).await;
        }
        outbox.leader = Some(leader);
        Ok(outbox)
    }

    /// The query connection, reopened first if it closed. In sequence mode the leader lock
    /// went with a closed leader connection: another relay may lead now, so this one stops.
    async fn client(&self) -> Result<tokio::sync::MutexGuard<'_, Client>, PgError> {
        self.connection(&self.client).await
    }

    /// The settle connection, on the same terms as [`Self::client`].
    async fn settle_client(&self) -> Result<tokio::sync::MutexGuard<'_, Client>, PgError> {
        self.connection(&self.settle_client).await
    }

    async fn connection<'a>(
        &self,
        which: &'a Mutex<Client>,
    ) -> Result<tokio::sync::MutexGuard<'a, Client>, PgError> {
        if self.leader.as_ref().is_some_and(Client::is_closed) {
            return Err(PgError::LeaderLost);
        }
        let mut client = which.lock().await;
        reconnect_if_closed(&self.url, &mut client).await?;
        Ok(client)
    }

    /// The source name for sequence keys: this cluster's system identifier and database.
    pub async fn sequence_source(&self) -> Result<String, PgError> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT (SELECT system_identifier::text FROM pg_control_system()), current_database()",
                &[],
            )
            .await
            .map_err(PgError::at("read system identifier"))?;
        Ok(format!(
            "pg-outbox:{}:{}",
            row.get::<_, String>(0),
            row.get::<_, String>(1)
        ))
    }
}

/// LISTENs on the outbox channel and wakes `wake` per notification, for as long as the outbox
/// lives: when the connection ends (a server restart) it wakes the relay once (rows may have
/// committed meanwhile, unannounced) and connects again with a backoff.
async fn listen(url: String, wake: Arc<Notify>) {
    let mut failures = 0u32;
    loop {
        match listen_once(&url, &wake).await {
            Ok(()) => failures = 0,
            Err(e) => {
                failures += 1;
                tracing::warn!("outbox LISTEN connection failed (polling meanwhile, reconnecting): {e}");
            }
        }
        wake.notify_one();
        let backoff = Duration::from_millis(200 * u64::from(failures.clamp(1, 25)));
        tokio::time::sleep(backoff).await;
    }
}

/// One LISTEN session, until its connection ends.
async fn listen_once(url: &str, wake: &Arc<Notify>) -> Result<(), PgError> {
    let (client, mut connection) = crate::db::PgTarget::parse(url)?.connect_raw().await?;
    let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
    let wake_on_notify = wake.clone();
    // Polling the stream also drives the connection, so it must run before LISTEN is awaited.
    let driver = tokio::spawn(async move {
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(_)) => wake_on_notify.notify_one(),
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!("outbox LISTEN connection ended: {e}");
                    break;
                }
            }
        }
    });
    let listened = client
        .batch_execute(&format!("LISTEN {NOTIFY_CHANNEL}"))
        .await
        .map_err(PgError::at("LISTEN for outbox inserts"));
    if listened.is_ok() {
        // The client stays alive (held here) until the connection ends.
        let _ = driver.await;
    } else {
        driver.abort();
    }
    drop(client);
    listened
}

fn raw_row(row: &Row) -> RawRow {
    let occurred_at: Option<i64> = row.get(8);
    RawRow {
        id: row.get(0),
        event_id: row.get(1),
        event_type: row.get(2),
        aggregate_type: row.get(3),
        aggregate_id: row.get(4),
        topic: row.get(5),
        payload: row.get(6),
        headers_json: row.get(7),
        occurred_at: UnixMillis(occurred_at.unwrap_or(0)),
        retry_count: row.get::<_, i32>(9).max(0) as u32,
        sequence: row.get::<_, Option<i64>>(10).map(|s| s as u128),
        unreadable: occurred_at
            .is_none()
            .then(|| "occurred_at is not a finite timestamp (infinity)".to_owned()),
    }
}

impl OutboxStore for PgOutbox {
    async fn claim(&self, request: &ClaimRequest) -> Result<Vec<Claimed>, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(PgError::at("begin claim"))?;
        let now = request.now.0 as f64;
        let until = request.now.plus_ms(request.lease_ms).0 as f64;
        let limit = request.max_rows as i64;
        let columns = &self.columns;
        let rows = match request.keys {
            KeyMode::EventId => {
                tx.execute("SELECT pg_advisory_xact_lock($1)", &[&CLAIM_LOCK])
                    .await
                    .map_err(PgError::at("take claim lock"))?;
                // An aggregate with a row that is not ready (backing off, or leased by another
                // relay) waits whole, so its rows go out in id order. This relay's own leased
                // rows do not hold their aggregates: it claims the next batch while one is in
                // flight, and its producer keeps their order. The held set is hashed once
                // (NOT IN over a subquery), not probed per candidate row: a probe per row made a
                // claim over many held aggregates quadratic (21 s at 200k rows).
                let sql = format!(
                    "WITH picked AS (
                        SELECT o.id FROM outbox o
                        WHERE o.status IN ('NEW', 'SENDING') AND o.next_retry_at <= to_timestamp($1::float8 / 1000)
                          AND (coalesce(o.aggregate_type, ''), coalesce(o.aggregate_id, '')) NOT IN (
                              SELECT coalesce(aggregate_type, ''), coalesce(aggregate_id, '') FROM outbox
                              WHERE status IN ('NEW', 'SENDING') AND next_retry_at > to_timestamp($1::float8 / 1000)
                                AND NOT (status = 'SENDING' AND lease_owner IS NOT DISTINCT FROM $4))
                        ORDER BY o.id LIMIT $2
                        FOR UPDATE SKIP LOCKED)
                     UPDATE outbox o SET status = 'SENDING', next_retry_at = to_timestamp($3::float8 / 1000), lease_owner = $4
                     FROM picked WHERE o.id = picked.id
                     RETURNING {columns}"
                );
                tx.query(&sql, &[&now, &limit, &until, &request.owner])
                    .await
                    .map_err(PgError::at("claim rows"))?
            }
            KeyMode::Sequence { .. } => {
                // Only the leader gets here (see connect_as_sequence_leader). It resumes at the
                // lowest unsent sequence every time, so a failed row is resent before anything
                // after it: the rewind the watermark needs. New rows get sequences in id order.
                tx.execute(
                    "UPDATE outbox o SET sequence = s.seq
                     FROM (SELECT id, nextval('outbox_sequence') AS seq
                           FROM (SELECT id FROM outbox WHERE status IN ('NEW', 'SENDING') AND sequence IS NULL
                                 ORDER BY id LIMIT $1) ordered) s
                     WHERE o.id = s.id",
                    &[&limit],
                )
                .await
                .map_err(PgError::at("assign sequences"))?;
                let sql = format!(
                    "WITH picked AS (
                        SELECT id FROM outbox WHERE status IN ('NEW', 'SENDING') AND sequence IS NOT NULL
                        ORDER BY sequence LIMIT $1)
                     UPDATE outbox o SET status = 'SENDING', next_retry_at = to_timestamp($2::float8 / 1000), lease_owner = $3
                     FROM picked WHERE o.id = picked.id
                     RETURNING {columns}"
                );
                tx.query(&sql, &[&limit, &until, &request.owner])
                    .await
                    .map_err(PgError::at("claim rows by sequence"))?
            }
        };
        tx.commit().await.map_err(PgError::at("commit claim"))?;
        let mut raw: Vec<RawRow> = rows.iter().map(raw_row).collect();
        match request.keys {
            KeyMode::EventId => raw.sort_by_key(|r| r.id),
            KeyMode::Sequence { .. } => raw.sort_by_key(|r| r.sequence),
        }
        Ok(raw
            .into_iter()
            .map(|row| Claimed::from_raw(row, &request.keys, request.max_payload_bytes))
            .collect())
    }

    async fn settle(
        &self,
        owner: &str,
        settlements: &[Settlement],
        now: UnixMillis,
    ) -> Result<(), StoreError> {
        let sent: Vec<i64> = settlements
            .iter()
            .filter(|s| s.state.status == OutboxStatus::Sent)
            .map(|s| s.id)
            .collect();
        let mut client = self.settle_client().await?;
        let tx = client.transaction().await.map_err(PgError::at("begin settle"))?;
        if !sent.is_empty() {
            tx.execute(
                "UPDATE outbox SET status = 'SENT', sent_at = to_timestamp($2::float8 / 1000), last_error = NULL
                 WHERE id = ANY($1) AND status IN ('NEW', 'SENDING')",
                &[&sent, &(now.0 as f64)],
            )
            .await
            .map_err(PgError::at("mark sent"))?;
        }
        let others: Vec<&Settlement> = settlements
            .iter()
            .filter(|s| s.state.status != OutboxStatus::Sent)
            .collect();
        if !others.is_empty() {
            let ids: Vec<i64> = others.iter().map(|s| s.id).collect();
            let statuses: Vec<&str> = others.iter().map(|s| s.state.status.as_str()).collect();
            let retries: Vec<i32> = others.iter().map(|s| s.state.retry_count as i32).collect();
            let next_ms: Vec<f64> = others.iter().map(|s| s.state.next_retry_at.0 as f64).collect();
            let errors: Vec<Option<&str>> = others.iter().map(|s| s.last_error.as_deref()).collect();
            tx.execute(
                "UPDATE outbox o SET status = s.status, retry_count = s.retry_count,
                        next_retry_at = to_timestamp(s.next_ms / 1000), last_error = s.last_error
                 FROM unnest($1::bigint[], $2::text[], $3::int[], $4::float8[], $5::text[])
                      AS s(id, status, retry_count, next_ms, last_error)
                 WHERE o.id = s.id AND o.status = 'SENDING' AND o.lease_owner = $6",
                &[&ids, &statuses, &retries, &next_ms, &errors, &owner],
            )
            .await
            .map_err(PgError::at("mark failed"))?;
        }
        tx.commit().await.map_err(PgError::at("commit settle"))?;
        Ok(())
    }

    async fn stats(&self, now: UnixMillis) -> Result<OutboxStats, StoreError> {
        let client = self.client().await?;
        Ok(outbox_stats(&*client, now).await?)
    }

    async fn wait_for_rows(&self, max_wait: Duration) {
        let _ = tokio::time::timeout(max_wait, self.wake.notified()).await;
    }
}

/// Rows by status and the age of the oldest NEW row.
pub async fn outbox_stats<C: GenericClient>(client: &C, now: UnixMillis) -> Result<OutboxStats, PgError> {
    let rows = client
        .query(
            "SELECT status, COUNT(*),
                    (extract(epoch from MIN(created_at)) * 1000)::bigint
             FROM outbox GROUP BY status",
            &[],
        )
        .await
        .map_err(PgError::at("count outbox rows"))?;
    let mut stats = OutboxStats::default();
    for row in rows {
        let count = row.get::<_, i64>(1) as u64;
        match row.get::<_, &str>(0) {
            "NEW" => {
                stats.new = count;
                let oldest: Option<i64> = row.get(2);
                stats.oldest_new_age_ms = oldest.map_or(0, |t| now.millis_since(UnixMillis(t)));
            }
            "SENDING" => stats.sending = count,
            "SENT" => stats.sent = count,
            _ => stats.dead = count,
        }
    }
    Ok(stats)
}
