//! What the rebalance callbacks share with the consumer loop: partitions assigned since their
//! last resume check, offsets applied and not committed yet (committed at a revoke, so the next
//! owner starts right after), the offset-gap check, and librdkafka's lag statistics.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Mutex;

use exactly_core::OffsetGapCheck;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::{Offset, TopicPartitionList};

/// Offsets of applied records, per partition, not committed to Kafka yet.
pub(super) type Pending = HashMap<(String, i32), i64>;

/// State the rebalance callbacks share with the consumer loop: partitions assigned since their
/// last resume check, and the offsets applied but not yet committed.
pub(crate) struct AssignmentContext {
    unchecked: Mutex<HashSet<(String, i32)>>,
    pending: Mutex<Pending>,
    /// The offsets handed to this client, per partition, to read each gap in them twice.
    gaps: Mutex<OffsetGapCheck<(String, i32)>>,
    /// Total lag from the last statistics (-1: unknown).
    pub(super) lag: std::sync::atomic::AtomicI64,
}

impl Default for AssignmentContext {
    fn default() -> Self {
        AssignmentContext {
            unchecked: Mutex::default(),
            pending: Mutex::default(),
            gaps: Mutex::default(),
            lag: std::sync::atomic::AtomicI64::new(-1),
        }
    }
}

impl AssignmentContext {
    pub(super) fn unchecked(&self) -> std::sync::MutexGuard<'_, HashSet<(String, i32)>> {
        // A poisoned set only means a panic elsewhere; its contents are still meaningful.
        self.unchecked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(super) fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(super) fn gaps(&self) -> std::sync::MutexGuard<'_, OffsetGapCheck<(String, i32)>> {
        self.gaps
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Commits `offsets` (`mode`); a failure only means a redelivery, which dedupe absorbs.
pub(super) fn commit_offsets<C: Consumer<AssignmentContext>>(
    consumer: &C,
    offsets: Pending,
    mode: CommitMode,
    when: &str,
) {
    if offsets.is_empty() {
        return;
    }
    let mut list = TopicPartitionList::new();
    for ((topic, partition), offset) in offsets {
        if list
            .add_partition_offset(&topic, partition, Offset::Offset(offset))
            .is_err()
        {
            tracing::warn!("cannot commit offset {offset} of {topic}/{partition}");
        }
    }
    if let Err(e) = consumer.commit(&list, mode) {
        tracing::debug!("offset commit {when} failed (records will redeliver and dedupe): {e}");
    }
}

impl ClientContext for AssignmentContext {
    crate::oauth::oauth_token_refresh!();

    fn stats(&self, statistics: rdkafka::Statistics) {
        for (topic, t) in &statistics.topics {
            for (partition, p) in t.partitions.iter().filter(|(p, _)| **p >= 0) {
                tracing::debug!(
                    "{topic}/{partition}: fetch_state {} next {} app {} committed {} hi {} fetchq {}",
                    p.fetch_state,
                    p.next_offset,
                    p.app_offset,
                    p.committed_offset,
                    p.hi_offset,
                    p.fetchq_cnt
                );
            }
        }
        let total = crate::config::export_consumer_lag(&statistics, "exactly_consumer_lag_records");
        self.lag.store(total.unwrap_or(-1), Ordering::Relaxed);
    }
}

impl ConsumerContext for AssignmentContext {
    /// Before partitions go to another member: commit what was applied from them, so the next
    /// owner starts after it (fewer redeliveries), and forget it, so it is never committed later
    /// over the next owner's progress.
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(list) = rebalance {
            let revoked: Pending = {
                let mut pending = self.pending();
                list.elements()
                    .iter()
                    .filter_map(|e| {
                        let tp = (e.topic().to_owned(), e.partition());
                        pending.remove(&tp).map(|offset| (tp, offset))
                    })
                    .collect()
            };
            // Async: a synchronous commit here would block the rebalance callback for as long as
            // a slow coordinator takes (past max.poll.interval.ms, which puts the member out of
            // the group). librdkafka waits for outstanding commits before it rejoins, so the
            // next owner still starts after what was applied.
            commit_offsets(consumer, revoked, CommitMode::Async, "at revoke");
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let mut unchecked = self.unchecked();
        // A partition that comes back starts where another member left it, not where this
        // client last read it.
        let mut gaps = self.gaps();
        match rebalance {
            Rebalance::Assign(list) => {
                for e in list.elements() {
                    let tp = (e.topic().to_owned(), e.partition());
                    gaps.forget(&tp);
                    unchecked.insert(tp);
                }
            }
            Rebalance::Revoke(list) => {
                for e in list.elements() {
                    let tp = (e.topic().to_owned(), e.partition());
                    gaps.forget(&tp);
                    unchecked.remove(&tp);
                }
            }
            Rebalance::Error(_) => {}
        }
    }
}
