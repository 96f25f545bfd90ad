//! The exactly-once mode of the WAL relay: its transactional producer, the Kafka transaction
//! that holds whole source transactions and one progress record, its commit (then the slot is
//! confirmed) and its rewind (abort, or fence by a new producer, then resume at the last
//! committed progress).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use exactly_core::wal::{CommitTracker, TxnId};
use exactly_core::ChangeFeed;
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};

use crate::eos::{self, ExactlyOnce};
use crate::error::KafkaFlowError;
use crate::faults::FaultPoint;

use super::*;

/// The open Kafka transaction of the exactly-once mode.
pub(super) struct EosState {
    pub(super) settings: ExactlyOnce,
    /// A Kafka transaction is open.
    pub(super) open: bool,
    pub(super) started: Instant,
    /// Source transactions and events in the open Kafka transaction.
    pub(super) transactions: u64,
    pub(super) events: u64,
    /// End of the last whole source transaction in the open Kafka transaction.
    pub(super) last_end: Option<u64>,
    /// The last end position committed to Kafka with its progress record.
    pub(super) committed: Option<u64>,
    /// Kafka transactions begun (for the abort_every test fault).
    pub(super) begun: u64,
    /// Whether read_committed readers of this broker miss aborted records (probed on start).
    pub(super) broker_hides_aborted: bool,
    /// The open transaction's progress record was acknowledged.
    pub(super) progress_acked: bool,
}

impl<F: ChangeFeed> WalRelay<F> {
    /// Switches to exactly-once delivery into Kafka: a transactional producer (fencing any
    /// earlier one with the same id), whole source transactions plus a progress record per
    /// Kafka transaction, and the slot confirmed only after the commit. Resumes where the
    /// progress topic says, read with read_committed, when the broker hides aborted records;
    /// otherwise (Tansu 0.6.0) at the slot's confirmed position, which may resend the last
    /// committed batch (consumers drop the repeats) but never skips one.
    /// Needs a multi-threaded tokio runtime (transactional calls block).
    pub async fn exactly_once(mut self, settings: ExactlyOnce) -> Result<Self, KafkaFlowError> {
        crate::admin::ensure_internal_topics(
            &self.config.kafka,
            &[crate::InternalTopic {
                name: settings.progress_topic.clone(),
                partitions: 1,
                replication_factor: settings.replication_factor,
                min_insync_replicas: settings.min_insync_replicas,
                compacted: true,
            }],
        )
        .await?;
        let kafka = self.config.kafka.clone();
        let topic = settings.progress_topic.clone();
        let hides = tokio::task::spawn_blocking(move || eos::broker_hides_aborted_records(&kafka, &topic))
            .await
            .map_err(|e| KafkaFlowError::Feed(format!("abort probe task failed: {e}")))??;
        if !hides {
            tracing::warn!(
                "the broker shows aborted records to read_committed readers: resuming from the slot, not the progress topic"
            );
        }
        self.producer = new_producer(&self.config, &self.ack_sender, Some(&settings.transactional_id))?;
        init_transactions(&self.producer)?;
        self.eos = Some(EosState {
            settings,
            open: false,
            started: Instant::now(),
            transactions: 0,
            events: 0,
            last_end: None,
            committed: None,
            begun: 0,
            broker_hides_aborted: hides,
            progress_acked: false,
        });
        let resume = self.committed_progress().await?;
        if let Some(eos) = self.eos.as_mut() {
            eos.committed = resume;
        }
        if resume.is_some() {
            self.feed.restart(resume).await?;
        }
        Ok(self)
    }

    /// Whether this broker hides aborted records from read_committed readers (exactly-once
    /// mode only; None otherwise).
    pub fn broker_hides_aborted_records(&self) -> Option<bool> {
        self.eos.as_ref().map(|e| e.broker_hides_aborted)
    }

