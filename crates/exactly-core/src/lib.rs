//! The pure rules of exactly: no sockets, no clocks, no files.
//!
//! - [`IdempotencyKey`]: the four key kinds (UUIDv4, UUIDv7, ULID, 128-bit sequence) and their
//!   persisted text form.
//! - [`Envelope`] and [`decode_record`]: an event and its strict header encoding.
//! - [`dedupe`]: [`Watermark`], [`KeySet`] and the [`DedupePolicy`] that routes a key to one.
//! - [`outbox`]: the row state machine NEW → SENDING → SENT | DEAD and its [`RetryPolicy`].
//! - [`wal`]: change-stream rows and messages, and the in-order ack tracker of the WAL relay.
//! - [`changelog`]: state-store restore that applies only committed changes, even where aborted
//!   records are visible.
//! - [`offset_gap`]: reading a gap in a partition's offsets twice, so a broker that served past
//!   records it had not stored yet cannot make a consumer step over them.
//! - [`task_order`]: which record a task reading several partitions (a join) takes next: the
//!   earliest-stamped, waiting for a partition that is behind.
//! - [`window`]: tumbling windows with grace and retention, and hot-key salting.
//! - [`windowing`]: the stream DSL's window kinds (tumbling, hopping, session) and when each closes.
//! - [`aggregate`]: the aggregations of config-file stream jobs (count, sum, min, max, distinct).
//! - [`check`]: the end-to-end checker of `exactly verify` (lost, duplicate, unseen,
//!   non-monotonic, aborted read).
//! - [`ports`]: the traits database adapters implement for relays and consumers.
//! - [`debezium`]: the Outbox Event Router's routing and header placement, translated for PostgreSQL.
//! - [`recipes`]: the rules of the two handler kinds (newest state wins; aggregates never below zero).
//! - [`sql_template`]: the statements of a SQL handler and their named envelope parameters.
//!
//! Time is always an argument ([`UnixMillis`]), so every rule is reproducible in tests.
//!
//! ```
//! use exactly_core::{IdempotencyKey, Verdict, Watermark};
//!
//! let mut watermark = Watermark::default();
//! assert_eq!(watermark.observe(exactly_core::lsn_sequence(0x100, 0)), Verdict::New);
//! assert_eq!(watermark.observe(exactly_core::lsn_sequence(0x100, 1)), Verdict::New);
//! // A redelivery after a relay rewind is recognised with one number of state.
//! assert_eq!(watermark.observe(exactly_core::lsn_sequence(0x100, 0)), Verdict::Duplicate);
//!
//! let key: IdempotencyKey = "seq:00000000000001000000000000000001:pg:demo".parse().unwrap();
//! assert_eq!(key.to_string(), "seq:00000000000001000000000000000001:pg:demo");
//! ```

pub mod aggregate;
pub mod changelog;
pub mod check;
pub mod debezium;
pub mod dedupe;
pub mod envelope;
pub mod key;
pub mod offset_gap;
pub mod operate;
pub mod outbox;
pub mod ports;
pub mod recipes;
pub mod record;
pub mod sql_template;
pub mod task_order;
pub mod time;
pub mod upsert;
pub mod wal;
pub mod window;
pub mod windowing;

pub use dedupe::{DedupePolicy, DedupeRoute, EpochWatermark, KeySet, SequenceVerdict, Verdict, Watermark};
pub use envelope::{
    decode_keyed_by_header, decode_record, header, source_header, Delivery, Envelope, HeaderError,
};
pub use key::{lsn_sequence, IdempotencyKey, KeyKind, KeyParseError};
pub use offset_gap::{GapVerdict, OffsetGapCheck};
pub use outbox::{OutboxEvent, OutboxStatus, RetryPolicy, RowState};
pub use ports::{
    after_handler_error, AfterError, ApplyOutcome, BatchOutcome, ChangeFeed, ClaimRequest, Claimed,
    DeadEvent, EffectStore, FeedItem, HandlerError, Inbound, OutboxStats, OutboxStore, ParkReason,
    ParkedMessage, Settlement, StoreError, StoreErrorKind,
};
pub use record::{KeyMode, OutboxRecord, RawRow, RowDefect};
pub use time::UnixMillis;
