//! The WAL relay: follow a change feed in commit order, publish each outbox event with a
//! 128-bit key (commit position << 64 | ordinal), and confirm the feed only up to the end of the
//! last transaction whose every record the broker acknowledged.
//!
//! On any publish error the relay rewinds: it waits until the old producer has nothing in
//! flight, drops it, and restarts the feed at the last confirmed position with a new producer.
//! It never skips ahead, so per partition the keys a consumer sees, repeats removed, are an
//! ordered prefix of the source's commits.

mod transactions;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::wire::envelope_headers;
use exactly_core::wal::{CommitTracker, TxnId};
use exactly_core::{
    lsn_sequence, source_header, ChangeFeed, DeadEvent, FeedItem, IdempotencyKey, KeyMode, OutboxRecord,
    RawRow, RowDefect,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;
use tokio::sync::{mpsc, watch};

use crate::config::{producer_config, Cluster, KafkaSettings};
use crate::eos::{self};
use crate::error::KafkaFlowError;
use crate::faults::{FaultPoint, Faults};
use crate::relay::now;

use transactions::{EosState, TXN_TIMEOUT};

/// How a WAL relay runs.
#[derive(Debug, Clone)]
pub struct WalRelayConfig {
    /// How to reach the cluster.
    pub kafka: KafkaSettings,
    /// Events with larger payloads are dead.
    pub max_payload_bytes: usize,
    /// Records handed to the producer and not yet acknowledged, at most.
    pub max_in_flight: u64,
    /// Pause before reconnecting after an error.
    pub rewind_backoff: Duration,
}

impl WalRelayConfig {
    /// Defaults for `kafka`.
    pub fn new(kafka: &(impl Cluster + ?Sized)) -> Self {
        WalRelayConfig {
            kafka: kafka.settings().into_owned(),
            max_payload_bytes: exactly_core::record::DEFAULT_MAX_PAYLOAD_BYTES,
            max_in_flight: 100_000,
            rewind_backoff: Duration::from_millis(500),
        }
    }
}

/// Counters a caller can read while the relay runs.
#[derive(Debug, Default)]
pub struct WalRelayCounters {
    /// Source transactions confirmed (heartbeats included).
    pub transactions: AtomicU64,
    /// Events confirmed (published or dead).
    pub events: AtomicU64,
    /// Records acknowledged by the broker (re-publishes after a rewind included).
    pub acked: AtomicU64,
    /// Events parked as dead.
    pub dead: AtomicU64,
    /// Changes seen and not published (updates, deletes, heartbeats…).
    pub ignored: AtomicU64,
    /// Rewinds after an error.
    pub rewinds: AtomicU64,
    /// The last confirmed position.
    pub confirmed_position: AtomicU64,
}

/// Carried through librdkafka to the delivery report.
struct DeliveryTag {
    generation: u64,
    txn: TxnId,
    outbox_id: i64,
}

struct Ack {
    generation: u64,
    txn: TxnId,
    outbox_id: i64,
    error: Option<String>,
}

/// Forwards delivery reports to the relay's loop.
struct AckContext {
    acks: mpsc::UnboundedSender<Ack>,
}

impl ClientContext for AckContext {
    crate::oauth::oauth_token_refresh!();
}

impl ProducerContext for AckContext {
    type DeliveryOpaque = Box<DeliveryTag>;

    fn delivery(&self, result: &DeliveryResult<'_>, tag: Self::DeliveryOpaque) {
        let error = result.as_ref().err().map(|(e, _)| e.to_string());
        // The receiver is gone only when the relay stopped; nothing is waiting for the report.
        let _ = self.acks.send(Ack {
            generation: tag.generation,
            txn: tag.txn,
            outbox_id: tag.outbox_id,
            error,
        });
    }
}

/// Why a streaming pass ended.
enum PassEnd {
    Stopped,
    Rewind(String),
}

/// Follows `feed` and publishes its outbox events.
pub struct WalRelay<F> {
    feed: F,
    config: WalRelayConfig,
    source: String,
    source_header: String,
    /// Sequence keys of this source (built once, not per event).
    keys: KeyMode,
    producer: ThreadedProducer<AckContext>,
    generation: u64,
    acks: mpsc::UnboundedReceiver<Ack>,
    ack_sender: mpsc::UnboundedSender<Ack>,
    tracker: CommitTracker,
    open_commit: Option<u64>,
    ordinal: u64,
    sent_ids: Vec<i64>,
    faults: Faults,
    counters: Arc<WalRelayCounters>,
    eos: Option<EosState>,
}

/// The outbox id carried by the progress record's delivery tag.
const PROGRESS_RECORD: i64 = -1;

impl<F: ChangeFeed> WalRelay<F> {
    /// A relay over `feed`; creates its producer.
    pub fn new(feed: F, config: WalRelayConfig) -> Result<Self, KafkaFlowError> {
        let (source, epoch) = feed.source();
        let (ack_sender, acks) = mpsc::unbounded_channel();
        let producer = new_producer(&config, &ack_sender, None)?;
        Ok(WalRelay {
            source_header: source_header(&source, epoch),
            keys: KeyMode::Sequence {
                source: source.clone(),
            },
            source,
            feed,
            config,
            producer,
            generation: 0,
            acks,
            ack_sender,
            tracker: CommitTracker::new(),
            open_commit: None,
            ordinal: 0,
            sent_ids: Vec::new(),
            faults: Faults::none(),
            counters: Arc::default(),
            eos: None,
        })
    }

    /// Adds fault points (tests, demo).
    pub fn with_faults(mut self, faults: Faults) -> Self {
        self.faults = faults;
        self
    }

    /// Shares counters with the caller.
    pub fn with_counters(mut self, counters: Arc<WalRelayCounters>) -> Self {
        self.counters = counters;
        self
    }

    /// The key source this relay stamps on records.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Streams until `stop` turns true. Errors from the feed or the broker rewind and go on;
    /// only an injected crash (or a stop) ends the loop.
    pub async fn run(&mut self, mut stop: watch::Receiver<bool>) -> Result<(), KafkaFlowError> {
        loop {
            match self.pass(&mut stop).await? {
                PassEnd::Stopped => return Ok(()),
                PassEnd::Rewind(why) => {
                    tracing::warn!("wal relay rewinds to the last confirmed position: {why}");
                    self.counters.rewinds.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("exactly_wal_rewinds_total").increment(1);
                    tokio::select! {
                        _ = tokio::time::sleep(self.config.rewind_backoff) => {}
                        _ = stop.changed() => return Ok(()),
                    }
                    if self.eos.is_some() {
                        if eos::mentions_fencing(&why) {
                            return Err(KafkaFlowError::Fenced(why));
                        }
                        self.eos_rewind(false).await?;
                    } else {
                        self.rewind().await?;
                    }
                }
            }
        }
    }

    /// Drains the old producer (nothing of it may land after the resend starts), then starts
    /// the feed again at the last confirmed position with a fresh producer and tracker.
    async fn rewind(&mut self) -> Result<(), KafkaFlowError> {
        let old = std::mem::replace(
            &mut self.producer,
            new_producer(&self.config, &self.ack_sender, None)?,
        );
        tokio::task::spawn_blocking(move || {
            let _ = old.flush(Duration::from_secs(60));
            drop(old);
        })
        .await
        .map_err(|e| KafkaFlowError::Feed(format!("producer drain task failed: {e}")))?;
        self.generation += 1;
        self.tracker = CommitTracker::new();
        self.open_commit = None;
        self.sent_ids.clear();
        self.restart_feed(None).await
    }

    /// Restarts the feed at the confirmed position (or `from`), retrying while the source is
    /// unreachable; a source that cannot stream again (its slot lost) stops the relay. The
    /// source's name and epoch are read again, so records after a failover carry the new
    /// timeline.
    async fn restart_feed(&mut self, from: Option<u64>) -> Result<(), KafkaFlowError> {
        loop {
            match self.feed.restart(from).await {
                Ok(()) => {
                    let (source, epoch) = self.feed.source();
                    self.source_header = source_header(&source, epoch);
                    self.source = source;
                    return Ok(());
                }
                Err(e) if !e.is_retryable() => return Err(KafkaFlowError::Store(e)),
                Err(e) => {
                    tracing::warn!("wal relay cannot restart the feed yet: {e}");
                    tokio::time::sleep(self.config.rewind_backoff).await;
                }
            }
        }
    }

    async fn pass(&mut self, stop: &mut watch::Receiver<bool>) -> Result<PassEnd, KafkaFlowError> {
        let mut last_lag_report = Instant::now();
        // Wakes the loop to commit an idle open transaction on time.
        let mut commit_tick = tokio::time::interval(Duration::from_millis(20));
        commit_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let room = self.tracker.outstanding() < self.config.max_in_flight;
            tokio::select! {
                biased;
                _ = stop.changed() => {
                    return self.finish().await;
                }
                ack = self.acks.recv() => {
                    if let Some(ack) = ack {
                        if let Err(why) = self.on_ack(ack) {
                            return Ok(PassEnd::Rewind(why));
                        }
                        while let Ok(more) = self.acks.try_recv() {
                            if let Err(why) = self.on_ack(more) {
                                return Ok(PassEnd::Rewind(why));
                            }
                        }
                        self.confirm()?;
                    }
                }
                _ = commit_tick.tick(), if self.eos.as_ref().is_some_and(|e| e.open) => {}
                item = self.feed.next(), if room => {
                    let item = match item {
                        Ok(item) => item,
                        Err(e) => return Ok(PassEnd::Rewind(e.to_string())),
                    };
                    if let Err(why) = self.on_item(item).await? {
                        return Ok(PassEnd::Rewind(why));
                    }
                }
            }
            if self.eos_due() {
                if let Err(why) = self.eos_commit().await? {
                    return Ok(PassEnd::Rewind(why));
                }
            }
            if last_lag_report.elapsed() >= Duration::from_millis(500) {
                last_lag_report = Instant::now();
                let lag_ms = self
                    .tracker
                    .oldest_pending_commit()
                    .map_or(0, |at| now().millis_since(at).max(0));
                metrics::gauge!("exactly_relay_lag_seconds").set(lag_ms as f64 / 1000.0);
            }
        }
    }

    /// Stop requested: wait for what is in flight, confirm it, return.
    async fn finish(&mut self) -> Result<PassEnd, KafkaFlowError> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.tracker.outstanding() > 0 && Instant::now() < deadline {
            match tokio::time::timeout(Duration::from_millis(200), self.acks.recv()).await {
                Ok(Some(ack)) => {
                    if self.on_ack(ack).is_err() {
                        break;
                    }
                }
                Ok(None) => break,
                Err(_) => {}
            }
        }
        if self.eos.is_some() && self.open_commit.is_none() {
            if let Err(why) = self.eos_commit().await? {
                tracing::warn!("last transaction not committed at stop ({why}); it will be resent");
                let _ = tokio::task::block_in_place(|| self.producer.abort_transaction(TXN_TIMEOUT));
            }
        }
        self.confirm()?;
        Ok(PassEnd::Stopped)
    }

    fn on_ack(&mut self, ack: Ack) -> Result<(), String> {
        if ack.generation != self.generation {
            // From a producer drained before the last rewind: already accounted for.
            return Ok(());
        }
        if let Some(error) = ack.error {
            metrics::counter!("exactly_relay_failures_total").increment(1);
            return Err(format!("publish failed: {error}"));
        }
        if ack.outbox_id == PROGRESS_RECORD {
            if let Some(eos) = self.eos.as_mut() {
                eos.progress_acked = true;
            }
            return Ok(());
        }
        self.tracker
            .acked(ack.txn)
            .map_err(|e| format!("delivery report out of order: {e}"))?;
        self.counters.acked.fetch_add(1, Ordering::Relaxed);
        if ack.outbox_id > 0 {
            self.sent_ids.push(ack.outbox_id);
        }
        Ok(())
    }

    fn confirm(&mut self) -> Result<(), KafkaFlowError> {
        // Exactly-once: the Kafka commit, not the acks, decides what may be confirmed.
        if self.eos.is_some() {
            return Ok(());
        }
        let Some(confirmed) = self.tracker.take_confirmed() else {
            return Ok(());
        };
        if self.faults.fires(FaultPoint::RelayAfterPublishBeforeSettle) {
            return Err(KafkaFlowError::InjectedCrash(
                FaultPoint::RelayAfterPublishBeforeSettle,
            ));
        }
        self.feed.confirm(confirmed.end_position);
        self.counters
            .confirmed_position
            .store(confirmed.end_position, Ordering::Relaxed);
        self.counters
            .transactions
            .fetch_add(confirmed.transactions, Ordering::Relaxed);
        self.counters
            .events
            .fetch_add(confirmed.events, Ordering::Relaxed);
        metrics::counter!("exactly_wal_transactions_total").increment(confirmed.transactions);
        metrics::counter!("exactly_wal_events_total").increment(confirmed.events);
        metrics::gauge!("exactly_wal_confirmed_position").set(confirmed.end_position as f64);
        if !self.sent_ids.is_empty() {
            self.feed.mark_sent(std::mem::take(&mut self.sent_ids));
        }
        Ok(())
    }

    /// Handles one feed item; `Ok(Err(why))` asks for a rewind.
    async fn on_item(&mut self, item: FeedItem) -> Result<Result<(), String>, KafkaFlowError> {
        let tracker_error = |e: exactly_core::wal::TrackerError| Ok(Err(format!("feed out of order: {e}")));
        match item {
            FeedItem::Begin {
                commit_position,
                committed_at,
            } => {
                if let Err(e) = self.tracker.begin(committed_at) {
                    return tracker_error(e);
                }
                if let Some(eos) = self.eos.as_mut() {
                    if !eos.open {
                        if let Err(e) = self.producer.begin_transaction() {
                            return match eos::classify(&e) {
                                eos::TxnFailure::Fatal(why) => Err(KafkaFlowError::Fenced(why)),
                                eos::TxnFailure::Abortable(why) | eos::TxnFailure::Indefinite(why) => {
                                    Ok(Err(why))
                                }
                            };
                        }
                        eos.open = true;
                        eos.started = Instant::now();
                        eos.begun += 1;
                    }
                }
                self.open_commit = Some(commit_position);
                self.ordinal = 0;
            }
            FeedItem::Commit { end_position } => {
                if let Err(e) = self.tracker.commit(end_position) {
                    return tracker_error(e);
                }
                if let Some(eos) = self.eos.as_mut() {
                    eos.last_end = Some(end_position);
                    eos.transactions += 1;
                }
                self.open_commit = None;
                self.confirm()?;
            }
            FeedItem::Ignored(kind) => {
                self.counters.ignored.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("exactly_wal_ignored_total", "kind" => kind).increment(1);
            }
            FeedItem::Event(row) => {
                let Some(value) = self.next_key() else {
                    return Ok(Err("event outside a transaction".into()));
                };
                let id = row.id;
                let with_key = RawRow {
                    sequence: Some(value),
                    ..row
                };
                match with_key.into_record_or_back(&self.keys, self.config.max_payload_bytes) {
                    Ok(record) => return self.publish(record).await,
                    Err((defect, row)) => self.park(value, id, defect, format!("{row:?}")).await?,
                }
            }
            FeedItem::Unreadable { defect, raw } => {
                let Some(value) = self.next_key() else {
                    return Ok(Err("event outside a transaction".into()));
                };
                self.park(value, 0, defect, raw).await?;
            }
        }
        Ok(Ok(()))
    }

    fn next_key(&mut self) -> Option<u128> {
        let commit = self.open_commit?;
        let value = lsn_sequence(commit, self.ordinal);
        self.ordinal += 1;
        Some(value)
    }

    async fn park(
        &mut self,
        value: u128,
        outbox_id: i64,
        defect: RowDefect,
        raw: String,
    ) -> Result<(), KafkaFlowError> {
        let key = IdempotencyKey::Sequence {
            source: self.source.clone(),
            value,
        };
        let dead = DeadEvent {
            key_text: key.to_string(),
            outbox_id,
            reason: defect.to_string(),
            raw: raw.chars().take(64 * 1024).collect(),
        };
        tracing::warn!("dead event {}: {}", dead.key_text, dead.reason);
        // Durable before the position past it can be confirmed; a database error is retried,
        // since moving on would lose the event.
        let mut failures = 0u32;
        while let Err(e) = self.feed.park(&dead).await {
            failures += 1;
            tracing::warn!("cannot record dead event (retrying): {e}");
            tokio::time::sleep(Duration::from_millis(200 * u64::from(failures.min(10)))).await;
        }
        if self.tracker.settled_inline().is_err() {
            return Err(KafkaFlowError::Feed("dead event outside a transaction".into()));
        }
        self.counters.dead.fetch_add(1, Ordering::Relaxed);
        if let Some(eos) = self.eos.as_mut() {
            eos.events += 1;
        }
        metrics::counter!("exactly_outbox_dead_total").increment(1);
        Ok(())
    }

    async fn publish(&mut self, record: OutboxRecord) -> Result<Result<(), String>, KafkaFlowError> {
        let txn = match self.tracker.sent() {
            Ok(txn) => txn,
            Err(e) => return Ok(Err(format!("feed out of order: {e}"))),
        };
        let envelope = &record.envelope;
        let mut headers = Some(envelope_headers(
            envelope,
            &record.key,
            &[(exactly_core::header::SOURCE, self.source_header.as_bytes())],
        ));
        let mut tag = Box::new(DeliveryTag {
            generation: self.generation,
            txn,
            outbox_id: record.id,
        });
        loop {
            let mut kafka_record = BaseRecord::with_opaque_to(&record.topic, tag)
                .key(envelope.aggregate_id.as_bytes())
                .payload(&envelope.payload)
                .timestamp(envelope.occurred_at.0);
            // Moved into the record, and handed back with it when the queue is full.
            kafka_record.headers = headers.take();
            match self.producer.send(kafka_record) {
                Ok(()) => {
                    if let Some(eos) = self.eos.as_mut() {
                        eos.events += 1;
                    }
                    return Ok(Ok(()));
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                    tag = returned.delivery_opaque;
                    headers = returned.headers;
                    // Let acknowledgements drain; they are handled in order like any other.
                    if let Ok(Some(ack)) =
                        tokio::time::timeout(Duration::from_millis(100), self.acks.recv()).await
                    {
                        if let Err(why) = self.on_ack(ack) {
                            return Ok(Err(why));
                        }
                        self.confirm()?;
                    }
                }
                Err((e, _)) => return Ok(Err(format!("cannot hand record to the producer: {e}"))),
            }
        }
    }
}

fn new_producer(
    config: &WalRelayConfig,
    acks: &mpsc::UnboundedSender<Ack>,
    transactional_id: Option<&str>,
) -> Result<ThreadedProducer<AckContext>, KafkaFlowError> {
    // Gapless: a failed record must not be followed by later ones of its partition, or the
    // resend after the rewind would put a lower key after a higher one.
    // No message timeout: a record that timed out locally may still land after its successors,
    // which gapless does not cover. The relay waits out a broker outage instead. A
    // transactional producer is bounded by its transaction timeout instead, and an abort
    // removes whatever of the transaction landed.
    let mut client = producer_config(&config.kafka, true);
    match transactional_id {
        Some(id) => {
            client
                .set("transactional.id", id)
                .set("transaction.timeout.ms", "60000")
                .set("message.timeout.ms", "55000");
        }
        None => {
            client.set("message.timeout.ms", "0");
        }
    }
    client
        .create_with_context(AckContext { acks: acks.clone() })
        .map_err(KafkaFlowError::at("create producer"))
}
