//! Fault points: places where a test or the demo can make a relay or consumer stop dead, as if
//! the process were killed there. Each point sits where a crash is the most dangerous.

use std::fmt;
use std::sync::Arc;

/// Where a crash is simulated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultPoint {
    /// Relay: some records of a batch were acknowledged, none marked SENT yet.
    RelayAfterPublishBeforeSettle,
    /// Exactly-once relay: records and progress sent in the open Kafka transaction, not committed.
    EosBeforeCommit,
    /// Exactly-once relay: Kafka transaction committed, the slot not yet confirmed.
    EosAfterCommitBeforeConfirm,
    /// Exactly-once relay: an abort was decided and has not completed.
    EosDuringAbort,
    /// Consumer: the effect committed, the offset not yet.
    ConsumerAfterApplyBeforeOffsetCommit,
    /// Relay: the producer refuses one record at send time (as a full queue past its wait, or a
    /// record too large for the client, would). Not a crash: the relay goes on.
    RelaySendRefused,
    /// Relay: the database fails a settle with a retryable error (as while PostgreSQL
    /// restarts). Not a crash: the relay backs off and goes on.
    RelaySettleFails,
    /// Stream processor: its commit is refused as a group that moved on refuses it
    /// (IllegalGeneration: a rebalance between the last poll and the commit). Not a crash: the
    /// processor drops what it did not commit and goes on.
    StreamCommitRefused,
    /// Delta sink: the Parquet files of an append are written, the log entry that would
    /// reference them (with the positions) is not.
    DeltaAfterFilesBeforeLog,
}

/// Decides at each fault point whether to crash there.
#[derive(Clone, Default)]
pub struct Faults(Option<Arc<dyn Fn(FaultPoint) -> bool + Send + Sync>>);

impl Faults {
    /// No faults.
    pub fn none() -> Self {
        Faults(None)
    }

    /// Crash wherever `decide` says so.
    pub fn new(decide: impl Fn(FaultPoint) -> bool + Send + Sync + 'static) -> Self {
        Faults(Some(Arc::new(decide)))
    }

    /// Whether to fail at `point` now.
    pub fn fires(&self, point: FaultPoint) -> bool {
        self.0.as_ref().is_some_and(|decide| decide(point))
    }
}

impl fmt::Debug for Faults {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() {
            "Faults(on)"
        } else {
            "Faults(none)"
        })
    }
}
