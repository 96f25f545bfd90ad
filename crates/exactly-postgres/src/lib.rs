//! PostgreSQL adapter of exactly.
//!
//! - [`enqueue`] writes an outbox row inside the caller's own transaction (or see
//!   [`migrations`] for the plain-SQL insert any language can use).
//! - [`PgOutbox`] is the relay's [`exactly_core::OutboxStore`]: claims with
//!   `FOR UPDATE SKIP LOCKED`, wakes on the outbox trigger's NOTIFY, settles after acks; in
//!   sequence-key mode one leader (session advisory lock) assigns sequences at claim time.
//! - [`PgChangeFeed`] is the WAL relay's [`exactly_core::ChangeFeed`]: a pgoutput slot over the
//!   outbox table and `pg_logical_emit_message` events, with heartbeat and SENT sweeper.
//! - [`PgEffects`] is a consumer's [`exactly_core::EffectStore`]: the dedupe record and the
//!   [`PgHandler`]'s writes commit in one transaction; parked messages keep their bytes.
//! - [`DebeziumTable`] mirrors a Debezium-style outbox table into exactly's (a trigger), routed
//!   as the Outbox Event Router routes it.
//! - [`recipes`]: handler builders for state sync ([`recipes::LatestState`]) and aggregation
//!   ([`recipes::Aggregate`]).
//! - [`SqlHandler`] is a [`PgHandler`] made of the user's SQL statements with the envelope as
//!   named parameters (`exactly consume --handler sql`).

pub mod counts;
mod db;
mod debezium;
mod effects;
mod error;
pub mod migrations;
pub mod operate;
mod outbox;
pub mod recipes;
mod sql_handler;
pub mod upsert;
pub mod wal;

pub use db::{connect, redact_url, PgTarget, ReconnectingClient, SslMode};
pub use debezium::{DebeziumError, DebeziumTable, MIRROR_TRIGGER};
pub use effects::{PgEffects, PgHandler};
pub use error::PgError;
pub use outbox::{emit_event, enqueue, enqueue_deleted, outbox_stats, payload_type, PgOutbox};
pub use sql_handler::{handler_error, SqlHandler, SqlHandlerError};
pub use wal::{PgChangeFeed, WalConfig};