    /// Where Kafka says this source stands, if the broker can be trusted to say it.
    pub(super) async fn committed_progress(&self) -> Result<Option<u64>, KafkaFlowError> {
        let Some(eos) = &self.eos else { return Ok(None) };
        if !eos.broker_hides_aborted {
            return Ok(None);
        }
        let (kafka, topic, source) = (
            self.config.kafka.clone(),
            eos.settings.progress_topic.clone(),
            self.source.clone(),
        );
        let position = tokio::task::spawn_blocking(move || eos::committed_progress(&kafka, &topic, &source))
            .await
            .map_err(|e| KafkaFlowError::Feed(format!("progress read task failed: {e}")))??;
        metrics::gauge!("exactly_eos_progress_position").set(position.unwrap_or(0) as f64);
        Ok(position)
    }

    /// Exactly-once rewind: abort the open Kafka transaction (or, when its outcome is unknown,
    /// recreate the producer, which fences and aborts the old one), then restart the feed at the
    /// last committed progress.
    pub(super) async fn eos_rewind(&mut self, recreate: bool) -> Result<(), KafkaFlowError> {
        let open = self.eos.as_ref().is_some_and(|e| e.open);
        let mut recreate = recreate;
        if open && !recreate {
            if self.faults.fires(FaultPoint::EosDuringAbort) {
                return Err(KafkaFlowError::InjectedCrash(FaultPoint::EosDuringAbort));
            }
            let timer = Instant::now();
            match tokio::task::block_in_place(|| self.producer.abort_transaction(TXN_TIMEOUT)) {
                Ok(()) => {
                    metrics::counter!("exactly_eos_transactions_aborted_total").increment(1);
                    metrics::histogram!("exactly_eos_transaction_seconds")
                        .record(timer.elapsed().as_secs_f64());
                }
                Err(e) => {
                    if let eos::TxnFailure::Fatal(why) = eos::classify(&e) {
                        return Err(KafkaFlowError::Fenced(why));
                    }
                    tracing::warn!("abort failed, recreating the producer: {e}");
                    recreate = true;
                }
            }
        }
        if recreate {
            let transactional_id = self
                .eos
                .as_ref()
                .map(|e| e.settings.transactional_id.clone())
                .unwrap_or_default();
            self.producer = new_producer(&self.config, &self.ack_sender, Some(&transactional_id))?;
            init_transactions(&self.producer)?;
            if open {
                metrics::counter!("exactly_eos_transactions_aborted_total").increment(1);
            }
        }
        let resume = if recreate {
            // The last commit may have landed although it reported a timeout: ask Kafka.
            match self.committed_progress().await? {
                Some(p) => Some(p),
                None => self.eos.as_ref().and_then(|e| e.committed),
            }
        } else {
            self.eos.as_ref().and_then(|e| e.committed)
        };
        if let Some(eos) = self.eos.as_mut() {
            eos.open = false;
            eos.transactions = 0;
            eos.events = 0;
            eos.last_end = None;
            eos.committed = resume.or(eos.committed);
        }
        self.generation += 1;
        self.tracker = CommitTracker::new();
        self.open_commit = None;
        self.sent_ids.clear();
        self.restart_feed(resume).await
    }

    /// True when the open Kafka transaction should commit now (only between source transactions).
    pub(super) fn eos_due(&self) -> bool {
        self.open_commit.is_none()
            && self.eos.as_ref().is_some_and(|e| {
                e.open
                    && e.last_end.is_some()
                    && (e.started.elapsed() >= e.settings.commit_interval
                        || e.events >= e.settings.max_batch_events)
            })
    }

