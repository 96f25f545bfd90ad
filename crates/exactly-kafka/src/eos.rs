//! Exactly-once into Kafka for the WAL relay: settings, the progress record written in every
//! Kafka transaction, reading it back on start, and what a transactional error means.

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};

use crate::config::{producer_config, reader_config, Cluster, KafkaSettings};
use crate::error::KafkaFlowError;

/// How the exactly-once WAL relay commits.
#[derive(Debug, Clone)]
pub struct ExactlyOnce {
    /// The producer's transactional.id; derived from the source so that a second relay on the
    /// same slot fences the first.
    pub transactional_id: String,
    /// Compacted single-partition topic holding (source → last committed end position).
    pub progress_topic: String,
    /// Replication factor of the progress topic when the relay creates it.
    pub replication_factor: i32,
    /// Its `min.insync.replicas`.
    pub min_insync_replicas: i32,
    /// A Kafka transaction is committed at the first source-transaction boundary after this.
    pub commit_interval: Duration,
    /// …or once it holds this many events.
    pub max_batch_events: u64,
    /// Test fault: abort every n-th Kafka transaction on purpose (exercises the abort path).
    pub abort_every: Option<u64>,
}

impl ExactlyOnce {
    /// Defaults for `source`: 100 ms commit interval, progress topic `exactly-progress`.
    pub fn for_source(source: &str) -> Self {
        ExactlyOnce {
            transactional_id: format!("exactly-wal-{source}"),
            progress_topic: "exactly-progress".to_owned(),
            replication_factor: 1,
            min_insync_replicas: 1,
            commit_interval: Duration::from_millis(100),
            max_batch_events: 50_000,
            abort_every: None,
        }
    }
}

/// The progress record's value: where the source stands once this transaction commits.
pub(crate) fn progress_value(source: &str, end_position: u64) -> String {
    serde_json::json!({ "source": source, "end_position": end_position }).to_string()
}

fn parse_progress(payload: &[u8]) -> Option<(String, u64)> {
    let value: serde_json::Value = serde_json::from_slice(payload).ok()?;
    Some((
        value.get("source")?.as_str()?.to_owned(),
        value.get("end_position")?.as_u64()?,
    ))
}

/// What a failed transactional call asks for.
#[derive(Debug)]
pub(crate) enum TxnFailure {
    /// Abort the transaction, rewind to the last committed progress, resend.
    Abortable(String),
    /// The producer is fenced or broken for good: stop with this message.
    Fatal(String),
    /// The outcome is unknown (a timeout): recreate the producer, find the committed progress
    /// again, and rewind there.
    Indefinite(String),
}

/// True when `result` failed because a newer producer with the same transactional.id exists.
pub fn is_fenced(result: &Result<(), KafkaError>) -> bool {
    match result {
        Err(KafkaError::Transaction(e)) => {
            e.is_fatal()
                || matches!(
                    e.code(),
                    rdkafka::types::RDKafkaErrorCode::ProducerFenced
                        | rdkafka::types::RDKafkaErrorCode::InvalidProducerEpoch
                )
                || e.string().contains("fences the current one")
        }
        _ => false,
    }
}

/// True when an error text says a newer producer took over (librdkafka reports a fenced
/// produce as abortable; aborting then would only fail or, after a retry, fence the other).
pub(crate) fn mentions_fencing(text: &str) -> bool {
    text.contains("fences the current one") || text.contains("ProducerFenced") || text.contains("fenced")
}

pub(crate) fn classify(error: &KafkaError) -> TxnFailure {
    match error {
        _ if is_fenced(&Err(error.clone()))
            && !matches!(error, KafkaError::Transaction(e) if e.is_retriable()) =>
        {
            TxnFailure::Fatal(error.to_string())
        }
        KafkaError::Transaction(e) if e.is_fatal() => TxnFailure::Fatal(error.to_string()),
        KafkaError::Transaction(e) if e.txn_requires_abort() => TxnFailure::Abortable(error.to_string()),
        _ => TxnFailure::Indefinite(error.to_string()),
    }
}

/// Reaching the end of the progress partition is the goal, not an error worth a log line.
pub struct QuietEof;

impl rdkafka::ClientContext for QuietEof {
    crate::oauth::oauth_token_refresh!();

