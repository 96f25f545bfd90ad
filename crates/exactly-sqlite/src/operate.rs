//! Operator tooling on SQLite: dead outbox rows and parked messages. Every filter is a bound
//! parameter; nothing an operator types becomes SQL text. (SQLite has no WAL relay, so no
//! `exactly_relay_dead`.)

use exactly_core::operate::{ConsumerState, DeadEvent, DeadKind, ParkedRow, Selection};
use exactly_core::UnixMillis;
use rusqlite::{params_from_iter, types::Value, Connection, Row};

use crate::error::SqliteError;

const OUTBOX_DEAD_WHERE: &str = "o.status = 'DEAD'
    AND (?1 IS NULL OR o.id IN (SELECT value FROM json_each(?1)))
    AND (?2 IS NULL OR o.topic = ?2)
    AND (?3 IS NULL OR o.aggregate_id = ?3)
    AND (?4 IS NULL OR coalesce(o.last_error, '') LIKE ?4 ESCAPE '\\')
    AND (?5 IS NULL OR o.created_at < ?5)";

const PARKED_WHERE: &str = "p.consumer = ?1
    AND (?2 IS NULL OR p.id IN (SELECT value FROM json_each(?2)))
    AND (?3 IS NULL OR p.topic = ?3)
    AND (?4 IS NULL OR p.key_text = ?4)
    AND (?5 IS NULL OR (p.reason || ': ' || p.detail) LIKE ?5 ESCAPE '\\')
    AND (?6 IS NULL OR p.parked_at < ?6)";

pub(crate) const PARKED_COLUMNS: &str =
    "p.id, p.consumer, p.topic, p.partition, p.\"offset\", p.reason, p.detail,
    p.key_text, p.headers, p.payload, p.parked_at";

/// The selected ids as a JSON list for `json_each` (NULL: no id filter).
fn ids_param(selection: &Selection) -> Result<Value, SqliteError> {
    if selection.ids.is_empty() {
        return Ok(Value::Null);
    }
    let ids = selection.numeric_ids().map_err(SqliteError::Runtime)?;
    let list: Vec<String> = ids.iter().map(i64::to_string).collect();
    Ok(Value::Text(format!("[{}]", list.join(","))))
}

fn text(value: &Option<String>) -> Value {
    value.clone().map_or(Value::Null, Value::Text)
}

fn outbox_params(selection: &Selection) -> Result<Vec<Value>, SqliteError> {
    Ok(vec![
        ids_param(selection)?,
        text(&selection.topic),
        text(&selection.aggregate),
        text(&selection.reason_pattern()),
        selection.before.map_or(Value::Null, |t| Value::Integer(t.0)),
    ])
}

fn parked_params(consumer: &str, selection: &Selection) -> Result<Vec<Value>, SqliteError> {
    Ok(vec![
        Value::Text(consumer.to_owned()),
        ids_param(selection)?,
        text(&selection.topic),
        text(&selection.key),
        text(&selection.reason_pattern()),
        selection.before.map_or(Value::Null, |t| Value::Integer(t.0)),
    ])
}

/// DEAD outbox rows, oldest first.
pub fn dead_events(conn: &Connection, selection: &Selection) -> Result<Vec<DeadEvent>, SqliteError> {
    let mut statement = conn
        .prepare(&format!(
            "SELECT o.id, o.topic, o.aggregate_id, coalesce(o.last_error, ''), o.created_at, o.payload
             FROM outbox o WHERE {OUTBOX_DEAD_WHERE} ORDER BY o.id"
        ))
        .map_err(SqliteError::at("list dead outbox rows"))?;
    let rows = statement
        .query_map(params_from_iter(outbox_params(selection)?), |r| {
            let id: i64 = r.get(0)?;
            Ok(DeadEvent {
                id: id.to_string(),
                kind: DeadKind::Outbox,
                outbox_id: id,
                topic: r.get(1)?,
                aggregate: r.get(2)?,
                reason: r.get(3)?,
                at: UnixMillis(r.get(4)?),
                body: String::from_utf8_lossy(&r.get::<_, Option<Vec<u8>>>(5)?.unwrap_or_default())
                    .into_owned(),
            })
        })
        .map_err(SqliteError::at("list dead outbox rows"))?;
    rows.collect::<Result<_, _>>()
        .map_err(SqliteError::at("read dead outbox rows"))
}

