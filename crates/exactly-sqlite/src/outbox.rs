//! The outbox on SQLite: enqueue in the caller's transaction; claim and settle for a relay.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use exactly_core::record::headers_to_json;
use exactly_core::{
    ClaimRequest, Claimed, Envelope, KeyMode, OutboxStats, OutboxStatus, OutboxStore, RawRow, Settlement,
    StoreError, UnixMillis,
};
use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::Notify;

use crate::db::{open, Shared};
use crate::error::SqliteError;

/// Inserts `event` for `topic` using the caller's connection, so it commits or rolls back with
/// the caller's transaction. Returns the row id.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = tempfile::tempdir()?;
/// let mut conn = exactly_sqlite::open(&dir.path().join("service.db"))?;
/// let tx = conn.transaction()?;
/// tx.execute_batch("CREATE TABLE coupons (code TEXT PRIMARY KEY, used INTEGER)")?;
/// let event = exactly_core::Envelope {
///     event_id: uuid::Uuid::now_v7(),
///     event_type: "CouponUsed".into(),
///     aggregate_type: "coupon".into(),
///     aggregate_id: "C-42".into(),
///     occurred_at: exactly_core::UnixMillis(1_700_000_000_000),
///     payload: br#"{"code":"C-42"}"#.to_vec(),
///     headers: vec![],
/// };
/// tx.execute("INSERT INTO coupons VALUES ('C-42', 1)", [])?;
/// exactly_sqlite::enqueue(&tx, "coupon-events", &event)?;
/// tx.commit()?; // both rows, or neither
/// # Ok(()) }
/// ```
pub fn enqueue(conn: &Connection, topic: &str, event: &Envelope) -> Result<i64, SqliteError> {
    conn.execute(
        "INSERT INTO outbox (event_id, event_type, aggregate_type, aggregate_id, topic, payload, headers, occurred_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![
            event.event_id.hyphenated().to_string(),
            event.event_type,
            event.aggregate_type,
            event.aggregate_id,
            topic,
            event.payload,
            (!event.headers.is_empty()).then(|| headers_to_json(&event.headers)),
            event.occurred_at.0,
        ],
    )
    .map_err(SqliteError::at("insert outbox row"))?;
    Ok(conn.last_insert_rowid())
}

/// The relay's handle on a SQLite outbox.
#[derive(Clone)]
pub struct SqliteOutbox {
    db: Shared,
    wake: Arc<Notify>,
}

impl SqliteOutbox {
    /// Opens (and migrates) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, SqliteError> {
        Ok(SqliteOutbox {
            db: Shared::new(open(path)?),
            wake: Arc::new(Notify::new()),
        })
    }

    /// SQLite has no cross-process notification; writers in the same process call
    /// `notify_one` on this after their commit to wake the relay at once instead of at its next poll.
    pub fn wake_handle(&self) -> Arc<Notify> {
        self.wake.clone()
    }
}

pub(crate) const CLAIM_SQL: &str = "
SELECT id, event_id, event_type, aggregate_type, aggregate_id, topic, payload, headers,
       COALESCE(occurred_at, created_at), retry_count, sequence
FROM outbox o
WHERE o.status IN ('NEW', 'SENDING') AND o.next_retry_at <= ?1
  AND (coalesce(o.aggregate_type, ''), coalesce(o.aggregate_id, '')) NOT IN (
      SELECT coalesce(aggregate_type, ''), coalesce(aggregate_id, '') FROM outbox
      WHERE status IN ('NEW', 'SENDING') AND next_retry_at > ?1
        AND NOT (status = 'SENDING' AND lease_owner IS ?3))
ORDER BY o.id
LIMIT ?2";

