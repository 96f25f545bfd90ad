//! Operator tooling on PostgreSQL: dead outbox events (both relays) and parked messages.
//! Every filter is a bound parameter; nothing an operator types becomes SQL text.

use exactly_core::operate::{ConsumerState, DeadEvent, DeadKind, ParkedRow, Selection, SlotState};
use exactly_core::UnixMillis;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Row};

use crate::error::PgError;

/// The filter clauses shared by every dead-row statement over `outbox o` (the polling relay's
/// DEAD rows that the WAL relay did not record) and their parameters, from `$1`.
struct OutboxFilter {
    ids: Vec<i64>,
    topic: Option<String>,
    aggregate: Option<String>,
    reason: Option<String>,
    before: Option<f64>,
}

const OUTBOX_DEAD_WHERE: &str = "o.status = 'DEAD'
    AND NOT EXISTS (SELECT 1 FROM exactly_relay_dead d WHERE d.outbox_id = o.id)
    AND (cardinality($1::int8[]) = 0 OR o.id = ANY($1::int8[]))
    AND ($2::text IS NULL OR o.topic = $2::text)
    AND ($3::text IS NULL OR o.aggregate_id = $3::text)
    AND ($4::text IS NULL OR coalesce(o.last_error, '') LIKE $4::text)
    AND ($5::float8 IS NULL OR o.created_at < to_timestamp($5::float8 / 1000))";

const WAL_DEAD_WHERE: &str = "(cardinality($1::text[]) = 0 OR d.key_text = ANY($1::text[]))
    AND ($2::text IS NULL OR o.topic = $2::text)
    AND ($3::text IS NULL OR o.aggregate_id = $3::text)
    AND ($4::text IS NULL OR d.reason LIKE $4::text)
    AND ($5::float8 IS NULL OR d.dead_at < to_timestamp($5::float8 / 1000))";

impl OutboxFilter {
    fn new(selection: &Selection, numeric_ids: Vec<i64>) -> Self {
        OutboxFilter {
            ids: numeric_ids,
            topic: selection.topic.clone(),
            aggregate: selection.aggregate.clone(),
            reason: selection.reason_pattern(),
            before: selection.before.map(|t| t.0 as f64),
        }
    }

    fn params<'a>(&'a self, ids: &'a (dyn ToSql + Sync)) -> [&'a (dyn ToSql + Sync); 5] {
        [ids, &self.topic, &self.aggregate, &self.reason, &self.before]
    }
}

/// Which kinds a selection can reach: outbox row ids are numbers, WAL dead events are keyed by
/// their event key; an id of the other form belongs to the other kind.
fn split_ids(selection: &Selection) -> (Vec<i64>, Vec<String>) {
    let mut numbers = Vec::new();
    let mut keys = Vec::new();
    for id in &selection.ids {
        match id.parse::<i64>() {
            Ok(n) => numbers.push(n),
            Err(_) => keys.push(id.clone()),
        }
    }
    (numbers, keys)
}

/// Whether the selection names ids, and none of this kind: then this kind has no rows to give.
fn none_of_kind<T>(selection: &Selection, of_kind: &[T]) -> bool {
    !selection.ids.is_empty() && of_kind.is_empty()
}

async fn has_wal_dead_table(client: &Client) -> Result<bool, PgError> {
    let row = client
        .query_one("SELECT to_regclass('exactly_relay_dead') IS NOT NULL", &[])
        .await
        .map_err(PgError::at("look for exactly_relay_dead"))?;
    Ok(row.get(0))
}

fn millis(row: &Row, index: usize) -> UnixMillis {
    UnixMillis(row.get::<_, f64>(index) as i64)
}

