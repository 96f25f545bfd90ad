//! The polling relay: claim, publish in order, settle after acks.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::wire::envelope_headers;
use exactly_core::{
    ClaimRequest, Claimed, KeyMode, OutboxEvent, OutboxRecord, OutboxStatus, OutboxStore, RetryPolicy,
    RowState, Settlement, UnixMillis,
};
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use tokio::sync::watch;

use crate::config::{producer_config, Cluster, KafkaSettings};
use crate::error::KafkaFlowError;
use crate::faults::{FaultPoint, Faults};

/// How a relay runs.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// How to reach the cluster.
    pub kafka: KafkaSettings,
    /// This relay's name in `lease_owner`; unique per process.
    pub owner: String,
    /// Rows per claim.
    pub batch_size: usize,
    /// How long a claim is held before another relay may take the rows.
    pub lease_ms: i64,
    /// Longest sleep between claims when no notification arrives.
    pub poll_interval: Duration,
    /// How record keys are derived.
    pub keys: KeyMode,
    /// Rows with larger payloads are DEAD.
    pub max_payload_bytes: usize,
    /// Backoff and retry budget for publish failures.
    pub retry: RetryPolicy,
}

impl RelayConfig {
    /// Defaults for `kafka`, with a unique owner name.
    pub fn new(kafka: &(impl Cluster + ?Sized)) -> Self {
        RelayConfig {
            kafka: kafka.settings().into_owned(),
            owner: new_owner(),
            batch_size: 500,
            lease_ms: 30_000,
            poll_interval: Duration::from_millis(500),
            keys: KeyMode::EventId,
            max_payload_bytes: exactly_core::record::DEFAULT_MAX_PAYLOAD_BYTES,
            retry: RetryPolicy::default(),
        }
    }
}

/// A lease owner name no other relay, in this or any process, uses.
fn new_owner() -> String {
    format!("relay-{}-{}", std::process::id(), unique_suffix())
}

/// A name part no other client of this or any process shares: two clients started in the same
/// millisecond of one process (two stream processors, two relays) must not fence each other.
pub(crate) fn unique_suffix() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// The wall clock as the core's time type; only runtimes read clocks.
pub fn now() -> UnixMillis {
    UnixMillis(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0),
    )
}

/// Counters a caller can read while the relay runs.
#[derive(Debug, Default)]
pub struct RelayCounters {
    /// Records acknowledged by the broker (re-publishes included).
    pub published: AtomicU64,
    /// Publish attempts that failed.
    pub failed: AtomicU64,
    /// Rows marked DEAD.
    pub dead: AtomicU64,
}

/// Outcome of one claim-publish-settle round.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchReport {
    /// Rows claimed.
    pub claimed: usize,
    /// Acknowledged and marked SENT.
    pub sent: usize,
    /// Failed, back to NEW with a backoff.
    pub retrying: usize,
    /// Marked DEAD.
    pub dead: usize,
}

/// A claimed batch and when it was claimed.
struct Claim {
    rows: Vec<Claimed>,
    started: UnixMillis,
}

/// A published batch whose acks are awaited.
struct InFlight {
    claimed: usize,
    started: UnixMillis,
    lease_until: UnixMillis,
    settlements: Vec<Settlement>,
    deliveries: Vec<(OutboxRecord, rdkafka::producer::DeliveryFuture, Instant)>,
    /// Aggregates with a record the producer refused: their later records are held back.
    held: HashSet<(String, String)>,
}

/// Aggregates with a record whose delivery failed in a settled batch.
#[derive(Default)]
struct Failed {
    aggregates: HashSet<(String, String)>,
}

impl Failed {
    fn insert(&mut self, record: &OutboxRecord) {
        self.aggregates.insert((
            record.envelope.aggregate_type.clone(),
            record.envelope.aggregate_id.clone(),
        ));
    }

    fn any(&self) -> bool {
        !self.aggregates.is_empty()
    }
}

/// Moves outbox rows to Kafka. Every record is keyed by its aggregate id, so one aggregate's
/// events share a partition, and published in claim order.
///
/// Delivery guarantee: at-least-once into the topic. A crash after the broker's ack and before
/// the SENT mark republishes the rows when their lease expires; consumers drop the repeats by key.
pub struct Relay<S> {
    store: S,
    config: RelayConfig,
    producer: FutureProducer<crate::TokenContext>,
    faults: Faults,
    counters: Arc<RelayCounters>,
}

impl<S: OutboxStore> Relay<S> {
    /// A relay over `store`; creates its producer.
    pub fn new(store: S, config: RelayConfig) -> Result<Self, KafkaFlowError> {
        let producer = new_producer(&config)?;
        Ok(Relay {
            store,
            config,
            producer,
            faults: Faults::none(),
            counters: Arc::default(),
        })
    }

