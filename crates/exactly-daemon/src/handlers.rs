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

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};

use crate::database::Database;

/// A handler of your own, for `exactly consume --handler NAME` and `handler = "NAME"` in a
/// file: register it with [`register_handler`] before the settings are read. It runs in the
/// consumer's transaction on either database, like the built-in ones.
pub trait CustomHandler: PgHandler + SqliteHandler + std::fmt::Debug {
    /// The name the consumer's rows carry in the effect database; `None`: the group's.
    fn consumer_name(&self) -> Option<&str> {
        None
    }

    /// Statements creating what it writes (`CREATE TABLE IF NOT EXISTS …`), run when a
    /// consumer opens its database; the same text must suit both databases.
    fn schema(&self) -> &str {
        ""
    }
}

fn registry() -> &'static Mutex<BTreeMap<String, Arc<dyn CustomHandler>>> {
    static HANDLERS: OnceLock<Mutex<BTreeMap<String, Arc<dyn CustomHandler>>>> = OnceLock::new();
    HANDLERS.get_or_init(Default::default)
}

/// Makes `handler` available under `name` (a later registration of the name replaces it).
/// `record` and `sql` are built in and cannot be replaced.
pub fn register_handler(name: &str, handler: Arc<dyn CustomHandler>) {
    if let Ok(mut handlers) = registry().lock() {
        handlers.insert(name.to_owned(), handler);
    }
}

/// Every handler name `--handler` takes: the built-in ones, then the registered ones.
pub fn handler_names() -> Vec<String> {
    let mut names = vec!["record".to_owned(), "sql".to_owned()];
    if let Ok(handlers) = registry().lock() {
        names.extend(handlers.keys().cloned());
    }
    names
}

/// Which handler, with what it needs.
#[derive(Debug, Clone)]
pub enum HandlerChoice {
    /// A row per event in `exactly_consumed`.
    Record(RecordHandler),
    /// The statements of a SQL file.
    Sql(PathBuf),
    /// A handler registered with [`register_handler`].
    Custom(Arc<dyn CustomHandler>),
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
            other => {
                let registered = registry().lock().ok().and_then(|h| h.get(other).cloned());
                HandlerChoice::Custom(registered.with_context(|| {
                    format!(
                        "unknown handler {other:?}: use one of {}",
                        handler_names().join(", ")
                    )
                })?)
            }
        })
    }

    /// The name of the consumer's rows in the effect database: the group's, unless a custom
    /// handler names its own.
    fn consumer_name<'a>(&'a self, group: &'a str) -> &'a str {
        match self {
            HandlerChoice::Custom(custom) => custom.consumer_name().unwrap_or(group),
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
    /// On PostgreSQL.
    Postgres(PgEffects<PgAny>),
    /// On SQLite.
    Sqlite(SqliteEffects<SqliteAny>),
}

/// How a store is opened: by a consumer (creates what is missing) or by an operator's command
/// (the database must exist).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opening {
    /// A consumer: creates and migrates what is missing.
    Consumer,
    /// An operator's command: the database must exist, nothing is created.
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
                    HandlerChoice::Custom(custom) => {
                        conn.execute_batch(custom.schema())?;
                        SqliteAny::Custom(custom.clone())
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
                    HandlerChoice::Custom(custom) => {
                        client.batch_execute(custom.schema()).await?;
                        PgAny::Custom(custom.clone())
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
    /// `record`.
    Record(RecordHandler),
    /// A registered handler.
    Custom(Arc<dyn CustomHandler>),
    /// `sql`.
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
            PgAny::Custom(h) => PgHandler::handle(&**h, tx, inbound),
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
            PgAny::Custom(h) => h.handle_batch(tx, batch),
            PgAny::Sql(h) => h.handle_batch(tx, batch),
        }
    }
}

/// Every handler `exactly consume` has, on SQLite.
pub enum SqliteAny {
    /// `record`.
    Record(RecordHandler),
    /// A registered handler.
    Custom(Arc<dyn CustomHandler>),
    /// `sql`.
    Sql(exactly_sqlite::SqlHandler),
}

impl SqliteHandler for SqliteAny {
    fn handle(&self, tx: &rusqlite::Transaction<'_>, inbound: &Inbound<'_>) -> Result<(), HandlerError> {
        match self {
            SqliteAny::Record(h) => SqliteHandler::handle(h, tx, inbound),
            SqliteAny::Custom(h) => SqliteHandler::handle(&**h, tx, inbound),
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
    /// The event types it accepts (empty: any); others are parked as rejected.
    pub event_types: Vec<String>,
}

/// `exactly_consumed` on SQLite.
pub const RECORD_SCHEMA_SQLITE: &str = "CREATE TABLE IF NOT EXISTS exactly_consumed (
    applied_seq INTEGER PRIMARY KEY, consumer TEXT NOT NULL, event_id TEXT NOT NULL, event_type TEXT NOT NULL,
    aggregate_id TEXT NOT NULL, occurred_at BIGINT NOT NULL, payload TEXT NOT NULL)";

/// `exactly_consumed` on PostgreSQL.
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

const RECORD_INSERT_PG: &str =
    "INSERT INTO exactly_consumed (consumer, event_id, event_type, aggregate_id, occurred_at, payload)
     VALUES ($1, $2, $3, $4, $5, $6)";

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
                RECORD_INSERT_PG,
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