/// Dead events of both relays, oldest first.
pub async fn dead_events(client: &Client, selection: &Selection) -> Result<Vec<DeadEvent>, PgError> {
    let (numbers, keys) = split_ids(selection);
    let mut events = Vec::new();
    let wal_table = has_wal_dead_table(client).await?;
    if !none_of_kind(selection, &numbers) {
        let filter = OutboxFilter::new(selection, numbers);
        let outbox_where = if wal_table {
            OUTBOX_DEAD_WHERE.to_owned()
        } else {
            OUTBOX_DEAD_WHERE.replace(
                "AND NOT EXISTS (SELECT 1 FROM exactly_relay_dead d WHERE d.outbox_id = o.id)",
                "",
            )
        };
        let payload = crate::outbox::payload_bytes_sql(crate::outbox::payload_type(client).await?);
        let rows = client
            .query(
                &format!(
                    "SELECT o.id, o.topic, o.aggregate_id, coalesce(o.last_error, ''),
                            extract(epoch FROM o.created_at)::float8 * 1000,
                            {payload}
                     FROM outbox o WHERE {outbox_where} ORDER BY o.id"
                ),
                &filter.params(&filter.ids),
            )
            .await
            .map_err(PgError::at("list dead outbox rows"))?;
        events.extend(rows.iter().map(|r| DeadEvent {
            id: r.get::<_, i64>(0).to_string(),
            kind: DeadKind::Outbox,
            outbox_id: r.get(0),
            topic: r.get(1),
            aggregate: r.get(2),
            reason: r.get(3),
            at: millis(r, 4),
            body: String::from_utf8_lossy(&r.get::<_, Option<Vec<u8>>>(5).unwrap_or_default()).into_owned(),
        }));
    }
    if wal_table && !none_of_kind(selection, &keys) {
        let filter = OutboxFilter::new(selection, Vec::new());
        let rows = client
            .query(
                &format!(
                    "SELECT d.key_text, d.outbox_id, o.topic, o.aggregate_id, d.reason,
                            extract(epoch FROM d.dead_at)::float8 * 1000, d.raw
                     FROM exactly_relay_dead d LEFT JOIN outbox o ON o.id = d.outbox_id
                     WHERE {WAL_DEAD_WHERE} ORDER BY d.dead_at, d.key_text"
                ),
                &filter.params(&keys),
            )
            .await
            .map_err(PgError::at("list dead WAL events"))?;
        events.extend(rows.iter().map(|r| DeadEvent {
            id: r.get(0),
            kind: DeadKind::Wal,
            outbox_id: r.get(1),
            topic: r.get(2),
            aggregate: r.get(3),
            reason: r.get(4),
            at: millis(r, 5),
            body: r.get(6),
        }));
    }
    Ok(events)
}

/// What a requeue did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Requeued {
    /// Rows put back to NEW (polling relay) or copied to a new outbox row (WAL relay).
    pub requeued: u64,
    /// WAL dead events left as they were, with why: their outbox row is gone or was never
    /// readable, so there is nothing to send again.
    pub left: Vec<(String, String)>,
}

/// Sends the selected dead events again, in one transaction.
///
/// - A DEAD outbox row goes back to NEW with its retries and its sequence cleared: a sequence
///   key assigned before would now be below what consumers have seen, so it gets a new one.
/// - A WAL relay's dead event is sent again as a copy of its outbox row (fixed in place first,
///   if its content was the cause): a new insert is a new WAL position, so its key is above
///   everything already published, and the dead record goes.
pub async fn requeue_dead(client: &mut Client, selection: &Selection) -> Result<Requeued, PgError> {
    let (numbers, keys) = split_ids(selection);
    let wal_table = has_wal_dead_table(client).await?;
    let tx = client.transaction().await.map_err(PgError::at("begin requeue"))?;
    let mut done = Requeued::default();
    if !none_of_kind(selection, &numbers) {
        let filter = OutboxFilter::new(selection, numbers);
        let outbox_where = if wal_table {
            OUTBOX_DEAD_WHERE.to_owned()
        } else {
            OUTBOX_DEAD_WHERE.replace(
                "AND NOT EXISTS (SELECT 1 FROM exactly_relay_dead d WHERE d.outbox_id = o.id)",
                "",
            )
        };
        done.requeued += tx
            .execute(
                &format!(
                    "UPDATE outbox o SET status = 'NEW', retry_count = 0, next_retry_at = clock_timestamp(),
                            lease_owner = NULL, sequence = NULL, last_error = NULL
                     WHERE {outbox_where}"
                ),
                &filter.params(&filter.ids),
            )
            .await
            .map_err(PgError::at("requeue dead outbox rows"))?;
    }
    if wal_table && !none_of_kind(selection, &keys) {
        let filter = OutboxFilter::new(selection, Vec::new());
        let rows = tx
            .query(
                &format!(
                    "SELECT d.key_text, d.outbox_id, o.id IS NOT NULL
                     FROM exactly_relay_dead d LEFT JOIN outbox o ON o.id = d.outbox_id
                     WHERE {WAL_DEAD_WHERE} ORDER BY d.outbox_id FOR UPDATE OF d"
                ),
                &filter.params(&keys),
            )
            .await
            .map_err(PgError::at("select dead WAL events"))?;
        for row in rows {
            let (key, outbox_id, has_row): (String, i64, bool) = (row.get(0), row.get(1), row.get(2));
            if !has_row {
                done.left.push((
                    key,
                    "its outbox row is gone or was never readable: insert a corrected row, then discard this"
                        .into(),
                ));
                continue;
            }
            // The same event (same event id) as a new row: a new insert is a new WAL position.
            // The old row goes in the same statement, so no DEAD row is left for a polling
            // relay or a second requeue.
            tx.execute(
                "WITH gone AS (DELETE FROM outbox WHERE id = $1
                     RETURNING event_id, event_type, aggregate_type, aggregate_id, topic, payload, headers, occurred_at)
                 INSERT INTO outbox (event_id, event_type, aggregate_type, aggregate_id, topic, payload, headers, occurred_at)
                 SELECT event_id, event_type, aggregate_type, aggregate_id, topic, payload, headers, occurred_at FROM gone",
                &[&outbox_id],
            )
            .await
            .map_err(PgError::at("insert the dead event again"))?;
            tx.execute("DELETE FROM exactly_relay_dead WHERE key_text = $1", &[&key])
                .await
                .map_err(PgError::at("remove requeued dead event"))?;
            done.requeued += 1;
        }
    }
    tx.commit().await.map_err(PgError::at("commit requeue"))?;
    Ok(done)
}

