//! Stream processing of exactly: the local state store of windowed counts.
//!
//! [`StateStore`] keeps, in one embedded redb file, the counts per (window start, key), the
//! idempotency keys already counted per window (so input duplicates do not inflate counts), the
//! input offsets the state reflects and the stream time. Every [`Batch`] commits in one local
//! transaction, and every change has a changelog form ([`Change::to_changelog`]) so the same
//! batch can be written to a compacted changelog topic inside the Kafka transaction and restored
//! from it, a slice at a time outside the rebalance, by the [`Restorer`]
//! ([`exactly_core::changelog::StreamingRestore`]).
//!
//! [`WindowedCount`] is one task's counting: tumbling windows on event time, late records
//! dropped and counted, inputs already counted in their window skipped, and the open
//! transaction held in an overlay that an abort simply drops.

pub mod changelog;
pub mod dsl;
mod ordered;
mod processor;
mod restore;
mod store;
mod store_writer;
mod task;
mod topology_task;

pub use ordered::MAX_TASK_IDLE;
pub use processor::{
    probe_restore_mode, GroupBy, Guarantee, Processor, ProcessorError, StreamConfig, StreamCounters,
    DEAD_ORIGIN_HEADER, DEAD_REASON_HEADER,
};
pub use restore::{rebuild_store, RestoreStats, Restorer};
pub use store::{Batch, Change, StateStore, StoreError};
pub use task::{Counted, Input, WindowedCount, DEFAULT_MAX_EVENT_TIME_SKEW_MS};
pub use topology_task::TopologyTask;
