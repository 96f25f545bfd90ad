//! The table side of the sink: one append at a time (park what does not fit, write the Parquet
//! files, commit them with the positions) runs on its own task while the loop reads and judges
//! the next batch, so reading does not wait on Parquet encoding and the log.
//!
//! The next append starts only after the running one ended; it starts from the positions the
//! running one reached, and checks them against the log like any other, so a running append
//! that failed makes the next one fail too (and the loop reads the positions from the log
//! again, dropping both).

use std::time::{Duration, Instant};

use deltalake::arrow::record_batch::RecordBatch;
use exactly_kafka::{FaultPoint, Faults};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::task::JoinHandle;

use crate::table::{AppendError, Appended, DeltaTarget};
use crate::DeltaSinkError;

/// A record that does not fit the layout, with where it came from and why.
pub(crate) struct Parked {
    pub(crate) topic: String,
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    pub(crate) key: Option<Vec<u8>>,
    pub(crate) payload: Vec<u8>,
    pub(crate) reason: String,
}

/// How far one append moves one partition: from `base` (what the log must still say) to
/// `next`.
#[derive(Debug, Clone)]
pub(crate) struct Move {
    pub(crate) topic: String,
    pub(crate) partition: i32,
    pub(crate) base: i64,
    pub(crate) next: i64,
}

/// One batch to append.
pub(crate) struct Job {
    pub(crate) rows: RecordBatch,
    pub(crate) moves: Vec<Move>,
    pub(crate) parked: Vec<Parked>,
}

/// What an append moves, kept by the loop while it runs.
pub(crate) struct Started {
    pub(crate) moves: Vec<Move>,
    pub(crate) written: u64,
    pub(crate) parked: u64,
    pub(crate) at: Instant,
}

/// How an append ended.
pub(crate) struct Outcome {
    pub(crate) result: Result<Appended, AppendError>,
    pub(crate) started: Started,
}

type Running = JoinHandle<(DeltaTarget, Result<Appended, AppendError>)>;

/// The table, and the append running on it, if any.
pub(crate) struct Appender {
    target: Option<DeltaTarget>,
    running: Option<(Running, Started)>,
    ended: Option<Outcome>,
    producer: FutureProducer<exactly_kafka::TokenContext>,
    dead_letter_topic: String,
    faults: Faults,
}

impl Appender {
    pub(crate) fn new(
        target: DeltaTarget,
        producer: FutureProducer<exactly_kafka::TokenContext>,
        dead_letter_topic: String,
        faults: Faults,
    ) -> Self {
        Appender {
            target: Some(target),
            running: None,
            ended: None,
            producer,
            dead_letter_topic,
            faults,
        }
    }

    /// Whether an append is running.
    pub(crate) fn running(&self) -> bool {
        self.running.is_some()
    }

    /// Whether an append ended and its outcome waits to be taken ([`Appender::idle`] returns
    /// it without waiting).
    pub(crate) fn ended(&self) -> bool {
        self.ended.is_some() || self.running.as_ref().is_some_and(|(task, _)| task.is_finished())
    }

    /// Waits for the running append to end, if any, keeping its outcome for
    /// [`Appender::idle`]. Cancel-safe: dropped before the append ends, it waits again next
    /// time.
    pub(crate) async fn finish(&mut self) -> Result<(), DeltaSinkError> {
        let Some((task, _)) = self.running.as_mut() else {
            return Ok(());
        };
        let joined = task.await;
        let Some((_, started)) = self.running.take() else {
            return Ok(());
        };
        let (target, result) = joined.map_err(|e| DeltaSinkError::Appender(e.to_string()))?;
        self.target = Some(target);
        self.ended = Some(Outcome { result, started });
        Ok(())
    }

    /// Waits for the running append, if any, and returns how the last append ended (if not
    /// returned before) and the table.
    pub(crate) async fn idle(&mut self) -> Result<(Option<Outcome>, &mut DeltaTarget), DeltaSinkError> {
        self.finish().await?;
        let outcome = self.ended.take();
        match self.target.as_mut() {
            Some(target) => Ok((outcome, target)),
            None => Err(DeltaSinkError::Appender(
                "the table was lost with a failed append".into(),
            )),
        }
    }

