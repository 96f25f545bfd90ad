//! The handlers `exactly consume` runs, and the consumer's store built with one of them (shared
//! by `exactly consume` and `exactly parked replay`, so a replay applies exactly as the
//! consumer would).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use exactly_core::operate::ReplayOutcome;
use exactly_core::{Delivery, HandlerError, Inbound};
use exactly_postgres::{PgEffects, PgHandler};
use exactly_sqlite::{SqliteEffects, SqliteHandler};
use futures::future::BoxFuture;

use crate::backend::StoryHandler;
use crate::commands::Database;
use crate::story::StoryConsumer;

/// The handler names `exactly consume --handler` takes.
pub const HANDLERS: &[&str] = &["record", "sql", "story-coupons", "story-likes", "story-products"];

/// Which handler, with what it needs.
#[derive(Debug, Clone)]
pub enum HandlerChoice {
    /// A row per event in `exactly_consumed`.
    Record(RecordHandler),
    /// The statements of a SQL file.
    Sql(PathBuf),
    /// One of the demo's consumers.
    Story(StoryConsumer),
}

impl HandlerChoice {
    /// The handler named `name`, refusing settings it does not read.
    pub fn new(name: &str, event_types: &[String], sql_file: Option<&Path>) -> Result<HandlerChoice> {
        if name != "record" && !event_types.is_empty() {
            bail!("event_types is read by the record handler only (the handler is {name:?})");
        }
        if name != "sql" && sql_file.is_some() {
            bail!("sql_file is read by the sql handler only (the handler is {name:?})");
        }
        Ok(match name {
            "record" => HandlerChoice::Record(RecordHandler {
                event_types: event_types.to_vec(),
            }),
            "sql" => HandlerChoice::Sql(
                sql_file
                    .context("the sql handler needs a file of statements: --sql-file (sql_file in a file)")?
                    .to_owned(),
            ),
            other => HandlerChoice::Story(
                other
                    .strip_prefix("story-")
                    .and_then(StoryConsumer::parse)
                    .with_context(|| {
                        format!("unknown handler {other:?}: use one of {}", HANDLERS.join(", "))
                    })?,
            ),
        })
    }

    /// The name of the consumer's rows in the effect database: the group's, except for the
    /// demo's consumers, which keep their own.
    fn consumer_name<'a>(&self, group: &'a str) -> &'a str {
        match self {
            HandlerChoice::Story(story) => story.name(),
            _ => group,
        }
    }

    fn sql(path: &Path) -> Result<String> {
        std::fs::read_to_string(path).with_context(|| format!("cannot read the SQL file {}", path.display()))
    }
}

/// A consumer's store with the handler it was configured with (one per process: the size
/// difference of the variants does not matter).
#[allow(clippy::large_enum_variant)]
pub enum ConsumerStore {
    Postgres(PgEffects<PgAny>),
    Sqlite(SqliteEffects<SqliteAny>),
}

/// How a store is opened: by a consumer (creates what is missing) or by an operator's command
/// (the database must exist).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opening {
    Consumer,
    Operator,
}