    /// Writes the progress record and commits the Kafka transaction, then confirms the source.
    /// `Ok(Err(why))` asks for a rewind; a fenced producer is an error that stops the relay.
    pub(super) async fn eos_commit(&mut self) -> Result<Result<(), String>, KafkaFlowError> {
        let Some(eos) = self.eos.as_mut() else {
            return Ok(Ok(()));
        };
        let Some(end) = eos.last_end else {
            return Ok(Ok(()));
        };
        if eos
            .settings
            .abort_every
            .is_some_and(|n| n > 0 && eos.begun % n == 0)
        {
            return Ok(Err("test fault: aborting this transaction on purpose".into()));
        }
        let progress = eos::progress_value(&self.source, end);
        eos.progress_acked = false;
        let record = BaseRecord::with_opaque_to(
            &eos.settings.progress_topic,
            Box::new(DeliveryTag {
                generation: self.generation,
                txn: TxnId(u64::MAX),
                outbox_id: PROGRESS_RECORD,
            }),
        )
        .key(self.source.as_bytes())
        .payload(progress.as_bytes())
        .partition(0);
        if let Err((e, _)) = self.producer.send(record) {
            return Ok(Err(format!("cannot send the progress record: {e}")));
        }
        if self.faults.fires(FaultPoint::EosBeforeCommit) {
            return Err(KafkaFlowError::InjectedCrash(FaultPoint::EosBeforeCommit));
        }
        let started = eos.started;
        let batch_events = eos.events;
        // Wait for the acks here instead of inside commit_transaction: rdkafka's flush there
        // sleeps in 100 ms polls while the producer's own thread takes the reports, which
        // would cost every transaction 100 ms.
        let flushed = Instant::now();
        while self.tracker.outstanding() > 0 || !self.eos.as_ref().is_some_and(|e| e.progress_acked) {
            match tokio::time::timeout(TXN_TIMEOUT, self.acks.recv()).await {
                Ok(Some(ack)) => {
                    if let Err(why) = self.on_ack(ack) {
                        return Ok(Err(why));
                    }
                }
                Ok(None) | Err(_) => return Ok(Err("acks did not arrive before the commit".into())),
            }
        }
        while self.producer.in_flight_count() > 0 && flushed.elapsed() < TXN_TIMEOUT {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let commit_started = Instant::now();
        let committed = tokio::task::block_in_place(|| self.producer.commit_transaction(TXN_TIMEOUT));
        tracing::debug!(
            "kafka transaction of {batch_events} events: open {:?}, commit {:?}",
            commit_started - started,
            commit_started.elapsed()
        );
        if let Err(e) = committed {
            return match eos::classify(&e) {
                eos::TxnFailure::Fatal(why) => Err(KafkaFlowError::Fenced(why)),
                eos::TxnFailure::Abortable(why) => Ok(Err(why)),
                eos::TxnFailure::Indefinite(why) => {
                    tracing::warn!("commit outcome unknown ({why}): recreating the producer");
                    self.eos_rewind(true).await?;
                    Ok(Ok(()))
                }
            };
        }
        metrics::counter!("exactly_eos_transactions_committed_total").increment(1);
        metrics::histogram!("exactly_eos_transaction_seconds").record(started.elapsed().as_secs_f64());
        metrics::gauge!("exactly_eos_progress_position").set(end as f64);
        if self.faults.fires(FaultPoint::EosAfterCommitBeforeConfirm) {
            return Err(KafkaFlowError::InjectedCrash(
                FaultPoint::EosAfterCommitBeforeConfirm,
            ));
        }
        self.feed.confirm(end);
        let Some(eos) = self.eos.as_mut() else {
            return Ok(Ok(()));
        };
        self.counters.confirmed_position.store(end, Ordering::Relaxed);
        self.counters
            .transactions
            .fetch_add(eos.transactions, Ordering::Relaxed);
        self.counters.events.fetch_add(eos.events, Ordering::Relaxed);
        metrics::counter!("exactly_wal_transactions_total").increment(eos.transactions);
        metrics::counter!("exactly_wal_events_total").increment(eos.events);
        eos.open = false;
        eos.transactions = 0;
        eos.events = 0;
        eos.last_end = None;
        eos.committed = Some(end);
        // Acks of the committed transaction are settled by the commit; later ones are ignored.
        self.generation += 1;
        self.tracker = CommitTracker::new();
        if !self.sent_ids.is_empty() {
            self.feed.mark_sent(std::mem::take(&mut self.sent_ids));
        }
        Ok(Ok(()))
    }
}

pub(super) const TXN_TIMEOUT: Duration = Duration::from_secs(30);

pub(super) fn init_transactions(producer: &ThreadedProducer<AckContext>) -> Result<(), KafkaFlowError> {
    tokio::task::block_in_place(|| producer.init_transactions(TXN_TIMEOUT))
        .map_err(KafkaFlowError::at("init transactions"))
}