    fn error(&self, error: KafkaError, reason: &str) {
        let end_of_partition = matches!(
            error,
            KafkaError::PartitionEOF(_) | KafkaError::Global(rdkafka::types::RDKafkaErrorCode::PartitionEOF)
        );
        if !end_of_partition {
            tracing::error!("librdkafka: {error}: {reason}");
        }
    }
}

impl rdkafka::consumer::ConsumerContext for QuietEof {}

fn reader(kafka: &KafkaSettings) -> Result<BaseConsumer<QuietEof>, KafkaFlowError> {
    reader_config(kafka, "exactly-progress-reader", "read_committed")
        .create_with_context(QuietEof)
        .map_err(KafkaFlowError::at("create progress reader"))
}

/// Every (key, value) of partition 0 of `topic`, read_committed, from the beginning to the end.
fn read_all(kafka: &KafkaSettings, topic: &str) -> Result<Vec<Vec<u8>>, KafkaFlowError> {
    let consumer = reader(kafka)?;
    let mut list = TopicPartitionList::new();
    list.add_partition_offset(topic, 0, Offset::Beginning)
        .map_err(KafkaFlowError::at("assign progress partition"))?;
    consumer
        .assign(&list)
        .map_err(KafkaFlowError::at("assign progress partition"))?;
    let mut values = Vec::new();
    crate::scan::read_assigned(&consumer, topic, 1, Duration::from_secs(30), |m| {
        values.push(m.payload().unwrap_or_default().to_vec());
        Ok(())
    })?;
    Ok(values)
}

/// The last committed end position of `source` in the progress topic.
pub(crate) fn committed_progress(
    kafka: &KafkaSettings,
    topic: &str,
    source: &str,
) -> Result<Option<u64>, KafkaFlowError> {
    let last = read_all(kafka, topic)?
        .iter()
        .filter_map(|v| parse_progress(v))
        .filter(|(s, _)| s == source)
        .map(|(_, p)| p)
        .next_back();
    Ok(last)
}

/// Every source's last end position in a progress topic, as a read_committed reader sees it
/// (`exactly status`). On a broker that shows aborted records (Tansu 0.6.0) an aborted
/// transaction's position can show here; the relay itself then resumes from the slot.
pub fn progress_positions(
    kafka: &(impl Cluster + ?Sized),
    topic: &str,
) -> Result<std::collections::BTreeMap<String, u64>, KafkaFlowError> {
    Ok(read_all(&kafka.settings(), topic)?
        .iter()
        .filter_map(|v| parse_progress(v))
        .collect())
}

/// A probe's own text, unique to this process and call.
fn probe_nonce() -> String {
    format!(
        "exactly-abort-probe-{}-{}",
        std::process::id(),
        crate::relay::unique_suffix()
    )
}

/// A probe's transactional producer (`transactional_id`), initialised: its start aborts what an
/// earlier producer of the same id left open.
fn probe_producer(
    kafka: &KafkaSettings,
    transactional_id: &str,
) -> Result<ThreadedProducer<crate::TokenContext>, KafkaFlowError> {
    let producer: ThreadedProducer<crate::TokenContext> = producer_config(kafka, false)
        .set("transactional.id", transactional_id)
        .set("transaction.timeout.ms", "10000")
        .set("message.timeout.ms", "10000")
        .create_with_context(crate::TokenContext)
        .map_err(KafkaFlowError::at("create probe producer"))?;
    producer
        .init_transactions(PROBE_CALL)
        .map_err(KafkaFlowError::at("probe: init transactions"))?;
    Ok(producer)
}

/// Begins a transaction and writes `payload` to partition 0 of `topic` in it, flushed.
fn probe_write(
    producer: &ThreadedProducer<crate::TokenContext>,
    topic: &str,
    payload: &str,
) -> Result<(), KafkaFlowError> {
    producer
        .begin_transaction()
        .map_err(KafkaFlowError::at("probe: begin"))?;
    producer
        .send(
            BaseRecord::<str, str>::to(topic)
                .key("exactly-abort-probe")
                .payload(payload)
                .partition(0),
        )
        .map_err(|(e, _)| KafkaFlowError::Kafka {
            context: "probe: send",
            source: e,
        })?;
    producer
        .flush(PROBE_CALL)
        .map_err(KafkaFlowError::at("probe: flush"))
}

/// Broker calls of a probe.
const PROBE_CALL: Duration = Duration::from_secs(30);
/// How long the proven probe waits for its committed sentinel to become readable.
const PROBE_WAIT: Duration = Duration::from_secs(60);

