//! Handler builders for the two handler kinds of the outbox design, on SQLite (the rules are
//! in [`exactly_core::recipes`]): [`LatestState`] keeps the newest event's JSON payload per
//! aggregate, [`Aggregate`] moves a total by an integer field of each payload, never below
//! zero. The consumer's transaction is `BEGIN IMMEDIATE`, so the read and the write of an
//! aggregate are never interleaved with another writer's.

use exactly_core::recipes::{apply_delta, delta_of, newer, quoted_identifier, BelowZero};
use exactly_core::sql_template::json_text;
use exactly_core::{HandlerError, Inbound};
use rusqlite::{params, OptionalExtension, Transaction};

use crate::effects::SqliteHandler;
use crate::sql_handler::handler_error;

/// A table or column name that is not a plain identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a plain identifier (letters, digits, _ and $, not starting with a digit)")]
pub struct BadIdentifier(pub String);

fn quote(name: &str) -> Result<String, BadIdentifier> {
    quoted_identifier(name).ok_or_else(|| BadIdentifier(name.to_owned()))
}

/// State sync: `table (key TEXT PRIMARY KEY, state TEXT, time INTEGER)`, the newest wins.
#[derive(Debug, Clone)]
pub struct LatestState {
    table: String,
    key: String,
    state: String,
    time: String,
}

impl LatestState {
    /// Into `table`, columns `id`, `state`, `updated_at_ms`.
    pub fn new(table: &str) -> Result<LatestState, BadIdentifier> {
        LatestState::with_columns(table, "id", "state", "updated_at_ms")
    }

    /// Into `table` with these column names.
    pub fn with_columns(
        table: &str,
        key: &str,
        state: &str,
        time: &str,
    ) -> Result<LatestState, BadIdentifier> {
        Ok(LatestState {
            table: quote(table)?,
            key: quote(key)?,
            state: quote(state)?,
            time: quote(time)?,
        })
    }

    /// The table, when the application has none.
    pub fn create_table_sql(&self) -> String {
        format!(
            "CREATE TABLE IF NOT EXISTS {} ({} TEXT PRIMARY KEY, {} TEXT NOT NULL, {} INTEGER NOT NULL)",
            self.table, self.key, self.state, self.time
        )
    }
}

impl SqliteHandler for LatestState {
    fn handle(&self, tx: &Transaction<'_>, inbound: &Inbound<'_>) -> Result<(), HandlerError> {
        let e = &inbound.delivery.envelope;
        let state = json_text(&e.payload).map_err(HandlerError::Rejected)?;
        let (t, k, s, at) = (&self.table, &self.key, &self.state, &self.time);
        let stored: Option<i64> = tx
            .query_row(
                &format!("SELECT {at} FROM {t} WHERE {k} = ?1"),
                params![e.aggregate_id],
                |r| r.get(0),
            )
            .optional()
            .map_err(handler_error)?;
        if !newer(stored, e.occurred_at.0) {
            return Ok(());
        }
        tx.execute(
            &format!(
                "INSERT INTO {t} ({k}, {s}, {at}) VALUES (?1, ?2, ?3)
                 ON CONFLICT ({k}) DO UPDATE SET {s} = excluded.{s}, {at} = excluded.{at}"
            ),
            params![e.aggregate_id, state, e.occurred_at.0],
        )
        .map_err(handler_error)?;
        Ok(())
    }
}

/// Aggregation: `table (key TEXT PRIMARY KEY, total INTEGER)`, moved by the integer `field` of
/// each payload, never below zero.
#[derive(Debug, Clone)]
pub struct Aggregate {
    table: String,
    key: String,
    total: String,
    field: String,
    below_zero: BelowZero,
}

impl Aggregate {
    /// Into `table`, columns `id` and `total`, by the payload's `field`, parking what would go
    /// below zero.
    pub fn new(table: &str, field: &str) -> Result<Aggregate, BadIdentifier> {
        Aggregate::with_columns(table, "id", "total", field)
    }

    /// Into `table` with these column names.
    pub fn with_columns(
        table: &str,
        key: &str,
        total: &str,
        field: &str,
    ) -> Result<Aggregate, BadIdentifier> {
        Ok(Aggregate {
            table: quote(table)?,
            key: quote(key)?,
            total: quote(total)?,
            field: field.to_owned(),
            below_zero: BelowZero::Park,
        })
    }

    /// What to do with a delta that would go below zero.
    pub fn below_zero(mut self, below_zero: BelowZero) -> Aggregate {
        self.below_zero = below_zero;
        self
    }

    /// The table, when the application has none.
    pub fn create_table_sql(&self) -> String {
        format!(
            "CREATE TABLE IF NOT EXISTS {} ({} TEXT PRIMARY KEY, {} INTEGER NOT NULL)",
            self.table, self.key, self.total
        )
    }
}

impl SqliteHandler for Aggregate {
    fn handle(&self, tx: &Transaction<'_>, inbound: &Inbound<'_>) -> Result<(), HandlerError> {
        let e = &inbound.delivery.envelope;
        let delta = delta_of(&e.payload, &self.field).map_err(HandlerError::Rejected)?;
        let (t, k, total) = (&self.table, &self.key, &self.total);
        let current: i64 = tx
            .query_row(
                &format!("SELECT {total} FROM {t} WHERE {k} = ?1"),
                params![e.aggregate_id],
                |r| r.get(0),
            )
            .optional()
            .map_err(handler_error)?
            .unwrap_or(0);
        let next = apply_delta(current, delta, self.below_zero)
            .map_err(|why| HandlerError::Rejected(format!("{}: {why}", e.aggregate_id)))?;
        tx.execute(
            &format!("INSERT INTO {t} ({k}, {total}) VALUES (?1, ?2) ON CONFLICT ({k}) DO UPDATE SET {total} = excluded.{total}"),
            params![e.aggregate_id, next],
        )
        .map_err(handler_error)?;
        Ok(())
    }
}
