//! Handler builders for the two handler kinds of the outbox design, on PostgreSQL (the rules
//! are in [`exactly_core::recipes`]):
//!
//! - [`LatestState`]: one row per aggregate with the newest event's JSON payload; an older or
//!   repeated event changes nothing.
//! - [`Aggregate`]: one total per aggregate, moved by an integer field of each payload, never
//!   below zero (park or clamp).
//!
//! Both lock the aggregate's row for the transaction, so consumers of several partitions (or
//! several members of a group) serialize on it.

use exactly_core::recipes::{apply_delta, delta_of, newer, quoted_identifier, BelowZero};
use exactly_core::sql_template::json_text;
use exactly_core::{HandlerError, Inbound};
use futures::future::BoxFuture;
use tokio_postgres::Transaction;

use crate::effects::PgHandler;
use crate::sql_handler::handler_error;

/// A table or column name that is not a plain identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a plain identifier (letters, digits, _ and $, not starting with a digit)")]
pub struct BadIdentifier(pub String);

fn quote(name: &str) -> Result<String, BadIdentifier> {
    quoted_identifier(name).ok_or_else(|| BadIdentifier(name.to_owned()))
}

/// State sync: `table (key TEXT PRIMARY KEY, state JSONB, time BIGINT)`, the newest wins.
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
            "CREATE TABLE IF NOT EXISTS {} ({} TEXT PRIMARY KEY, {} JSONB NOT NULL, {} BIGINT NOT NULL)",
            self.table, self.key, self.state, self.time
        )
    }
}

impl PgHandler for LatestState {
    fn handle<'a>(
        &'a self,
        tx: &'a Transaction<'a>,
        inbound: &'a Inbound<'a>,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            let e = &inbound.delivery.envelope;
            let state = json_text(&e.payload).map_err(HandlerError::Rejected)?;
            let (t, k, s, at) = (&self.table, &self.key, &self.state, &self.time);
            let stored: Option<i64> = tx
                .query_opt(
                    &format!("SELECT {at} FROM {t} WHERE {k} = $1 FOR UPDATE"),
                    &[&e.aggregate_id],
                )
                .await
                .map_err(handler_error)?
                .map(|row| row.get(0));
            if !newer(stored, e.occurred_at.0) {
                return Ok(());
            }
            // The WHERE keeps the rule when two appliers create the row at once.
            tx.execute(
                &format!(
                    "INSERT INTO {t} ({k}, {s}, {at}) VALUES ($1, $2::text::jsonb, $3)
                     ON CONFLICT ({k}) DO UPDATE SET {s} = excluded.{s}, {at} = excluded.{at}
                     WHERE {t}.{at} < excluded.{at}"
                ),
                &[&e.aggregate_id, &state, &e.occurred_at.0],
            )
            .await
            .map_err(handler_error)?;
            Ok(())
        })
    }
}

/// Aggregation: `table (key TEXT PRIMARY KEY, total BIGINT)`, moved by the integer `field` of
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
            "CREATE TABLE IF NOT EXISTS {} ({} TEXT PRIMARY KEY, {} BIGINT NOT NULL)",
            self.table, self.key, self.total
        )
    }
}

impl PgHandler for Aggregate {
    fn handle<'a>(
        &'a self,
        tx: &'a Transaction<'a>,
        inbound: &'a Inbound<'a>,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            let e = &inbound.delivery.envelope;
            let delta = delta_of(&e.payload, &self.field).map_err(HandlerError::Rejected)?;
            let (t, k, total) = (&self.table, &self.key, &self.total);
            tx.execute(
                &format!("INSERT INTO {t} ({k}, {total}) VALUES ($1, 0) ON CONFLICT ({k}) DO NOTHING"),
                &[&e.aggregate_id],
            )
            .await
            .map_err(handler_error)?;
            let current: i64 = tx
                .query_one(
                    &format!("SELECT {total} FROM {t} WHERE {k} = $1 FOR UPDATE"),
                    &[&e.aggregate_id],
                )
                .await
                .map_err(handler_error)?
                .get(0);
            let next = apply_delta(current, delta, self.below_zero)
                .map_err(|why| HandlerError::Rejected(format!("{}: {why}", e.aggregate_id)))?;
            tx.execute(
                &format!("UPDATE {t} SET {total} = $2 WHERE {k} = $1"),
                &[&e.aggregate_id, &next],
            )
            .await
            .map_err(handler_error)?;
            Ok(())
        })
    }
}
