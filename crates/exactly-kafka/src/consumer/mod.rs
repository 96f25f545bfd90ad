//! The idempotent consumer loop.

mod assignment;
mod group_watch;

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use exactly_core::{
    after_handler_error, header, AfterError, ApplyOutcome, BatchOutcome, DedupePolicy, DedupeRoute,
    EffectStore, GapVerdict, Inbound, ParkReason, ParkedMessage, RetryPolicy,
};
use futures::FutureExt;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::watch;

use crate::config::{consumer_config, Cluster, KafkaSettings};
use crate::error::KafkaFlowError;
use crate::faults::{FaultPoint, Faults};
use crate::gap::{follow_gap_verdict, GapFollowed};
use crate::relay::now;
use crate::wire::{decode_message, decode_message_keyed_by};

pub(crate) use assignment::AssignmentContext;
use assignment::{commit_offsets, Pending};
use group_watch::{GroupWatch, FRUITLESS_LOOKS_BEFORE_REBUILD};

/// How a consumer runs.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// How to reach the cluster.
    pub kafka: KafkaSettings,
    /// Consumer group.
    pub group_id: String,
    /// Topics to subscribe to.
    pub topics: Vec<String>,
    /// Key-set retention and time horizon.
    pub dedupe: DedupePolicy,
    /// Handler retries before parking.
    pub retry: RetryPolicy,
    /// How often processed offsets are committed (they are safe to commit late: a redelivery
    /// is a dedupe hit).
    pub commit_interval: Duration,
    /// How often key-set entries older than the retention are deleted.
    pub prune_interval: Duration,
    /// The most key-set entries one delete statement removes.
    pub prune_batch: u64,
    /// The most records applied in one database transaction: what one poll has ready, up to
    /// this many (the consumer never waits to fill a batch, so a quiet topic keeps its latency).
    pub max_batch: usize,
    /// Deduplicate by the UUID in this header instead of exactly's headers (a topic Debezium
    /// writes: `id`).
    pub key_header: Option<String>,
    /// Step over gaps in a partition's offsets without reading them a second time (see
    /// [`exactly_core::offset_gap`]): for compacted topics on Kafka, where most records follow
    /// a gap, none hides records, and a second read of each would cost a fetch per record.
    pub trust_offset_gaps: bool,
    /// This member's `group.instance.id` (static membership, see
    /// [`crate::config::static_membership`]); `None`: a dynamic member.
    pub group_instance_id: Option<String>,
}

impl ConsumerConfig {
    /// Defaults for a group on `topics`.
    pub fn new(kafka: &(impl Cluster + ?Sized), group_id: &str, topics: &[&str]) -> Self {
        ConsumerConfig {
            kafka: kafka.settings().into_owned(),
            group_id: group_id.to_owned(),
            topics: topics.iter().map(|t| (*t).to_owned()).collect(),
            dedupe: DedupePolicy::default(),
            retry: RetryPolicy {
                base_ms: 50,
                max_backoff_ms: 2_000,
                max_retries: 5,
            },
            commit_interval: Duration::from_millis(200),
            prune_interval: Duration::from_secs(60),
            prune_batch: 5_000,
            max_batch: 500,
            group_instance_id: None,
            key_header: None,
            trust_offset_gaps: false,
        }
    }
}

/// Delete statements one prune step runs at most before the loop polls again.
const PRUNE_ROUNDS: usize = 10;

/// How soon a prune step that failed is tried again.
const PRUNE_RETRY: Duration = Duration::from_secs(5);

/// What one prune step did.
enum Pruned {
    /// Nothing past the retention is left.
    All,
    /// The step's bound was reached with entries left.
    More,
    /// The database refused; the entries wait for the retry.
    Failed,
}

/// Counters a caller can read while the consumer runs.
#[derive(Debug, Default)]
pub struct ConsumerCounters {
    /// Records received, repeats included.
    pub delivered: AtomicU64,
    /// Effects committed.
    pub applied: AtomicU64,
    /// Repeats recognised and skipped.
    pub duplicates: AtomicU64,
    /// Records parked.
    pub parked: AtomicU64,
    /// Gaps in a partition's offsets read a second time (see [`exactly_core::offset_gap`]).
    pub offset_gap_refetches: AtomicU64,
    /// Of those, gaps the second read found records in: the broker had served past them.
    pub offset_gaps_filled: AtomicU64,
    /// Partitions assigned to this member (as of its last offset commit).
    pub assigned: AtomicU64,
    /// Records behind the end over its partitions (librdkafka's last statistics; -1: unknown).
    pub lag: std::sync::atomic::AtomicI64,
}