    /// Adds fault points (tests, demo).
    pub fn with_faults(mut self, faults: Faults) -> Self {
        self.faults = faults;
        self
    }

    /// Shares counters with the caller.
    pub fn with_counters(mut self, counters: Arc<RelayCounters>) -> Self {
        self.counters = counters;
        self
    }

    /// The store, for stats.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// One round: claim a batch, publish it in order, wait for every ack, settle.
    pub async fn run_once(&mut self) -> Result<BatchReport, KafkaFlowError> {
        let claimed = self.claim().await?;
        let batch = self.publish(claimed, &HashSet::new()).await;
        let (report, failed) = self.settle(batch).await?;
        if failed.any() {
            self.renew_producer()?;
        }
        Ok(report)
    }

    async fn claim(&self) -> Result<Claim, KafkaFlowError> {
        let started = now();
        let request = ClaimRequest {
            owner: self.config.owner.clone(),
            max_rows: self.config.batch_size,
            now: started,
            lease_ms: self.config.lease_ms,
            keys: self.config.keys.clone(),
            max_payload_bytes: self.config.max_payload_bytes,
        };
        let timer = Instant::now();
        let rows = self.store.claim(&request).await?;
        tracing::debug!(
            rows = rows.len(),
            ms = timer.elapsed().as_millis() as u64,
            "claimed"
        );
        Ok(Claim { rows, started })
    }

    /// Queues a claimed batch in order. `held` are aggregates with a record that failed in the
    /// batch settled just before: their records here are released unsent, to go out after it.
    async fn publish(&self, claim: Claim, held: &HashSet<(String, String)>) -> InFlight {
        let Claim { rows, started } = claim;
        let timer = Instant::now();
        let lease_until = started.plus_ms(self.config.lease_ms);
        let sequence_mode = matches!(self.config.keys, KeyMode::Sequence { .. });
        let mut batch = InFlight {
            claimed: rows.len(),
            started,
            lease_until,
            settlements: Vec::with_capacity(rows.len()),
            deliveries: Vec::with_capacity(rows.len()),
            held: held.clone(),
        };
        let mut stopped = false;
        for row in rows {
            match row {
                Claimed::Malformed {
                    id,
                    retry_count,
                    defect,
                } => {
                    let state = leased(retry_count, lease_until);
                    let dead = state
                        .apply(OutboxEvent::Reject, &self.config.retry)
                        .unwrap_or(state);
                    batch.settlements.push(Settlement {
                        id,
                        state: dead,
                        last_error: Some(defect.to_string()),
                    });
                }
                Claimed::Ready(record)
                    if stopped
                        || batch.held.contains(&(
                            record.envelope.aggregate_type.clone(),
                            record.envelope.aggregate_id.clone(),
                        )) =>
                {
                    // Sequence mode after a failure: leave the rest unsent; the next round starts
                    // again at the lowest unsent sequence (rewind, never skip). Event-id mode:
                    // the same for the rest of a held aggregate; the claim query keeps them back
                    // until the refused record, backing off, has gone out.
                    let state = leased(record.retry_count, lease_until);
                    let released = state
                        .apply(OutboxEvent::Release { now: started }, &self.config.retry)
                        .unwrap_or(state);
                    batch.settlements.push(Settlement {
                        id: record.id,
                        state: released,
                        last_error: None,
                    });
                }
                Claimed::Ready(record) => match self.send(&record).await {
                    Ok(delivery) => batch.deliveries.push((record, delivery, Instant::now())),
                    Err(error) => {
                        tracing::warn!(
                            "the producer refused outbox row {} ({}/{}): {error}; holding the aggregate's later rows",
                            record.id,
                            record.envelope.aggregate_type,
                            record.envelope.aggregate_id
                        );
                        batch.held.insert((
                            record.envelope.aggregate_type.clone(),
                            record.envelope.aggregate_id.clone(),
                        ));
                        batch.settlements.push(fail(
                            &record,
                            lease_until,
                            &error,
                            &self.config.retry,
                            started,
                        ));
                        stopped = sequence_mode;
                    }
                },
            }
        }
        tracing::debug!(ms = timer.elapsed().as_millis() as u64, "queued");
        batch
    }

