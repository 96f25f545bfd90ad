//! Stream processing of exactly: the local state store of windowed counts.
//!
//! [`StateStore`] keeps, in one embedded redb file, the counts per (window start, key), the
//! idempotency keys already counted per window (so input duplicates do not inflate counts), the
//! input offsets the state reflects and the stream time. Every [`Batch`] commits in one local
//! transaction, and every change has a changelog form ([`Change::to_changelog`]) so the same
//! batch can be written to a compacted changelog topic inside the Kafka transaction and restored
//! from it with [`exactly_core::changelog::Restore`].

mod store;

pub use store::{Batch, Change, StateStore, StoreError};
