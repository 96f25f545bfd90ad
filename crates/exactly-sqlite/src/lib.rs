//! SQLite adapter of exactly, the embedded default.
//!
//! - [`enqueue`] writes an outbox row inside the caller's own transaction.
//! - [`SqliteOutbox`] is the relay's [`exactly_core::OutboxStore`]: claims under `BEGIN IMMEDIATE`
//!   (SQLite's one writer makes claims by several relays serialize), settles after acks.
//! - [`SqliteEffects`] is a consumer's [`exactly_core::EffectStore`]: the dedupe record and the
//!   [`SqliteHandler`]'s writes commit in one transaction; parked messages keep their bytes.
//! - [`recipes`]: handler builders for state sync ([`recipes::LatestState`]) and aggregation
//!   ([`recipes::Aggregate`]).
//! - [`SqlHandler`] is a [`SqliteHandler`] made of the user's SQL statements with the envelope
//!   as named parameters (`exactly consume --handler sql`).
//!
//! Tables: `outbox`, `exactly_processed` (key set), `exactly_watermarks`, `exactly_parked`
//! (see [`migrations`]).

mod db;
mod effects;
mod error;
pub mod migrations;
pub mod operate;
mod outbox;
pub mod recipes;
mod sql_handler;

pub use db::{open, open_existing, open_existing_writable};
pub use effects::{SqliteEffects, SqliteHandler};
pub use error::SqliteError;
pub use outbox::{enqueue, outbox_stats, SqliteOutbox};
pub use sql_handler::{handler_error, SqlHandler, SqlHandlerError};