/// Reads a claimed row by the types its values really have. SQLite stores any value in any
/// column, so a writer can put a BLOB in `event_id` or bytes that are not UTF-8 in a TEXT
/// column; a strict read would fail the claim, and the relay would restart into the same row
/// forever. Such a row comes back with [`RawRow::unreadable`] set and ends DEAD with the reason.
/// A TEXT payload is taken as its bytes.
fn lenient_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawRow> {
    use rusqlite::types::ValueRef;
    let mut unreadable: Option<String> = None;
    let mut text = |i: usize, column: &str| -> Option<String> {
        let problem = match r.get_ref(i) {
            Ok(ValueRef::Null) => return None,
            Ok(ValueRef::Text(bytes)) => match std::str::from_utf8(bytes) {
                Ok(t) => return Some(t.to_owned()),
                Err(e) => format!("column {column} is not valid UTF-8 ({e})"),
            },
            Ok(ValueRef::Integer(n)) => return Some(n.to_string()),
            Ok(ValueRef::Real(x)) => return Some(x.to_string()),
            Ok(ValueRef::Blob(b)) => format!("column {column} holds a {}-byte BLOB, not TEXT", b.len()),
            Err(e) => format!("column {column}: {e}"),
        };
        unreadable.get_or_insert(problem);
        None
    };
    let event_id = text(1, "event_id");
    let event_type = text(2, "event_type");
    let aggregate_type = text(3, "aggregate_type");
    let aggregate_id = text(4, "aggregate_id");
    let topic = text(5, "topic");
    let headers_json = text(7, "headers");
    let payload = match r.get_ref(6)? {
        ValueRef::Null => None,
        ValueRef::Blob(b) | ValueRef::Text(b) => Some(b.to_vec()),
        ValueRef::Integer(_) | ValueRef::Real(_) => {
            unreadable.get_or_insert("column payload holds a number, not bytes".to_owned());
            None
        }
    };
    let occurred_at = match r.get_ref(8)? {
        ValueRef::Integer(ms) => ms,
        ValueRef::Real(ms) if ms.is_finite() && ms.abs() < 9.0e15 => ms as i64,
        other => {
            unreadable.get_or_insert(format!(
                "occurred_at holds {}, not Unix milliseconds",
                match other {
                    ValueRef::Text(_) => "TEXT",
                    ValueRef::Blob(_) => "a BLOB",
                    _ => "a number out of range",
                }
            ));
            0
        }
    };
    Ok(RawRow {
        id: r.get(0)?,
        event_id,
        event_type,
        aggregate_type,
        aggregate_id,
        topic,
        payload,
        headers_json,
        occurred_at: UnixMillis(occurred_at),
        retry_count: r
            .get::<_, i64>(9)
            .map(|n| n.clamp(0, i64::from(u32::MAX)) as u32)
            .unwrap_or(0),
        sequence: r.get::<_, Option<i64>>(10).ok().flatten().map(|s| s as u128),
        unreadable,
    })
}

fn claim_rows(conn: &mut Connection, request: &ClaimRequest) -> Result<Vec<Claimed>, SqliteError> {
    if let KeyMode::Sequence { .. } = request.keys {
        return Err(SqliteError::Runtime(
            "sequence keys need PostgreSQL (an advisory lock orders claims across relays); use event-id keys on SQLite".into(),
        ));
    }
    // IMMEDIATE takes the write lock up front: claims by several relays serialize, so no two
    // see the same NEW row.
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(SqliteError::at("begin claim"))?;
    let raw: Vec<RawRow> = {
        let mut stmt = tx
            .prepare_cached(CLAIM_SQL)
            .map_err(SqliteError::at("prepare claim"))?;
        let rows = stmt
            .query_map(
                params![request.now.0, request.max_rows as i64, request.owner],
                lenient_row,
            )
            .map_err(SqliteError::at("claim"))?;
        rows.collect::<Result<_, _>>()
            .map_err(SqliteError::at("read claimed row"))?
    };
    {
        let mut lease = tx
            .prepare_cached(
                "UPDATE outbox SET status = 'SENDING', next_retry_at = ?2, lease_owner = ?3 WHERE id = ?1",
            )
            .map_err(SqliteError::at("prepare lease"))?;
        let until = request.now.plus_ms(request.lease_ms).0;
        for row in &raw {
            lease
                .execute(params![row.id, until, request.owner])
                .map_err(SqliteError::at("lease row"))?;
        }
    }
    tx.commit().map_err(SqliteError::at("commit claim"))?;
    Ok(raw
        .into_iter()
        .map(|row| Claimed::from_raw(row, &request.keys, request.max_payload_bytes))
        .collect())
}