impl ConsumerStore {
    /// Opens `database` for consumer `group` with `choice`; a SQL file is checked against the
    /// database first (every statement prepared), so a mistake stops it before it reads.
    pub async fn open(
        database: &Database,
        group: &str,
        choice: &HandlerChoice,
        opening: Opening,
    ) -> Result<ConsumerStore> {
        let consumer = choice.consumer_name(group);
        Ok(match database {
            Database::Sqlite(path) => {
                let conn = match opening {
                    Opening::Consumer => exactly_sqlite::open(path)?,
                    Opening::Operator => exactly_sqlite::open_existing_writable(path)?,
                };
                let handler = match choice {
                    HandlerChoice::Record(record) => {
                        conn.execute_batch(RECORD_SCHEMA_SQLITE)?;
                        SqliteAny::Record(record.clone())
                    }
                    HandlerChoice::Story(story) => {
                        conn.execute_batch(crate::story::CONSUMER_SCHEMA)?;
                        SqliteAny::Story(StoryHandler(*story))
                    }
                    HandlerChoice::Sql(file) => SqliteAny::Sql(
                        exactly_sqlite::SqlHandler::prepare(&conn, &HandlerChoice::sql(file)?)
                            .with_context(|| format!("the SQL file {}", file.display()))?,
                    ),
                };
                ConsumerStore::Sqlite(SqliteEffects::open(path, consumer, handler)?)
            }
            Database::Postgres(url) => {
                let client = exactly_postgres::connect(url).await?;
                let handler = match choice {
                    HandlerChoice::Record(record) => {
                        client.batch_execute(RECORD_SCHEMA_PG).await?;
                        PgAny::Record(record.clone())
                    }
                    HandlerChoice::Story(story) => {
                        client.batch_execute(crate::story::CONSUMER_SCHEMA).await?;
                        PgAny::Story(StoryHandler(*story))
                    }
                    HandlerChoice::Sql(file) => PgAny::Sql(
                        exactly_postgres::SqlHandler::prepare(&client, &HandlerChoice::sql(file)?)
                            .await
                            .with_context(|| format!("the SQL file {}", file.display()))?,
                    ),
                };
                ConsumerStore::Postgres(PgEffects::connect(url, consumer, handler).await?)
            }
        })
    }

    /// Applies parked message `id` through the handler (see `replay_parked`).
    pub async fn replay(&self, id: i64) -> Result<ReplayOutcome> {
        Ok(match self {
            ConsumerStore::Postgres(store) => store.replay_parked(id).await?,
            ConsumerStore::Sqlite(store) => store.replay_parked(id).await?,
        })
    }
}

/// Every handler `exactly consume` has, on PostgreSQL.
pub enum PgAny {
    Record(RecordHandler),
    Story(StoryHandler),
    Sql(exactly_postgres::SqlHandler),
}

impl PgHandler for PgAny {
    fn handle<'a>(
        &'a self,
        tx: &'a tokio_postgres::Transaction<'a>,
        inbound: &'a Inbound<'a>,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        match self {
            PgAny::Record(h) => PgHandler::handle(h, tx, inbound),
            PgAny::Story(h) => PgHandler::handle(h, tx, inbound),
            PgAny::Sql(h) => PgHandler::handle(h, tx, inbound),
        }
    }

    fn handle_batch<'a>(
        &'a self,
        tx: &'a tokio_postgres::Transaction<'a>,
        batch: &'a [Inbound<'a>],
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        match self {
            PgAny::Record(h) => h.handle_batch(tx, batch),
            PgAny::Story(h) => h.handle_batch(tx, batch),
            PgAny::Sql(h) => h.handle_batch(tx, batch),
        }
    }
}

/// Every handler `exactly consume` has, on SQLite.
pub enum SqliteAny {
    Record(RecordHandler),
    Story(StoryHandler),
    Sql(exactly_sqlite::SqlHandler),
}

impl SqliteHandler for SqliteAny {
    fn handle(&self, tx: &rusqlite::Transaction<'_>, inbound: &Inbound<'_>) -> Result<(), HandlerError> {
        match self {
            SqliteAny::Record(h) => SqliteHandler::handle(h, tx, inbound),
            SqliteAny::Story(h) => SqliteHandler::handle(h, tx, inbound),
            SqliteAny::Sql(h) => SqliteHandler::handle(h, tx, inbound),
        }
    }
}

/// The built-in handler of `exactly consume --handler record`: one row per event in
/// `exactly_consumed` (no unique key, so an event applied twice shows as two rows; applied_seq
/// is the order of application). The payload must be JSON, and with `event_types` set the event
/// type one of them; anything else is parked with the reason.
#[derive(Debug, Clone, Default)]
pub struct RecordHandler {
    pub event_types: Vec<String>,
}

pub const RECORD_SCHEMA_SQLITE: &str = "CREATE TABLE IF NOT EXISTS exactly_consumed (
    applied_seq INTEGER PRIMARY KEY, consumer TEXT NOT NULL, event_id TEXT NOT NULL, event_type TEXT NOT NULL,
    aggregate_id TEXT NOT NULL, occurred_at BIGINT NOT NULL, payload TEXT NOT NULL)";