    /// Waits for every ack of a published batch and settles it: SENT, back to NEW with a
    /// backoff, or DEAD. Also says whether a delivery failed (the producer is then renewed, once
    /// nothing else is in flight on it).
    async fn settle(&self, batch: InFlight) -> Result<(BatchReport, Failed), KafkaFlowError> {
        let InFlight {
            claimed,
            started,
            lease_until,
            mut settlements,
            deliveries,
            held: _,
        } = batch;
        let mut report = BatchReport {
            claimed,
            ..BatchReport::default()
        };
        if claimed == 0 {
            return Ok((report, Failed::default()));
        }
        let mut failed = Failed::default();
        let timer = Instant::now();
        for (record, delivery, sent_at) in deliveries {
            match delivery.await {
                Ok(Ok(_)) => {
                    metrics::histogram!("exactly_relay_publish_seconds")
                        .record(sent_at.elapsed().as_secs_f64());
                    self.counters.published.fetch_add(1, Ordering::Relaxed);
                    let state = RowState {
                        status: OutboxStatus::Sent,
                        retry_count: record.retry_count,
                        next_retry_at: lease_until,
                    };
                    settlements.push(Settlement {
                        id: record.id,
                        state,
                        last_error: None,
                    });
                }
                Ok(Err((error, _))) => {
                    failed.insert(&record);
                    settlements.push(fail(
                        &record,
                        lease_until,
                        &error.to_string(),
                        &self.config.retry,
                        started,
                    ));
                }
                Err(_) => {
                    failed.insert(&record);
                    settlements.push(fail(
                        &record,
                        lease_until,
                        "producer dropped the record",
                        &self.config.retry,
                        started,
                    ));
                }
            }
        }
        tracing::debug!(ms = timer.elapsed().as_millis() as u64, "acks awaited");
        if self.faults.fires(FaultPoint::RelayAfterPublishBeforeSettle) {
            return Err(KafkaFlowError::InjectedCrash(
                FaultPoint::RelayAfterPublishBeforeSettle,
            ));
        }
        if self.faults.fires(FaultPoint::RelaySettleFails) {
            return Err(KafkaFlowError::Store(exactly_core::StoreError::new(
                "settle",
                "injected: the database failed the settle",
            )));
        }
        let settled_at = now();
        let timer = Instant::now();
        self.store
            .settle(&self.config.owner, &settlements, settled_at)
            .await?;
        tracing::debug!(
            rows = settlements.len(),
            ms = timer.elapsed().as_millis() as u64,
            "settled"
        );
        for s in &settlements {
            match s.state.status {
                OutboxStatus::Sent => report.sent += 1,
                OutboxStatus::Dead => report.dead += 1,
                _ => report.retrying += 1,
            }
        }
        metrics::counter!("exactly_relay_published_total").increment(report.sent as u64);
        metrics::counter!("exactly_relay_failures_total").increment(report.retrying as u64);
        metrics::counter!("exactly_outbox_dead_total").increment(report.dead as u64);
        self.counters
            .failed
            .fetch_add(report.retrying as u64, Ordering::Relaxed);
        self.counters
            .dead
            .fetch_add(report.dead as u64, Ordering::Relaxed);
        Ok((report, failed))
    }

    /// A failed delivery may leave an idempotent producer in a state that refuses the resend
    /// (or, without gapless, has skipped a sequence): start over with a fresh one.
    fn renew_producer(&mut self) -> Result<(), KafkaFlowError> {
        self.producer = new_producer(&self.config)?;
        Ok(())
    }