fn settle_rows(
    conn: &mut Connection,
    owner: &str,
    settlements: &[Settlement],
    now: UnixMillis,
) -> Result<(), SqliteError> {
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(SqliteError::at("begin settle"))?;
    {
        let mut sent = tx
            .prepare_cached(
                "UPDATE outbox SET status = 'SENT', sent_at = ?2, last_error = NULL
                 WHERE id = ?1 AND status IN ('NEW', 'SENDING')",
            )
            .map_err(SqliteError::at("prepare mark sent"))?;
        let mut other = tx
            .prepare_cached(
                "UPDATE outbox SET status = ?2, retry_count = ?3, next_retry_at = ?4, last_error = ?5
                 WHERE id = ?1 AND status = 'SENDING' AND lease_owner = ?6",
            )
            .map_err(SqliteError::at("prepare mark failed"))?;
        for s in settlements {
            if s.state.status == OutboxStatus::Sent {
                sent.execute(params![s.id, now.0])
                    .map_err(SqliteError::at("mark sent"))?;
            } else {
                other
                    .execute(params![
                        s.id,
                        s.state.status.as_str(),
                        s.state.retry_count,
                        s.state.next_retry_at.0,
                        s.last_error,
                        owner
                    ])
                    .map_err(SqliteError::at("mark failed"))?;
            }
        }
    }
    tx.commit().map_err(SqliteError::at("commit settle"))
}

/// Rows by status and the age of the oldest NEW row.
pub fn outbox_stats(conn: &Connection, now: UnixMillis) -> Result<OutboxStats, SqliteError> {
    let mut stats = OutboxStats::default();
    let mut stmt = conn
        .prepare_cached("SELECT status, COUNT(*) FROM outbox GROUP BY status")
        .map_err(SqliteError::at("prepare stats"))?;
    let rows = stmt
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
        .map_err(SqliteError::at("count rows"))?;
    for row in rows {
        let (status, count) = row.map_err(SqliteError::at("read count"))?;
        let slot = match status.as_str() {
            "NEW" => &mut stats.new,
            "SENDING" => &mut stats.sending,
            "SENT" => &mut stats.sent,
            _ => &mut stats.dead,
        };
        *slot = count as u64;
    }
    let oldest: Option<i64> = conn
        .query_row(
            "SELECT MIN(created_at) FROM outbox WHERE status = 'NEW'",
            [],
            |r| r.get(0),
        )
        .optional()
        .map_err(SqliteError::at("oldest new row"))?
        .flatten();
    stats.oldest_new_age_ms = oldest.map_or(0, |t| now.millis_since(UnixMillis(t)));
    Ok(stats)
}

impl OutboxStore for SqliteOutbox {
    async fn claim(&self, request: &ClaimRequest) -> Result<Vec<Claimed>, StoreError> {
        let request = request.clone();
        Ok(self.db.run(move |conn| claim_rows(conn, &request)).await?)
    }

    async fn settle(
        &self,
        owner: &str,
        settlements: &[Settlement],
        now: UnixMillis,
    ) -> Result<(), StoreError> {
        let (owner, settlements) = (owner.to_owned(), settlements.to_vec());
        Ok(self
            .db
            .run(move |conn| settle_rows(conn, &owner, &settlements, now))
            .await?)
    }

    async fn stats(&self, now: UnixMillis) -> Result<OutboxStats, StoreError> {
        Ok(self.db.run(move |conn| outbox_stats(conn, now)).await?)
    }

    async fn wait_for_rows(&self, max_wait: Duration) {
        let _ = tokio::time::timeout(max_wait, self.wake.notified()).await;
    }
}