pub const RECORD_SCHEMA_PG: &str = "CREATE TABLE IF NOT EXISTS exactly_consumed (
    applied_seq BIGSERIAL PRIMARY KEY, consumer TEXT NOT NULL, event_id TEXT NOT NULL, event_type TEXT NOT NULL,
    aggregate_id TEXT NOT NULL, occurred_at BIGINT NOT NULL, payload TEXT NOT NULL)";

impl RecordHandler {
    fn check(&self, delivery: &Delivery) -> Result<String, HandlerError> {
        let event_type = &delivery.envelope.event_type;
        if !self.event_types.is_empty() && !self.event_types.iter().any(|t| t == event_type) {
            return Err(HandlerError::Rejected(format!(
                "unknown event type {event_type:?}"
            )));
        }
        decode_json(delivery)
    }
}

fn decode_json(delivery: &Delivery) -> Result<String, HandlerError> {
    let text = std::str::from_utf8(&delivery.envelope.payload)
        .map_err(|e| HandlerError::Rejected(format!("payload is not UTF-8: {e}")))?;
    serde_json::from_str::<serde_json::Value>(text)
        .map_err(|e| HandlerError::Rejected(format!("payload is not JSON: {e}")))?;
    Ok(text.to_owned())
}

const RECORD_INSERT: &str =
    "INSERT INTO exactly_consumed (consumer, event_id, event_type, aggregate_id, occurred_at, payload)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6)";

impl SqliteHandler for RecordHandler {
    fn handle(&self, tx: &rusqlite::Transaction<'_>, inbound: &Inbound<'_>) -> Result<(), HandlerError> {
        let d = inbound.delivery;
        let payload = self.check(d)?;
        let e = &d.envelope;
        tx.execute(
            RECORD_INSERT,
            rusqlite::params![
                "record",
                e.event_id.hyphenated().to_string(),
                e.event_type,
                e.aggregate_id,
                e.occurred_at.0,
                payload
            ],
        )
        .map_err(|e| HandlerError::Retryable(e.to_string()))?;
        Ok(())
    }
}

impl PgHandler for RecordHandler {
    fn handle<'a>(
        &'a self,
        tx: &'a tokio_postgres::Transaction<'a>,
        inbound: &'a Inbound<'a>,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            let d = inbound.delivery;
            let payload = self.check(d)?;
            let e = &d.envelope;
            tx.execute(
                &crate::story::pg_placeholders(RECORD_INSERT),
                &[
                    &"record",
                    &e.event_id.hyphenated().to_string(),
                    &e.event_type,
                    &e.aggregate_id,
                    &e.occurred_at.0,
                    &payload,
                ],
            )
            .await
            .map_err(|e| HandlerError::Retryable(e.to_string()))?;
            Ok(())
        })
    }

    /// Every event of a batch with one multi-row INSERT, in order.
    fn handle_batch<'a>(
        &'a self,
        tx: &'a tokio_postgres::Transaction<'a>,
        batch: &'a [Inbound<'a>],
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            let n = batch.len();
            let (mut event_ids, mut types, mut aggregates) = (
                Vec::with_capacity(n),
                Vec::with_capacity(n),
                Vec::with_capacity(n),
            );
            let (mut times, mut payloads) = (Vec::with_capacity(n), Vec::with_capacity(n));
            for inbound in batch {
                let d = inbound.delivery;
                payloads.push(self.check(d)?);
                let e = &d.envelope;
                event_ids.push(e.event_id.hyphenated().to_string());
                types.push(e.event_type.as_str());
                aggregates.push(e.aggregate_id.as_str());
                times.push(e.occurred_at.0);
            }
            tx.execute(
                "INSERT INTO exactly_consumed (consumer, event_id, event_type, aggregate_id, occurred_at, payload)
                 SELECT 'record', event_id, event_type, aggregate_id, occurred_at, payload
                 FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::text[]) WITH ORDINALITY
                      AS b(event_id, event_type, aggregate_id, occurred_at, payload, ordinal)
                 ORDER BY ordinal",
                &[&event_ids, &types, &aggregates, &times, &payloads],
            )
            .await
            .map_err(|e| HandlerError::Retryable(e.to_string()))?;
            Ok(())
        })
    }
}