    /// Runs rounds until `stop` turns true. In event-id mode the rounds overlap: while a full
    /// batch is in flight, the next one is claimed (on one database connection) as the first's
    /// acks are awaited and it is settled (on another); then the next one is queued. The claim
    /// query does not let this relay's own leased rows hold their aggregates, so the next batch
    /// may carry later records of an aggregate in flight; if one of its records failed or was
    /// refused, those later records are released unsent, and go out after its retry.
    /// Sequence mode runs one round at a time: its claim resumes at the lowest unsent sequence,
    /// which includes the rows in flight. A batch that is not full is settled at once, and the
    /// relay waits for a NOTIFY or the poll interval. A retryable database error (PostgreSQL
    /// restarting) backs off and tries again: rows claimed before it stay leased, and are
    /// published again once the lease expires, never skipped.
    pub async fn run(&mut self, mut stop: watch::Receiver<bool>) -> Result<(), KafkaFlowError> {
        let overlap = matches!(self.config.keys, KeyMode::EventId);
        let mut store_failures = 0u32;
        let mut in_flight: Option<InFlight> = None;
        while !*stop.borrow() {
            let round = self.overlapped_round(&mut in_flight, overlap).await;
            let wait = match round {
                Ok(wait) => {
                    store_failures = 0;
                    wait
                }
                Err(KafkaFlowError::Store(e)) if e.is_retryable() => {
                    store_failures += 1;
                    tracing::warn!("database error (retrying): {e}");
                    // Rows this relay claimed and did not settle stay leased and will go out
                    // again when the lease expires. Under its own name they would not hold their
                    // aggregates (a relay's own leases are rows in flight), so the next claim could
                    // send their aggregates' later rows first. A new name makes them another
                    // owner's leases: their aggregates wait for them.
                    self.config.owner = new_owner();
                    metrics::counter!("exactly_relay_store_errors_total").increment(1);
                    let delay = self.config.retry.backoff_ms(store_failures.min(10)).max(50) as u64;
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(delay)) => {}
                        _ = stop.changed() => {}
                    }
                    continue;
                }
                Err(e) => return Err(e),
            };
            if wait {
                tokio::select! {
                    _ = self.store.wait_for_rows(self.config.poll_interval) => {}
                    _ = stop.changed() => {}
                }
            }
        }
        if let Some(batch) = in_flight.take() {
            self.settle(batch).await?;
        }
        Ok(())
    }

    /// Claims a batch while settling the one in flight, then queues it. Keeps it in flight when
    /// it is full and nothing is held; returns whether the relay should wait for new rows. On
    /// an error, what was claimed or in flight stays leased and goes out again after its lease.
    async fn overlapped_round(
        &mut self,
        in_flight: &mut Option<InFlight>,
        overlap: bool,
    ) -> Result<bool, KafkaFlowError> {
        // A batch stays in flight only when nothing in it was refused (see below), so what holds
        // aggregates in the next batch is only what failed in it.
        let previous = in_flight.take();
        let settle_previous = async {
            match previous {
                Some(batch) => self.settle(batch).await.map(|(_, failed)| failed),
                None => Ok(Failed::default()),
            }
        };
        let (claimed, failed) = tokio::join!(self.claim(), settle_previous);
        let failed = failed?;
        let claimed = claimed?;
        if failed.any() {
            // Nothing is in flight on the producer now, so it can be replaced.
            self.renew_producer()?;
        }
        let current = self.publish(claimed, &failed.aggregates).await;
        let full = current.claimed >= self.config.batch_size;
        if overlap && full && current.held.is_empty() {
            *in_flight = Some(current);
            return Ok(false);
        }
        let (report, failed) = self.settle(current).await?;
        if failed.any() {
            self.renew_producer()?;
        }
        Ok(report.claimed < self.config.batch_size || report.retrying > 0)
    }

    /// Queues one record. A full queue is waited out (up to [`QUEUE_FULL_WAIT`]): the records
    /// ahead drain as the broker acknowledges them.
    async fn send(&self, record: &OutboxRecord) -> Result<rdkafka::producer::DeliveryFuture, String> {
        if self.faults.fires(FaultPoint::RelaySendRefused) {
            return Err("injected: the producer refused the record".to_owned());
        }
        let envelope = &record.envelope;
        let headers = envelope_headers(envelope, &record.key, &[]);
        let mut kafka_record = FutureRecord::to(&record.topic)
            .key(envelope.aggregate_id.as_bytes())
            .payload(&envelope.payload)
            .headers(headers)
            .timestamp(envelope.occurred_at.0);
        let deadline = Instant::now() + QUEUE_FULL_WAIT;
        loop {
            match self.producer.send_result(kafka_record) {
                Ok(delivery) => return Ok(delivery),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                    if Instant::now() < deadline =>
                {
                    kafka_record = back;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Err((e, _)) => return Err(e.to_string()),
            }
        }
    }

    /// Waits for everything queued to be delivered (shutdown).
    pub fn flush(&self, timeout: Duration) {
        let _ = self.producer.flush(timeout);
    }
}

/// How long a send waits for room in a full producer queue before the record counts as refused.
const QUEUE_FULL_WAIT: Duration = Duration::from_secs(10);

fn new_producer(config: &RelayConfig) -> Result<FutureProducer<crate::TokenContext>, KafkaFlowError> {
    let gapless = matches!(config.keys, KeyMode::Sequence { .. });
    producer_config(&config.kafka, gapless)
        .create_with_context(crate::TokenContext)
        .map_err(KafkaFlowError::at("create producer"))
}

fn leased(retry_count: u32, lease_until: UnixMillis) -> RowState {
    RowState {
        status: OutboxStatus::Sending,
        retry_count,
        next_retry_at: lease_until,
    }
}

fn fail(
    record: &OutboxRecord,
    lease_until: UnixMillis,
    error: &str,
    retry: &RetryPolicy,
    now: UnixMillis,
) -> Settlement {
    let state = leased(record.retry_count, lease_until);
    let next = state.apply(OutboxEvent::Fail { now }, retry).unwrap_or(state);
    Settlement {
        id: record.id,
        state: next,
        last_error: Some(error.to_owned()),
    }
}
