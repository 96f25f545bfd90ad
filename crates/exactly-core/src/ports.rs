//! What the relay and the consumer loop need from a database, as traits the adapters implement.
//!
//! Both traits acknowledge only after the database write is durable (committed): the relay marks
//! SENT after the broker's ack, and a consumer commits its Kafka offset only after `apply`
//! returned. That order is what makes a crash at any point a redelivery, never a loss.

use std::future::Future;
use std::time::Duration;

use crate::envelope::Delivery;
use crate::outbox::{RetryPolicy, RowState};
use crate::record::{KeyMode, OutboxRecord, RowDefect};
use crate::time::UnixMillis;

/// A database call failed. Adapters wrap their driver's error with what they were doing, and
/// say whether trying again can help ([`StoreErrorKind`]); relays and consumers decide on that.
///
/// Shown as `context: source`, or as the source alone when the context is empty (an adapter's
/// own error, which already names the store and what it was doing: `postgres: record keys: …`).
#[derive(Debug, thiserror::Error)]
#[error("{}{source}", context_prefix(.context))]
pub struct StoreError {
    /// What the store was doing (empty: the source says it).
    pub context: String,
    /// Retry or stop.
    pub kind: StoreErrorKind,
    /// The driver's error.
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

/// What a caller should do about a [`StoreError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreErrorKind {
    /// The database is unreachable or refused this once (a restart, a lost connection, a lock
    /// timeout): try again after a backoff; the store reconnects on its next call.
    Retry,
    /// Retrying cannot help (stored data this version cannot read, a leadership lost): stop,
    /// and let the operator or a supervisor decide.
    Stop,
}

fn context_prefix(context: &str) -> String {
    if context.is_empty() {
        String::new()
    } else {
        format!("{context}: ")
    }
}

impl StoreError {
    /// Wraps `source` with `context`; worth retrying.
    pub fn new(
        context: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        StoreError {
            context: context.into(),
            kind: StoreErrorKind::Retry,
            source: source.into(),
        }
    }

    /// Wraps `source` with `context`; retrying cannot help.
    pub fn stop(
        context: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        StoreError {
            kind: StoreErrorKind::Stop,
            ..StoreError::new(context, source)
        }
    }

    /// Whether trying again after a backoff can help.
    pub fn is_retryable(&self) -> bool {
        self.kind == StoreErrorKind::Retry
    }
}

/// What a relay asks for when it claims.
#[derive(Debug, Clone)]
pub struct ClaimRequest {
    /// Who claims; failure marks are fenced on it, so a relay that lost its lease cannot
    /// overwrite the next owner's state.
    pub owner: String,
    /// Batch size.
    pub max_rows: usize,
    /// Claim time.
    pub now: UnixMillis,
    /// Lease length.
    pub lease_ms: i64,
    /// How keys are derived.
    pub keys: KeyMode,
    /// Rows above this are DEAD at once.
    pub max_payload_bytes: usize,
}

/// One claimed row: publishable, or malformed with the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claimed {
    /// Ready to publish.
    Ready(OutboxRecord),
    /// Never publishable.
    Malformed {
        /// Row id.
        id: i64,
        /// Failures so far.
        retry_count: u32,
        /// Why.
        defect: RowDefect,
    },
}

impl Claimed {
    /// Validates a claimed raw row: publishable, or malformed with the reason.
    pub fn from_raw(row: crate::record::RawRow, keys: &KeyMode, max_payload_bytes: usize) -> Claimed {
        let (id, retry_count) = (row.id, row.retry_count);
        match row.into_record(keys, max_payload_bytes) {
            Ok(record) => Claimed::Ready(record),
            Err(defect) => Claimed::Malformed {
                id,
                retry_count,
                defect,
            },
        }
    }
}

/// A row's new state after a publish attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settlement {
    /// Row id.
    pub id: i64,
    /// State computed by [`RowState::apply`].
    pub state: RowState,
    /// Set for failures and DEAD rows.
    pub last_error: Option<String>,
}

/// Outbox rows by status, and the age of the oldest unsent one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutboxStats {
    /// NEW rows.
    pub new: u64,
    /// SENDING rows.
    pub sending: u64,
    /// SENT rows.
    pub sent: u64,
    /// DEAD rows.
    pub dead: u64,
    /// Age of the oldest NEW row, 0 if none.
    pub oldest_new_age_ms: i64,
}

/// The relay's side of an outbox table.
pub trait OutboxStore: Send + Sync {
    /// Takes up to `max_rows` claimable rows (NEW, or SENDING with an expired lease) in id order,
    /// marks them SENDING with a lease, and returns them. A row whose aggregate has an earlier row
    /// leased to another relay or waiting out a backoff is not claimed, so each aggregate's events
    /// leave in order.
    fn claim(&self, request: &ClaimRequest) -> impl Future<Output = Result<Vec<Claimed>, StoreError>> + Send;