/// A consumer client of `config`'s group, subscribed to its topics.
fn subscribed_client(config: &ConsumerConfig) -> Result<StreamConsumer<AssignmentContext>, KafkaFlowError> {
    let mut client = consumer_config(&config.kafka, &config.group_id);
    crate::config::static_membership(&mut client, config.group_instance_id.as_deref());
    let consumer: StreamConsumer<AssignmentContext> = client
        .create_with_context(AssignmentContext::default())
        .map_err(KafkaFlowError::at("create consumer"))?;
    let topics: Vec<&str> = config.topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&topics)
        .map_err(KafkaFlowError::at("subscribe"))?;
    Ok(consumer)
}

/// Reads `topics` and applies each record once through `store`.
///
/// Per record: decode strictly (bad headers → park), check the key's age (too old → park), then
/// one database transaction records the key and runs the handler; only after it committed is
/// the offset eligible for commit. Handler errors retry with backoff, then park. Database
/// errors are retried without end: they are not the record's fault, and skipping would lose it.
///
/// On partition assignment the consumer seeks to the offset its database recorded with the
/// watermark (when it keeps one), so neither a lost nor an early offset commit can make it skip
/// or replay past what was applied.
pub struct IdempotentConsumer<S> {
    store: S,
    config: ConsumerConfig,
    /// Replaced as a whole when its group coordinator stops answering (see `rebuild_client`).
    consumer: std::sync::RwLock<Arc<StreamConsumer<AssignmentContext>>>,
    faults: Faults,
    counters: Arc<ConsumerCounters>,
}

impl<S: EffectStore> IdempotentConsumer<S> {
    /// Joins the group and subscribes.
    pub fn new(store: S, config: ConsumerConfig) -> Result<Self, KafkaFlowError> {
        config
            .dedupe
            .validate()
            .map_err(|e| KafkaFlowError::Store(exactly_core::StoreError::new("dedupe policy", e)))?;
        let consumer = subscribed_client(&config)?;
        Ok(IdempotentConsumer {
            store,
            config,
            consumer: std::sync::RwLock::new(Arc::new(consumer)),
            faults: Faults::none(),
            counters: Arc::default(),
        })
    }