/// Deletes the selected dead events (outbox rows and WAL dead records) in one transaction;
/// returns how many.
pub async fn discard_dead(client: &mut Client, selection: &Selection) -> Result<u64, PgError> {
    let (numbers, keys) = split_ids(selection);
    let wal_table = has_wal_dead_table(client).await?;
    let tx = client.transaction().await.map_err(PgError::at("begin discard"))?;
    let mut discarded = 0;
    if !none_of_kind(selection, &numbers) {
        let filter = OutboxFilter::new(selection, numbers);
        let outbox_where = if wal_table {
            OUTBOX_DEAD_WHERE.to_owned()
        } else {
            OUTBOX_DEAD_WHERE.replace(
                "AND NOT EXISTS (SELECT 1 FROM exactly_relay_dead d WHERE d.outbox_id = o.id)",
                "",
            )
        };
        discarded += tx
            .execute(
                &format!("DELETE FROM outbox o WHERE {outbox_where}"),
                &filter.params(&filter.ids),
            )
            .await
            .map_err(PgError::at("discard dead outbox rows"))?;
    }
    if wal_table && !none_of_kind(selection, &keys) {
        let filter = OutboxFilter::new(selection, Vec::new());
        discarded += tx
            .execute(
                &format!(
                    "DELETE FROM exactly_relay_dead d WHERE d.key_text IN (
                         SELECT d.key_text FROM exactly_relay_dead d LEFT JOIN outbox o ON o.id = d.outbox_id
                         WHERE {WAL_DEAD_WHERE})"
                ),
                &filter.params(&keys),
            )
            .await
            .map_err(PgError::at("discard dead WAL events"))?;
    }
    tx.commit().await.map_err(PgError::at("commit discard"))?;
    Ok(discarded)
}

const PARKED_WHERE: &str = "p.consumer = $1::text
    AND (cardinality($2::int8[]) = 0 OR p.id = ANY($2::int8[]))
    AND ($3::text IS NULL OR p.topic = $3::text)
    AND ($4::text IS NULL OR p.key_text = $4::text)
    AND ($5::text IS NULL OR (p.reason || ': ' || p.detail) LIKE $5::text)
    AND ($6::float8 IS NULL OR p.parked_at < to_timestamp($6::float8 / 1000))";

pub(crate) const PARKED_COLUMNS: &str =
    "p.id, p.consumer, p.topic, p.partition, p.\"offset\", p.reason, p.detail,
    p.key_text, p.headers, p.payload, extract(epoch FROM p.parked_at)::float8 * 1000";