    /// Writes settlements in one transaction. Failure settlements apply only while `owner` still
    /// holds the lease; SENT applies regardless (the record is on the topic either way).
    fn settle(
        &self,
        owner: &str,
        settlements: &[Settlement],
        now: UnixMillis,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Counts for metrics and `exactly status`.
    fn stats(&self, now: UnixMillis) -> impl Future<Output = Result<OutboxStats, StoreError>> + Send;

    /// Waits until a new row may be there (a database notification) or `max_wait` passed.
    fn wait_for_rows(&self, max_wait: Duration) -> impl Future<Output = ()> + Send;
}

/// A record as a consumer received it.
#[derive(Debug, Clone, Copy)]
pub struct Inbound<'a> {
    /// Topic.
    pub topic: &'a str,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// The decoded record.
    pub delivery: &'a Delivery,
    /// Receive time.
    pub now: UnixMillis,
}

/// What a handler says went wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandlerError {
    /// May work later (a lock timeout, a downstream outage): roll back and retry with backoff.
    #[error("retryable: {0}")]
    Retryable(String),
    /// Will never work (undecodable payload, unknown event type): park at once.
    #[error("rejected: {0}")]
    Rejected(String),
}

/// Result of one apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApplyOutcome {
    /// Key recorded and effect committed in one transaction.
    Applied,
    /// Key already recorded: nothing done (a dedupe hit).
    Duplicate,
    /// The handler failed; its transaction was rolled back and the key not recorded.
    Failed(HandlerError),
    /// The dedupe rule refused the key (for example a source that went backwards): park it.
    Refused(ParkReason, String),
}

/// What [`EffectStore::apply_batch`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchOutcome {
    /// Every record's outcome, in order (`Applied`, `Duplicate` or `Refused`), all committed.
    Committed(Vec<ApplyOutcome>),
    /// The handler failed on the record at `index`; nothing of the batch was committed by this
    /// call.
    HandlerFailed {
        /// The failing record (for a handler that writes the batch at once: the first record it
        /// was given).
        index: usize,
        /// What the handler said.
        error: HandlerError,
    },
}

/// Why a message was parked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParkReason {
    /// Headers missing, repeated or garbled, including the idempotency key.
    BadHeaders,
    /// A time-ordered key older than the dedupe horizon.
    KeyTooOld,
    /// The handler rejected the message.
    Rejected,
    /// The handler kept failing.
    RetriesExhausted,
    /// A sequence key from a source whose positions went backwards, or from an abandoned epoch.
    SourceRegressed,
}

impl ParkReason {
    /// The persisted code; pinned because parking tables store it.
    pub fn as_str(self) -> &'static str {
        match self {
            ParkReason::BadHeaders => "bad_headers",
            ParkReason::KeyTooOld => "key_too_old",
            ParkReason::Rejected => "rejected",
            ParkReason::RetriesExhausted => "retries_exhausted",
            ParkReason::SourceRegressed => "source_regressed",
        }
    }
}

/// A message set aside with everything needed to inspect or replay it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParkedMessage {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Why.
    pub reason: ParkReason,
    /// The error in words.
    pub detail: String,
    /// The idempotency key header's text, if it was readable.
    pub key_text: Option<String>,
    /// The record's key bytes.
    pub record_key: Option<Vec<u8>>,
    /// Every header as received.
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    /// The value as received.
    pub payload: Option<Vec<u8>>,
    /// When parked.
    pub parked_at: UnixMillis,
}