    /// The Kafka client now.
    fn consumer(&self) -> Arc<StreamConsumer<AssignmentContext>> {
        self.consumer
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Replaces the Kafka client with a new one (new connections, a new member of the group).
    /// Offsets applied but not committed are left to the old client's revoke, or redelivered
    /// and recognised as repeats.
    fn rebuild_client(&self) -> Result<(), KafkaFlowError> {
        let fresh = Arc::new(subscribed_client(&self.config)?);
        let old = std::mem::replace(
            &mut *self
                .consumer
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            fresh,
        );
        metrics::counter!("exactly_consumer_client_rebuilds_total").increment(1);
        // Closing waits for the group coordinator, the very thing that stopped answering:
        // never on this loop.
        std::thread::spawn(move || drop(old));
        Ok(())
    }

    /// Adds fault points (tests, demo).
    pub fn with_faults(mut self, faults: Faults) -> Self {
        self.faults = faults;
        self
    }

    /// Shares counters with the caller.
    pub fn with_counters(mut self, counters: Arc<ConsumerCounters>) -> Self {
        self.counters = counters;
        self
    }

    /// Consumes until `stop` turns true, then commits what was processed.
    pub async fn run(&self, mut stop: watch::Receiver<bool>) -> Result<(), KafkaFlowError> {
        let mut last_commit = Instant::now();
        let mut next_prune = Instant::now();
        let mut watch = GroupWatch::default();
        loop {
            if watch.due() {
                self.rejoin_if_group_is_stuck(&mut watch);
                if watch.fruitless >= FRUITLESS_LOOKS_BEFORE_REBUILD {
                    tracing::warn!(
                        "group {}: no partitions and no answer from the group for {} looks: a new Kafka client",
                        self.config.group_id,
                        watch.fruitless
                    );
                    watch.fruitless = 0;
                    self.rebuild_client()?;
                }
            }
            // One client for the whole turn: the batch's messages borrow from it.
            let consumer = self.consumer();
            self.seek_unchecked(&mut stop).await?;
            if Instant::now() >= next_prune {
                // A backlog left over is taken up again after the next record, a bounded step
                // at a time between polls, until it is gone; a failed round (the database
                // restarting) is retried soon, so the key set stays within its bound.
                next_prune = Instant::now()
                    + match self.prune().await {
                        Pruned::All => self.config.prune_interval,
                        Pruned::More => Duration::ZERO,
                        Pruned::Failed => PRUNE_RETRY.min(self.config.prune_interval),
                    };
            }
            let message = tokio::select! {
                m = consumer.recv() => m,
                _ = stop.changed() => break,
                _ = tokio::time::sleep(self.config.commit_interval) => {
                    self.commit();
                    last_commit = Instant::now();
                    continue;
                }
            };
            let first = match message {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!("consumer error (retrying): {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            // What else is ready now joins the batch; nothing waits to fill it.
            let mut batch = vec![first];
            while batch.len() < self.config.max_batch.max(1) {
                match consumer.recv().now_or_never() {
                    Some(Ok(m)) => batch.push(m),
                    Some(Err(e)) => {
                        tracing::warn!("consumer error (retrying): {e}");
                        break;
                    }
                    None => break,
                }
            }
            metrics::histogram!("exactly_consumer_batch_records").record(batch.len() as f64);
            tracing::trace!(records = batch.len(), "batch");
            self.handle_batch(&batch, &mut stop).await?;
            if last_commit.elapsed() >= self.config.commit_interval {
                self.commit();
                last_commit = Instant::now();
            }
        }
        self.commit();
        Ok(())
    }

    /// Deletes key-set entries past the retention window. A failure is only logged: the entries
    /// are deleted on a later round, and keeping a key longer never applies anything twice.
    async fn prune(&self) -> Pruned {
        let cutoff = now().plus_ms(-self.config.dedupe.retention_ms);
        let batch = self.config.prune_batch.max(1);
        // Bounded: at most `prune_batch` rows a statement and `PRUNE_ROUNDS` statements a call,
        // so the loop is back to polling soon.
        for _ in 0..PRUNE_ROUNDS {
            match self.store.forget_keys_before(cutoff, batch).await {
                Ok(n) => {
                    if n > 0 {
                        tracing::debug!("forgot {n} keys older than the retention");
                        metrics::counter!("exactly_consumer_keys_pruned_total").increment(n);
                    }
                    if n < batch {
                        return Pruned::All;
                    }
                }
                Err(e) => {
                    tracing::warn!("pruning the key set failed (will retry): {e}");
                    return Pruned::Failed;
                }
            }
        }
        Pruned::More
    }

    /// Newly assigned partitions with no record yet (for example a group offset at the end of
    /// the partition while the database is behind it): seek each to its stored offset.
    async fn seek_unchecked(&self, stop: &mut watch::Receiver<bool>) -> Result<(), KafkaFlowError> {
        let unchecked: Vec<(String, i32)> = self.consumer().context().unchecked().drain().collect();
        for (topic, partition) in unchecked {
            let stored = self
                .until_stored("read resume offset", stop, || {
                    self.store.resume_offset(&topic, partition)
                })
                .await?;
            if let Some(offset) = stored {
                metrics::counter!("exactly_consumer_resume_seeks_total").increment(1);
                self.consumer()
                    .context()
                    .gaps()
                    .expect(&(topic.clone(), partition), offset);
                if let Err(e) =
                    self.consumer()
                        .seek(&topic, partition, Offset::Offset(offset), Duration::from_secs(10))
                {
                    tracing::warn!("seek of {topic}/{partition} failed (will retry): {e}");
                    self.consumer().context().unchecked().insert((topic, partition));
                }
            }
        }
        Ok(())
    }

    /// First record of a newly assigned partition: if the database recorded another resume
    /// offset, seek there and drop this record (false). librdkafka discards records fetched
    /// before the seek, so the next one from this partition is the one at the stored offset.
    async fn resume_checked(
        &self,
        message: &BorrowedMessage<'_>,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<bool, KafkaFlowError> {
        let tp = (message.topic().to_owned(), message.partition());
        if !self.consumer().context().unchecked().remove(&tp) {
            return Ok(true);
        }
        let stored = self
            .until_stored("read resume offset", stop, || {
                self.store.resume_offset(&tp.0, tp.1)
            })
            .await?;
        match stored {
            Some(offset) if offset != message.offset() => {
                tracing::info!(
                    "{}/{}: delivered from offset {}, the database says {offset}: seeking",
                    tp.0,
                    tp.1,
                    message.offset()
                );
                metrics::counter!("exactly_consumer_resume_seeks_total").increment(1);
                self.consumer().context().gaps().expect(&tp, offset);
                if let Err(e) =
                    self.consumer()
                        .seek(&tp.0, tp.1, Offset::Offset(offset), Duration::from_secs(10))
                {
                    tracing::warn!("seek of {}/{} failed (will retry): {e}", tp.0, tp.1);
                    self.consumer().context().unchecked().insert(tp);
                }
                Ok(false)
            }
            Some(_) => Ok(true),
            None => {
                // No position of its own: the fetch started at the group's committed offset.
                // Records between it and this one are a gap to read twice, like any other.
                if let Some(committed) = self.committed_offset(&tp) {
                    if committed < message.offset() {
                        self.consumer().context().gaps().expect(&tp, committed);
                    }
                }
                Ok(true)
            }
        }
    }

    /// The group's committed offset of `tp`, if it has one and the coordinator answers soon
    /// (this blocks the loop; it runs once per assignment of a partition).
    fn committed_offset(&self, tp: &(String, i32)) -> Option<i64> {
        let mut list = TopicPartitionList::new();
        list.add_partition(&tp.0, tp.1);
        let committed = self
            .consumer()
            .committed_offsets(list, Duration::from_secs(2))
            .map_err(|e| tracing::debug!("cannot read the committed offset of {}/{}: {e}", tp.0, tp.1))
            .ok()?;
        match committed.find_partition(&tp.0, tp.1)?.offset() {
            Offset::Offset(offset) => Some(offset),
            _ => None,
        }
    }

    /// Reads a gap in a partition's offsets twice (see [`exactly_core::offset_gap`]): the first
    /// time, seek back to its first offset and drop this record (false), so the records the
    /// broker served past, if any, come before it; a gap still there on the second read holds
    /// no record and is stepped over.
    fn gap_checked(&self, message: &BorrowedMessage<'_>) -> bool {
        if self.config.trust_offset_gaps {
            return true;
        }
        let consumer = self.consumer();
        let tp = (message.topic().to_owned(), message.partition());
        let verdict = consumer.context().gaps().observe(&tp, message.offset());
        match verdict {
            GapVerdict::Refetch { .. } => {
                metrics::counter!("exactly_consumer_offset_gap_refetches_total").increment(1);
                self.counters.offset_gap_refetches.fetch_add(1, Ordering::Relaxed);
            }
            GapVerdict::Filled { .. } => {
                metrics::counter!("exactly_consumer_offset_gaps_filled_total").increment(1);
                self.counters.offset_gaps_filled.fetch_add(1, Ordering::Relaxed);
            }
            GapVerdict::Take | GapVerdict::AcrossGap { .. } => {}
        }
        match follow_gap_verdict(&*consumer, message, verdict) {
            GapFollowed::Take => true,
            GapFollowed::Rereading => false,
            GapFollowed::SeekFailed => {
                consumer.context().gaps().refetch_failed(&tp);
                false
            }
        }
    }

    /// Runs a store call until it succeeds: a retryable error (the database restarting) backs
    /// off and tries again, for as long as it takes. Nothing moves on meanwhile (no record is
    /// skipped, no offset committed). Returns the error when it cannot be retried or on stop.
    async fn until_stored<T, F, Fut>(
        &self,
        what: &str,
        stop: &mut watch::Receiver<bool>,
        mut call: F,
    ) -> Result<T, KafkaFlowError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, exactly_core::StoreError>>,
    {
        let mut failures = 0u32;
        loop {
            match call().await {
                Ok(value) => return Ok(value),
                Err(e) if e.is_retryable() => {
                    failures += 1;
                    tracing::warn!("database error: {what} (retrying): {e}");
                    let delay = self.config.retry.backoff_ms(failures.min(10)).max(50) as u64;
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(delay)) => {}
                        _ = stop.changed() => return Err(KafkaFlowError::Store(e)),
                    }
                }
                Err(e) => return Err(KafkaFlowError::Store(e)),
            }
        }
    }

    /// Commits the applied offsets of partitions this member still owns; those of partitions
    /// it no longer owns are dropped (their revoke committed them, or the next owner has).
    fn commit(&self) {
        let consumer = self.consumer();
        let owned: HashSet<(String, i32)> = match consumer.assignment() {
            Ok(list) => {
                // For readiness probes: what this member holds and how far behind it is.
                self.counters
                    .assigned
                    .store(list.count() as u64, Ordering::Relaxed);
                self.counters
                    .lag
                    .store(consumer.context().lag.load(Ordering::Relaxed), Ordering::Relaxed);
                list.elements()
                    .iter()
                    .map(|e| (e.topic().to_owned(), e.partition()))
                    .collect()
            }
            Err(e) => {
                tracing::debug!("cannot read the assignment (commit later): {e}");
                return;
            }
        };
        let offsets: Pending = {
            let mut pending = consumer.context().pending();
            let taken = std::mem::take(&mut *pending);
            let (mine, dropped): (Pending, Pending) =
                taken.into_iter().partition(|(tp, _)| owned.contains(tp));
            if !dropped.is_empty() {
                tracing::debug!("dropping offsets of {} partitions no longer owned", dropped.len());
            }
            mine
        };
        // Async: a synchronous commit waits for the group coordinator, and while the broker
        // restarts that wait outlasted max.poll.interval.ms, put this member out of its group
        // and stalled its partitions. A lost or late commit only means a redelivery, which
        // dedupe absorbs; librdkafka sends commits in order and closing waits for them.
        commit_offsets(&*consumer, offsets, CommitMode::Async, "");
    }

    /// Handles what one poll returned, in order: records that cannot be applied are parked;
    /// the rest are applied in one database transaction (one commit), and their offsets become
    /// pending only after it. A handler failure falls back to one transaction per record, so
    /// the failing record is retried or parked in its place; a database error retries the
    /// whole batch, and nothing reaches Kafka's offsets meanwhile.
    async fn handle_batch(
        &self,
        batch: &[BorrowedMessage<'_>],
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), KafkaFlowError> {
        // Partitions sought away from during this batch: their later records here are stale.
        let mut sought: HashSet<(String, i32)> = HashSet::new();
        let mut ready: Vec<(&BorrowedMessage<'_>, exactly_core::Delivery)> = Vec::with_capacity(batch.len());
        let mut taken: Vec<&BorrowedMessage<'_>> = Vec::with_capacity(batch.len());
        let received_at = now();
        for message in batch {
            let tp = (message.topic().to_owned(), message.partition());
            if sought.contains(&tp) {
                continue;
            }
            if !self.resume_checked(message, stop).await? || !self.gap_checked(message) {
                sought.insert(tp);
                continue;
            }
            taken.push(message);
            self.counters.delivered.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("exactly_consumer_delivered_total").increment(1);
            let decoded = match &self.config.key_header {
                None => decode_message(message),
                Some(name) => decode_message_keyed_by(message, name),
            };
            let delivery = match decoded {
                Ok(d) => d,
                Err(e) => {
                    self.park(message, ParkReason::BadHeaders, e.to_string(), stop)
                        .await?;
                    continue;
                }
            };
            if let DedupeRoute::TooOld { age_ms } = self.config.dedupe.route(&delivery.key, received_at) {
                metrics::counter!("exactly_consumer_keys_too_old_total", "topic" => message.topic().to_owned())
                    .increment(1);
                let detail = format!(
                    "key {} is {age_ms} ms old, beyond the dedupe horizon of {} ms",
                    delivery.key, self.config.dedupe.horizon_ms
                );
                self.park(message, ParkReason::KeyTooOld, detail, stop).await?;
                continue;
            }
            ready.push((message, delivery));
        }
        let inbounds: Vec<Inbound<'_>> = ready
            .iter()
            .map(|(message, delivery)| Inbound {
                topic: message.topic(),
                partition: message.partition(),
                offset: message.offset(),
                delivery,
                now: received_at,
            })
            .collect();
        if !inbounds.is_empty() {
            let outcome = self
                .until_stored("apply batch", stop, || self.store.apply_batch(&inbounds))
                .await?;
            match outcome {
                BatchOutcome::Committed(outcomes) => {
                    for ((message, _), outcome) in ready.iter().zip(outcomes) {
                        self.settled(message, outcome, stop).await?;
                    }
                }
                BatchOutcome::HandlerFailed { index, error } => {
                    tracing::debug!(
                        "handler failed on record {index} of a batch of {} ({error}): applying one by one",
                        inbounds.len()
                    );
                    for ((message, _), inbound) in ready.iter().zip(&inbounds) {
                        self.apply_one(message, *inbound, stop).await?;
                    }
                }
            }
        }
        for message in taken {
            if self
                .faults
                .fires(FaultPoint::ConsumerAfterApplyBeforeOffsetCommit)
            {
                return Err(KafkaFlowError::InjectedCrash(
                    FaultPoint::ConsumerAfterApplyBeforeOffsetCommit,
                ));
            }
            self.consumer().context().pending().insert(
                (message.topic().to_owned(), message.partition()),
                message.offset() + 1,
            );
        }
        Ok(())
    }

    /// Counts a committed outcome (or parks a refused record).
    async fn settled(
        &self,
        message: &BorrowedMessage<'_>,
        outcome: ApplyOutcome,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), KafkaFlowError> {
        match outcome {
            ApplyOutcome::Applied => {
                self.counters.applied.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("exactly_consumer_applied_total").increment(1);
            }
            ApplyOutcome::Duplicate => {
                self.counters.duplicates.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("exactly_consumer_dedupe_hits_total").increment(1);
            }
            ApplyOutcome::Refused(reason, detail) => self.park(message, reason, detail, stop).await?,
            // apply_batch reports handler failures as HandlerFailed, never here.
            ApplyOutcome::Failed(error) => {
                return Err(KafkaFlowError::Store(exactly_core::StoreError::stop(
                    "apply batch",
                    format!("a committed batch reported a handler failure: {error}"),
                )))
            }
        }
        Ok(())
    }

    /// One record in its own transaction: a handler failure is retried with backoff, then
    /// parked; a database error is retried for as long as it takes.
    async fn apply_one(
        &self,
        message: &BorrowedMessage<'_>,
        inbound: Inbound<'_>,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), KafkaFlowError> {
        let mut attempt = 0u32;
        let mut store_failures = 0u32;
        loop {
            match self.store.apply(inbound).await {
                Ok(ApplyOutcome::Failed(error)) => {
                    attempt += 1;
                    match after_handler_error(&error, attempt, &self.config.retry) {
                        AfterError::RetryAfter(delay) => tokio::time::sleep(delay).await,
                        AfterError::Park(reason, detail) => {
                            return self.park(message, reason, detail, stop).await
                        }
                    }
                }
                Ok(outcome) => return self.settled(message, outcome, stop).await,
                Err(e) if !e.is_retryable() => return Err(KafkaFlowError::Store(e)),
                Err(e) => {
                    store_failures += 1;
                    tracing::warn!(
                        "database error applying {}/{}@{} (retrying): {e}",
                        message.topic(),
                        message.partition(),
                        message.offset()
                    );
                    let delay = self.config.retry.backoff_ms(store_failures.min(10)).max(0) as u64;
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(delay)) => {}
                        _ = stop.changed() => return Err(KafkaFlowError::Store(e)),
                    }
                }
            }
        }
    }

    async fn park(
        &self,
        message: &BorrowedMessage<'_>,
        reason: ParkReason,
        detail: String,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), KafkaFlowError> {
        let headers: Vec<(String, Option<Vec<u8>>)> = message
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                    .collect()
            })
            .unwrap_or_default();
        let key_text = headers
            .iter()
            .find(|(n, _)| n == header::KEY)
            .and_then(|(_, v)| v.as_deref())
            .map(|v| String::from_utf8_lossy(v).into_owned());
        let parked = ParkedMessage {
            topic: message.topic().to_owned(),
            partition: message.partition(),
            offset: message.offset(),
            reason,
            detail,
            key_text,
            record_key: message.key().map(<[u8]>::to_vec),
            headers,
            payload: message.payload().map(<[u8]>::to_vec),
            parked_at: now(),
        };
        tracing::warn!(
            "parked {}/{}@{}: {}: {}",
            parked.topic,
            parked.partition,
            parked.offset,
            reason.as_str(),
            parked.detail
        );
        self.until_stored("park message", stop, || self.store.park(&parked))
            .await?;
        self.counters.parked.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("exactly_consumer_parked_total", "reason" => reason.as_str()).increment(1);
        Ok(())
    }
}