/// Parked messages of `consumer`, oldest first.
pub async fn parked(
    client: &Client,
    consumer: &str,
    selection: &Selection,
) -> Result<Vec<ParkedRow>, PgError> {
    let ids = selection.numeric_ids().map_err(PgError::Selection)?;
    let (reason, before) = (selection.reason_pattern(), selection.before.map(|t| t.0 as f64));
    let rows = client
        .query(
            &format!("SELECT {PARKED_COLUMNS} FROM exactly_parked p WHERE {PARKED_WHERE} ORDER BY p.id"),
            &[
                &consumer,
                &ids,
                &selection.topic,
                &selection.key,
                &reason,
                &before,
            ],
        )
        .await
        .map_err(PgError::at("list parked messages"))?;
    Ok(rows.iter().map(parked_row).collect())
}

pub(crate) fn parked_row(r: &Row) -> ParkedRow {
    ParkedRow {
        id: r.get(0),
        consumer: r.get(1),
        topic: r.get(2),
        partition: r.get(3),
        offset: r.get(4),
        reason: r.get(5),
        detail: r.get(6),
        key_text: r.get(7),
        headers_json: r.get(8),
        payload: r.get(9),
        parked_at: millis(r, 10),
    }
}

/// Deletes the selected parked messages of `consumer`; returns how many.
pub async fn discard_parked(client: &Client, consumer: &str, selection: &Selection) -> Result<u64, PgError> {
    let ids = selection.numeric_ids().map_err(PgError::Selection)?;
    let (reason, before) = (selection.reason_pattern(), selection.before.map(|t| t.0 as f64));
    client
        .execute(
            &format!("DELETE FROM exactly_parked p WHERE {PARKED_WHERE}"),
            &[
                &consumer,
                &ids,
                &selection.topic,
                &selection.key,
                &reason,
                &before,
            ],
        )
        .await
        .map_err(PgError::at("discard parked messages"))
}

/// Every consumer with rows here: key-set size, watermarks, parked messages by reason.
pub async fn consumer_states(client: &Client) -> Result<Vec<ConsumerState>, PgError> {
    let rows = client
        .query(
            "WITH names AS (SELECT consumer FROM exactly_processed UNION SELECT consumer FROM exactly_watermarks
                            UNION SELECT consumer FROM exactly_parked)
             SELECT n.consumer,
                    (SELECT count(*) FROM exactly_processed p WHERE p.consumer = n.consumer),
                    (SELECT count(*) FROM exactly_watermarks w WHERE w.consumer = n.consumer)
             FROM names n ORDER BY n.consumer",
            &[],
        )
        .await
        .map_err(PgError::at("read consumer states"))?;
    let mut states: Vec<ConsumerState> = rows
        .iter()
        .map(|r| ConsumerState {
            consumer: r.get(0),
            keys: r.get::<_, i64>(1).max(0) as u64,
            watermarks: r.get::<_, i64>(2).max(0) as u64,
            parked: Default::default(),
        })
        .collect();
    let parked = client
        .query(
            "SELECT consumer, reason, count(*) FROM exactly_parked GROUP BY consumer, reason",
            &[],
        )
        .await
        .map_err(PgError::at("count parked messages"))?;
    for r in &parked {
        let consumer: &str = r.get(0);
        if let Some(state) = states.iter_mut().find(|s| s.consumer == consumer) {
            state.parked.insert(r.get(1), r.get::<_, i64>(2).max(0) as u64);
        }
    }
    Ok(states)
}

/// The logical replication slots of this database.
pub async fn slot_states(client: &Client) -> Result<Vec<SlotState>, PgError> {
    let rows = client
        .query(
            "SELECT s.slot_name::text, s.active, s.confirmed_flush_lsn::text,
                    coalesce((pg_current_wal_lsn() - s.confirmed_flush_lsn)::bigint, 0),
                    (SELECT extract(epoch FROM r.flush_lag)::float8 FROM pg_stat_replication r WHERE r.pid = s.active_pid),
                    coalesce((pg_current_wal_lsn() - s.restart_lsn)::bigint, 0),
                    s.wal_status::text
             FROM pg_replication_slots s
             WHERE s.slot_type = 'logical' AND s.database = current_database()
             ORDER BY s.slot_name",
            &[],
        )
        .await
        .map_err(PgError::at("read replication slots"))?;
    Ok(rows
        .iter()
        .map(|r| SlotState {
            slot: r.get(0),
            active: r.get(1),
            confirmed: r.get(2),
            lag_bytes: r.get(3),
            lag_seconds: r.get(4),
            retained_bytes: r.get(5),
            wal_status: r.get(6),
        })
        .collect())
}