/// Puts the selected DEAD rows back to NEW, retries and sequence cleared (a sequence assigned
/// before would now be below what consumers have seen); returns how many.
pub fn requeue_dead(conn: &Connection, selection: &Selection) -> Result<u64, SqliteError> {
    conn.execute(
        &format!(
            "UPDATE outbox AS o SET status = 'NEW', retry_count = 0, next_retry_at = CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER),
                    lease_owner = NULL, sequence = NULL, last_error = NULL
             WHERE {OUTBOX_DEAD_WHERE}"
        ),
        params_from_iter(outbox_params(selection)?),
    )
    .map(|n| n as u64)
    .map_err(SqliteError::at("requeue dead outbox rows"))
}

/// Deletes the selected DEAD rows; returns how many.
pub fn discard_dead(conn: &Connection, selection: &Selection) -> Result<u64, SqliteError> {
    conn.execute(
        &format!("DELETE FROM outbox AS o WHERE {OUTBOX_DEAD_WHERE}"),
        params_from_iter(outbox_params(selection)?),
    )
    .map(|n| n as u64)
    .map_err(SqliteError::at("discard dead outbox rows"))
}

/// Parked messages of `consumer`, oldest first.
pub fn parked(
    conn: &Connection,
    consumer: &str,
    selection: &Selection,
) -> Result<Vec<ParkedRow>, SqliteError> {
    let mut statement = conn
        .prepare(&format!(
            "SELECT {PARKED_COLUMNS} FROM exactly_parked p WHERE {PARKED_WHERE} ORDER BY p.id"
        ))
        .map_err(SqliteError::at("list parked messages"))?;
    let rows = statement
        .query_map(params_from_iter(parked_params(consumer, selection)?), parked_row)
        .map_err(SqliteError::at("list parked messages"))?;
    rows.collect::<Result<_, _>>()
        .map_err(SqliteError::at("read parked messages"))
}

pub(crate) fn parked_row(r: &Row<'_>) -> rusqlite::Result<ParkedRow> {
    Ok(ParkedRow {
        id: r.get(0)?,
        consumer: r.get(1)?,
        topic: r.get(2)?,
        partition: r.get(3)?,
        offset: r.get(4)?,
        reason: r.get(5)?,
        detail: r.get(6)?,
        key_text: r.get(7)?,
        headers_json: r.get(8)?,
        payload: r.get(9)?,
        parked_at: UnixMillis(r.get(10)?),
    })
}

/// Deletes the selected parked messages of `consumer`; returns how many.
pub fn discard_parked(conn: &Connection, consumer: &str, selection: &Selection) -> Result<u64, SqliteError> {
    conn.execute(
        &format!("DELETE FROM exactly_parked AS p WHERE {PARKED_WHERE}"),
        params_from_iter(parked_params(consumer, selection)?),
    )
    .map(|n| n as u64)
    .map_err(SqliteError::at("discard parked messages"))
}

/// Every consumer with rows here: key-set size, watermarks, parked messages by reason.
pub fn consumer_states(conn: &Connection) -> Result<Vec<ConsumerState>, SqliteError> {
    let mut names = conn
        .prepare(
            "SELECT consumer FROM exactly_processed UNION SELECT consumer FROM exactly_watermarks
             UNION SELECT consumer FROM exactly_parked ORDER BY 1",
        )
        .map_err(SqliteError::at("list consumers"))?;
    let consumers: Vec<String> = names
        .query_map([], |r| r.get(0))
        .map_err(SqliteError::at("list consumers"))?
        .collect::<Result<_, _>>()
        .map_err(SqliteError::at("list consumers"))?;
    let count = |sql: &str, consumer: &str| -> Result<u64, SqliteError> {
        conn.query_row(sql, [consumer], |r| r.get::<_, i64>(0))
            .map(|n| n.max(0) as u64)
            .map_err(SqliteError::at("count consumer rows"))
    };
    let mut states = Vec::with_capacity(consumers.len());
    for consumer in consumers {
        let mut by_reason = conn
            .prepare("SELECT reason, count(*) FROM exactly_parked WHERE consumer = ?1 GROUP BY reason")
            .map_err(SqliteError::at("count parked"))?;
        let parked = by_reason
            .query_map([&consumer], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?.max(0) as u64))
            })
            .map_err(SqliteError::at("count parked"))?
            .collect::<Result<_, _>>()
            .map_err(SqliteError::at("count parked"))?;
        states.push(ConsumerState {
            keys: count(
                "SELECT count(*) FROM exactly_processed WHERE consumer = ?1",
                &consumer,
            )?,
            watermarks: count(
                "SELECT count(*) FROM exactly_watermarks WHERE consumer = ?1",
                &consumer,
            )?,
            consumer,
            parked,
        });
    }
    Ok(states)
}