/// Writes a record in a transaction, aborts it, and reads the topic read_committed: true if the
/// aborted record stays hidden, as Kafka guarantees. Tansu 0.6.0 shows it. (The exactly-once
/// relay's probe; a stream processor proves it with
/// [`prove_broker_hides_aborted_records`].)
pub fn broker_hides_aborted_records(
    kafka: &(impl Cluster + ?Sized),
    topic: &str,
) -> Result<bool, KafkaFlowError> {
    let kafka = kafka.settings();
    let nonce = probe_nonce();
    let producer = probe_producer(&kafka, &nonce)?;
    probe_write(&producer, topic, &nonce)?;
    producer
        .abort_transaction(PROBE_CALL)
        .map_err(KafkaFlowError::at("probe: abort"))?;
    let visible = read_all(&kafka, topic)?
        .iter()
        .any(|v| v.as_slice() == nonce.as_bytes());
    Ok(!visible)
}

/// Whether this broker hides records of aborted transactions from read_committed readers, as
/// Kafka guarantees (Tansu 0.6.0 shows them). Proven, not inferred: a transactional producer
/// (`transactional_id`, so that its start aborts what an earlier probe of the same id left
/// open) writes a record to partition 0 of `topic` and aborts, then writes a sentinel and
/// commits; a read_committed reader reads from the partition's end before the probe until the
/// sentinel (see [`exactly_core::changelog::probe_verdict`]). `topic` must be one no other
/// long transaction writes: an open one holds the sentinel back. Only the probe's own records
/// are held, so a long partition costs no memory. An error, never a guess, when the sentinel
/// does not show within a minute.
pub fn prove_broker_hides_aborted_records(
    kafka: &(impl Cluster + ?Sized),
    topic: &str,
    transactional_id: &str,
) -> Result<bool, KafkaFlowError> {
    use exactly_core::changelog::{probe_verdict, ProbeRead};
    let kafka = kafka.settings();
    let nonce = probe_nonce();
    let (aborted, sentinel) = (format!("{nonce}-aborted"), format!("{nonce}-committed"));
    let producer = probe_producer(&kafka, transactional_id)?;
    let consumer = reader(&kafka)?;
    let (_, start) = consumer
        .fetch_watermarks(topic, 0, PROBE_CALL)
        .map_err(KafkaFlowError::at("probe: partition end"))?;
    probe_write(&producer, topic, &aborted)?;
    producer
        .abort_transaction(PROBE_CALL)
        .map_err(KafkaFlowError::at("probe: abort"))?;
    probe_write(&producer, topic, &sentinel)?;
    producer
        .commit_transaction(PROBE_CALL)
        .map_err(KafkaFlowError::at("probe: commit"))?;
    let mut list = TopicPartitionList::new();
    list.add_partition_offset(topic, 0, Offset::Offset(start))
        .map_err(KafkaFlowError::at("probe: assign"))?;
    consumer
        .assign(&list)
        .map_err(KafkaFlowError::at("probe: assign"))?;
    let mut reads = Vec::new();
    let deadline = std::time::Instant::now() + PROBE_WAIT;
    while std::time::Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                // Only the probe's own records are kept: others say nothing about it.
                let payload = m.payload().unwrap_or_default();
                if payload == aborted.as_bytes() {
                    reads.push(ProbeRead::Aborted);
                } else if payload == sentinel.as_bytes() {
                    reads.push(ProbeRead::Sentinel);
                }
                if let Some(hides) = probe_verdict(reads.iter().copied()) {
                    return Ok(hides);
                }
            }
            Some(Err(e)) => tracing::debug!("probe read of {topic}: {e}"),
            None => {}
        }
    }
    Err(KafkaFlowError::Feed(format!(
        "the abort probe's committed record on {topic} did not become readable within {PROBE_WAIT:?}, so \
         whether this broker hides aborted records cannot be told (a transaction left open on the partition \
         holds read_committed readers back); nothing was assumed"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_values_round_trip_and_garbage_is_skipped() {
        let v = progress_value("pg:1:slot", 42);
        assert_eq!(parse_progress(v.as_bytes()), Some(("pg:1:slot".into(), 42)));
        assert_eq!(parse_progress(b"exactly-abort-probe-1"), None);
    }
}