    /// Starts appending `job` (after [`Appender::idle`]: an append already running is a bug
    /// of the loop, refused).
    pub(crate) fn start(&mut self, job: Job) -> Result<(), DeltaSinkError> {
        if self.ended.is_some() {
            return Err(DeltaSinkError::Appender(
                "an append started before the last one's outcome was taken".into(),
            ));
        }
        let Some(target) = self.target.take() else {
            return Err(DeltaSinkError::Appender(
                "an append started while another ran".into(),
            ));
        };
        let started = Started {
            moves: job.moves.clone(),
            written: job.rows.num_rows() as u64,
            parked: job.parked.len() as u64,
            at: Instant::now(),
        };
        let (producer, topic, faults) = (
            self.producer.clone(),
            self.dead_letter_topic.clone(),
            self.faults.clone(),
        );
        let task = tokio::spawn(async move {
            let mut target = target;
            let result = append(&mut target, job, &producer, &topic, &faults).await;
            (target, result)
        });
        self.running = Some((task, started));
        Ok(())
    }
}

/// Checks the log still holds each partition where the batch starts, parks what does not fit
/// (acknowledged before the append), then appends the rows with the positions they reached.
async fn append(
    target: &mut DeltaTarget,
    job: Job,
    producer: &FutureProducer<exactly_kafka::TokenContext>,
    dead_letter_topic: &str,
    faults: &Faults,
) -> Result<Appended, AppendError> {
    let started = Instant::now();
    for m in &job.moves {
        let log = target
            .position(&m.topic, m.partition)
            .await
            .map_err(AppendError::Failed)?
            .unwrap_or(0);
        if log != m.base {
            return Err(AppendError::Conflict(format!(
                "{}/{}: the log moved to {log} while this sink read from {}",
                m.topic, m.partition, m.base
            )));
        }
    }
    for p in &job.parked {
        park(producer, dead_letter_topic, p)
            .await
            .map_err(|e| AppendError::Failed(deltalake::DeltaTableError::Generic(format!("parking: {e}"))))?;
    }
    let positions: Vec<(String, i32, i64)> = job
        .moves
        .iter()
        .map(|m| (m.topic.clone(), m.partition, m.next))
        .collect();
    let appended = target
        .append(job.rows, &positions, || {
            faults.fires(FaultPoint::DeltaAfterFilesBeforeLog);
        })
        .await?;
    tracing::debug!(
        "delta sink: version {}: {} parked, {} files ({} bytes) in {:?}",
        appended.version,
        job.parked.len(),
        appended.files,
        appended.bytes,
        started.elapsed()
    );
    Ok(appended)
}

async fn park(
    producer: &FutureProducer<exactly_kafka::TokenContext>,
    topic: &str,
    p: &Parked,
) -> Result<(), rdkafka::error::KafkaError> {
    tracing::warn!(
        "{}/{}@{} parked on {topic}: {}",
        p.topic,
        p.partition,
        p.offset,
        p.reason
    );
    let (partition, offset) = (p.partition.to_string(), p.offset.to_string());
    let headers = OwnedHeaders::new()
        .insert(Header {
            key: "exactly-parked-reason",
            value: Some(p.reason.as_bytes()),
        })
        .insert(Header {
            key: "exactly-origin-topic",
            value: Some(p.topic.as_bytes()),
        })
        .insert(Header {
            key: "exactly-origin-partition",
            value: Some(partition.as_bytes()),
        })
        .insert(Header {
            key: "exactly-origin-offset",
            value: Some(offset.as_bytes()),
        });
    let mut record = FutureRecord::to(topic).payload(&p.payload).headers(headers);
    if let Some(key) = &p.key {
        record = record.key(key);
    }
    producer
        .send(record, Duration::from_secs(30))
        .await
        .map(|_| ())
        .map_err(|(e, _)| e)
}