/// The consumer's side of a database: dedupe record and effect in one transaction.
pub trait EffectStore: Send + Sync {
    /// In one transaction: records the key (or finds it there: [`ApplyOutcome::Duplicate`]),
    /// runs the handler with that transaction, and commits. A handler error rolls back both.
    fn apply(&self, inbound: Inbound<'_>) -> impl Future<Output = Result<ApplyOutcome, StoreError>> + Send;

    /// Applies `batch` in order in one transaction (one commit: one fsync for the lot), each
    /// record as [`EffectStore::apply`] would: its key recorded or found, its handler run. When
    /// a handler fails, the whole transaction rolls back and the answer is
    /// [`BatchOutcome::HandlerFailed`]: the caller then applies the records one by one, so the
    /// failing record is retried or parked in its place and no later record of its partition
    /// overtakes it. The default applies one by one (each record committed alone); a repeat of
    /// an already committed record is a dedupe hit, so the fallback stays exactly once.
    fn apply_batch(
        &self,
        batch: &[Inbound<'_>],
    ) -> impl Future<Output = Result<BatchOutcome, StoreError>> + Send {
        async move {
            let mut outcomes = Vec::with_capacity(batch.len());
            for (index, inbound) in batch.iter().enumerate() {
                match self.apply(*inbound).await? {
                    ApplyOutcome::Failed(error) => return Ok(BatchOutcome::HandlerFailed { index, error }),
                    outcome => outcomes.push(outcome),
                }
            }
            Ok(BatchOutcome::Committed(outcomes))
        }
    }

    /// The Kafka offset to resume `topic`/`partition` at, as recorded in the same transactions
    /// as the effects (watermark rows), or None when this store keeps no position for it.
    /// The consumer seeks there on assignment, so a lost or early offset commit can neither
    /// replay nor skip past what the database says was applied.
    fn resume_offset(
        &self,
        topic: &str,
        partition: i32,
    ) -> impl Future<Output = Result<Option<i64>, StoreError>> + Send;

    /// Forgets at most `limit` key-set entries recorded before `cutoff` (the retention window),
    /// in one short statement; returns how many. The caller repeats while a call forgets
    /// `limit`, so a large backlog never becomes one long delete that holds locks and bloats the
    /// write-ahead log. Watermarks are never forgotten: they are constant space.
    fn forget_keys_before(
        &self,
        cutoff: UnixMillis,
        limit: u64,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Stores a parked message. Parking the same (topic, partition, offset) twice, or a record
    /// whose readable idempotency key is parked already (a relay resend), keeps one row.
    fn park(&self, message: &ParkedMessage) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// After a handler error on attempt `attempt` (1-based): retry after a delay, or park.
/// The one place the consumer decides between the two.
pub fn after_handler_error(error: &HandlerError, attempt: u32, policy: &RetryPolicy) -> AfterError {
    match error {
        HandlerError::Rejected(why) => AfterError::Park(ParkReason::Rejected, why.clone()),
        HandlerError::Retryable(why) if attempt >= policy.max_retries => AfterError::Park(
            ParkReason::RetriesExhausted,
            format!("after {attempt} attempts: {why}"),
        ),
        HandlerError::Retryable(_) => AfterError::RetryAfter(Duration::from_millis(
            policy.backoff_ms(attempt.saturating_sub(1)).max(0) as u64,
        )),
    }
}

/// The decision [`after_handler_error`] makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AfterError {
    /// Try the same message again after this delay.
    RetryAfter(Duration),
    /// Park it and move on.
    Park(ParkReason, String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handler_errors_retry_then_park() {
        let policy = RetryPolicy {
            base_ms: 10,
            max_backoff_ms: 1000,
            max_retries: 3,
        };
        let retry = HandlerError::Retryable("locked".into());
        assert_eq!(
            after_handler_error(&retry, 1, &policy),
            AfterError::RetryAfter(Duration::from_millis(10))
        );
        assert_eq!(
            after_handler_error(&retry, 2, &policy),
            AfterError::RetryAfter(Duration::from_millis(20))
        );
        assert!(matches!(
            after_handler_error(&retry, 3, &policy),
            AfterError::Park(ParkReason::RetriesExhausted, _)
        ));
        let reject = HandlerError::Rejected("bad json".into());
        assert!(matches!(
            after_handler_error(&reject, 1, &policy),
            AfterError::Park(ParkReason::Rejected, _)
        ));
    }
}

/// One step of a database's change stream, in commit order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeedItem {
    /// A transaction begins; its events' keys are built on `commit_position`.
    Begin {
        /// The commit position (PostgreSQL: the commit LSN), known at begin.
        commit_position: u64,
        /// Commit time.
        committed_at: UnixMillis,
    },
    /// An outbox event of the open transaction (a row insert or a table-less message).
    Event(crate::record::RawRow),
    /// An event of the open transaction that cannot be read, with what was read.
    Unreadable {
        /// Why.
        defect: RowDefect,
        /// What arrived, for the dead-event record.
        raw: String,
    },
    /// The open transaction ends; confirming `end_position` skips it on the next start.
    Commit {
        /// The position just past the commit.
        end_position: u64,
    },
    /// Something the relay does not publish (an update or delete of the outbox, a truncate, a
    /// heartbeat, a message with another prefix), named for a counter.
    Ignored(&'static str),
}

/// An outbox event the relay can never publish, kept with its reason before the change stream
/// is confirmed past it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadEvent {
    /// The key it would have had.
    pub key_text: String,
    /// The outbox row id (0 for table-less messages).
    pub outbox_id: i64,
    /// Why.
    pub reason: String,
    /// What was read, for inspection.
    pub raw: String,
}

/// A change stream the WAL relay follows: ordered transactions, confirmation of what was
/// durably handled, and a restart that resumes at the last confirmation.
pub trait ChangeFeed: Send {
    /// The source name keys carry, and its epoch (PostgreSQL: system id and slot; timeline).
    fn source(&self) -> (String, u64);

    /// The next item, waiting for one.
    fn next(&mut self) -> impl Future<Output = Result<FeedItem, StoreError>> + Send;

    /// Everything up to `end_position` is handled; the source may discard it.
    fn confirm(&mut self, end_position: u64);

    /// Drops the stream and starts again at the last confirmed position (rewind, never skip),
    /// or at `from` when given and later: a position an exactly-once sink committed before the
    /// source confirmation could follow.
    fn restart(&mut self, from: Option<u64>) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Keeps an unpublishable event; must be durable before the position past it is confirmed.
    fn park(&self, dead: &DeadEvent) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Hands ids of published outbox rows to the sweeper (no-op where rows are not kept).
    fn mark_sent(&self, ids: Vec<i64>);
}
