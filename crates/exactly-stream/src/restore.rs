//! Restoring task stores from their changelog partitions, outside the rebalance callback and a
//! slice at a time, in the manner of Kafka Streams' restore consumer.
//!
//! The processing loop hands each newly assigned task to the [`Restorer`] and calls
//! [`Restorer::step`] between polls of its group consumer, so the group never waits for a
//! restore and the member keeps polling. A step reads what the restore consumer has for at most
//! its budget, and hands the changes known to have committed, a slice at a time, to the task's
//! store writer, which writes each with the changelog offset to resume from on a thread of its
//! own while the next slice is read ([`StreamingRestore`], `store_writer`): memory holds two
//! slices (one read, one written) and, in marker mode, one transaction's changes per task,
//! whatever the changelog's size.
//! A restore cut short (the partition revoked, the process killed) resumes from that offset
//! when the task comes back, not from the start.
//!
//! A restore ends when it has read everything written to the changelog partition and nothing
//! is undecided: the last stable offset (what a read_committed reader may read) equals the
//! high watermark (what was written), and the reader's position has reached it. A previous
//! owner's transaction still open holds it back until that transaction commits or aborts
//! (a restarted instance aborts its own at start; another's ends at its transaction timeout),
//! instead of a quiet period that a late commit can outlast.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use exactly_core::changelog::{restore_end, RestoreEnd, RestoreMode, StreamingRestore};
use exactly_kafka::QuietEof;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

use crate::changelog::{entry_of, TXN_HEADER};
use crate::processor::{ProcessorError, StreamConfig};
use crate::store::{Batch, StateStore};
use crate::store_writer::{Records, StoreWriter};

/// Changes written to a store in one local transaction during a restore (a slice) ...
const WRITE_BATCH: usize = 10_000;
/// ... or this many bytes of keys and values, whichever comes first (large entries).
const WRITE_BATCH_BYTES: usize = 2 * 1024 * 1024;
/// Every this many write batches one is durable (fsync): a restore killed in between resumes
/// from the last durable one; the others cost no fsync.
const DURABLE_EVERY: u32 = 8;
/// How often a task at the end of what it could read asks for the partition's ends.
const END_CHECK: Duration = Duration::from_millis(100);
/// After this long waiting for an open transaction, a task says so (once).
const WAIT_NOTICE: Duration = Duration::from_secs(5);
/// Broker calls of the restore.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// What one restore did.
#[derive(Debug, Clone, Copy, Default)]
pub struct RestoreStats {
    /// Changelog records read (by this run of the restore, resumed or not).
    pub records: usize,
    /// Changes written to the store.
    pub entries: usize,
    /// Records of transactions not known to have committed, or unusable.
    pub dropped: usize,
    /// From start (or resumption) to completion.
    pub elapsed: Duration,
    /// Of which waiting for the broker (polls, end checks).
    pub read: Duration,
    /// Writing the store (parsing included), on its own thread beside the reading.
    pub write: Duration,
    /// Where the restore began reading (0, or where an interrupted one stopped).
    pub resumed_at: i64,
}

/// A task being restored.
struct Restoring {
    /// Writes the store on its own thread while the next slice is read.
    writer: StoreWriter,
    restore: StreamingRestore<String, String>,
    /// Records read and known committed, not yet handed to the writer.
    pending: Records,
    /// Their keys' and values' bytes.
    pending_bytes: usize,
    /// The offset after the last record read (what the reader has passed).
    position: i64,
    /// The partition's end was reported since the last record.
    at_end: bool,
    /// Write batches since the last durable one.
    since_durable: u32,
    last_check: Instant,
    /// Since when an open transaction holds the end back.
    waiting_since: Option<Instant>,
    noticed: bool,
    started: Instant,
    stats: RestoreStats,
}

/// Restores the stores of tasks new to this processor, one slice per [`Restorer::step`].
pub struct Restorer {
    /// read_committed, assigned (no group) the changelog partitions being restored.
    consumer: BaseConsumer<QuietEof>,
    /// read_uncommitted: asks for the high watermark.
    written: BaseConsumer<QuietEof>,
    topic: String,
    mode: RestoreMode,
    state_dir: PathBuf,
    tasks: BTreeMap<i32, Restoring>,
}

fn fail(context: &str) -> impl Fn(KafkaError) -> ProcessorError + '_ {
    move |e| ProcessorError::new(format!("{context}: {e}"))
}

fn store_error(e: crate::store::StoreError) -> ProcessorError {
    ProcessorError::new(e.to_string())
}

/// The file of task `partition`'s store in `state_dir`.
pub(crate) fn store_path(state_dir: &Path, partition: i32) -> PathBuf {
    state_dir.join(format!("partition-{partition}.redb"))
}

impl Restorer {
    /// A restorer of `config`'s changelog in `mode`.
    pub fn new(config: &StreamConfig, mode: RestoreMode) -> Result<Self, ProcessorError> {
        let group = format!("{}-restore", config.application_id);
        // The reader's prefetch is bounded (exactly_kafka::reader_config), so the restore's
        // memory does not grow with the changelog.
        let reader = exactly_kafka::reader_config(&config.kafka, &group, "read_committed");
        let consumer: BaseConsumer<QuietEof> = reader
            .create_with_context(QuietEof)
            .map_err(fail("create restore consumer"))?;
        let written: BaseConsumer<QuietEof> =
            exactly_kafka::reader_config(&config.kafka, &group, "read_uncommitted")
                .create_with_context(QuietEof)
                .map_err(fail("create restore end reader"))?;
        std::fs::create_dir_all(&config.state_dir)
            .map_err(|e| ProcessorError::new(format!("state dir: {e}")))?;
        Ok(Restorer {
            consumer,
            written,
            topic: config.changelog_topic(),
            mode,
            state_dir: config.state_dir.clone(),
            tasks: BTreeMap::new(),
        })
    }

    /// Partitions being restored.
    pub fn restoring(&self) -> impl Iterator<Item = i32> + '_ {
        self.tasks.keys().copied()
    }

    /// How many tasks are being restored.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    /// Whether no task is being restored.
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// Begins (or resumes) restoring task `partition`: a store file left by an interrupted
    /// restore is read on from where it stopped, unless the changelog no longer reaches that
    /// far (recreated); any other file is replaced, since the changelog is the truth.
    pub fn start(&mut self, partition: i32) -> Result<(), ProcessorError> {
        if self.tasks.contains_key(&partition) {
            return Ok(());
        }
        let path = store_path(&self.state_dir, partition);
        let (_, written_end) = self
            .written
            .fetch_watermarks(&self.topic, partition, CALL_TIMEOUT)
            .map_err(fail("changelog end"))?;
        let resumable = match StateStore::open(&path) {
            Ok(store) => match store.restore_position() {
                Ok(Some(at)) if at <= written_end => Some((store, at)),
                _ => None,
            },
            Err(_) => None,
        };
        let (store, from) = match resumable {
            Some((store, at)) => {
                tracing::info!(
                    "partition {partition}: resuming its interrupted restore at changelog offset {at}"
                );
                (store, at)
            }
            None => {
                let _ = std::fs::remove_file(&path);
                let store = StateStore::open(&path).map_err(store_error)?;
                // Marked as restoring from the first moment, so a file left half-written is
                // recognised as such.
                store
                    .commit_restoring(&Batch::default(), Some(0), true)
                    .map_err(store_error)?;
                (store, 0)
            }
        };
        let mut list = TopicPartitionList::new();
        let offset = if from == 0 {
            Offset::Beginning
        } else {
            Offset::Offset(from)
        };
        list.add_partition_offset(&self.topic, partition, offset)
            .map_err(fail("restore assignment"))?;
        self.consumer
            .incremental_assign(&list)
            .map_err(fail("restore assignment"))?;
        let now = Instant::now();
        self.tasks.insert(
            partition,
            Restoring {
                writer: StoreWriter::start(store, partition)?,
                restore: StreamingRestore::new(self.mode, from),
                pending: Records::new(),
                pending_bytes: 0,
                position: from,
                at_end: false,
                since_durable: 0,
                last_check: now,
                waiting_since: None,
                noticed: false,
                started: now,
                stats: RestoreStats {
                    resumed_at: from,
                    ..RestoreStats::default()
                },
            },
        );
        Ok(())
    }

    /// Stops restoring `partition` (revoked): what was read is written with its resume offset,
    /// so the restore continues from there if the task comes back.
    pub fn stop(&mut self, partition: i32) {
        let Some(task) = self.tasks.remove(&partition) else {
            return;
        };
        let (records, resume) = (task.stats.records, task.restore.resume_offset());
        if let Err(e) = finish(task, Ending::Revoked) {
            tracing::warn!("partition {partition}: keeping its restore's progress failed: {e}");
        }
        self.unassign(partition);
        tracing::info!(
            "partition {partition}: restore stopped (revoked) after {records} records; it resumes at changelog offset {resume}"
        );
    }

    /// Reads for at most `budget`, writes what it read, and returns the tasks whose stores are
    /// now current, with what their restore did.
    pub fn step(&mut self, budget: Duration) -> Result<Vec<(i32, StateStore, RestoreStats)>, ProcessorError> {
        if self.tasks.is_empty() {
            return Ok(Vec::new());
        }
        let began = Instant::now();
        while began.elapsed() < budget {
            let polled = Instant::now();
            let message = self.consumer.poll(Duration::from_millis(10));
            let waited = polled.elapsed();
            match message {
                Some(Ok(m)) => {
                    let Some(task) = self.tasks.get_mut(&m.partition()) else {
                        continue;
                    };
                    task.stats.read += waited;
                    let txn = m
                        .headers()
                        .and_then(|h| h.iter().find(|h| h.key == TXN_HEADER).and_then(|h| h.value))
                        .map(String::from_utf8_lossy)
                        .unwrap_or_default();
                    let key = String::from_utf8_lossy(m.key().unwrap_or_default());
                    let value = m.payload().map(String::from_utf8_lossy);
                    let entry = entry_of(&key, value.as_deref(), &txn);
                    task.stats.records += 1;
                    task.position = task.position.max(m.offset() + 1);
                    task.at_end = false;
                    metrics::counter!("exactly_stream_restored_records_total").increment(1);
                    for (key, value) in task.restore.push(m.offset(), entry) {
                        task.pending_bytes += key.len() + value.as_ref().map_or(0, String::len);
                        task.pending.push((key, value));
                    }
                    if task.pending.len() >= WRITE_BATCH || task.pending_bytes >= WRITE_BATCH_BYTES {
                        if let Err(e) = hand_over(task) {
                            // Its store could not be written: the restore starts again (from
                            // the file's last durable resume offset) at a later turn.
                            let partition = m.partition();
                            self.tasks.remove(&partition);
                            self.unassign(partition);
                            return Err(e);
                        }
                    }
                }
                Some(Err(KafkaError::PartitionEOF(p))) => {
                    if let Some(task) = self.tasks.get_mut(&p) {
                        task.at_end = true;
                    }
                }
                Some(Err(e)) => tracing::debug!("restore read of {}: {e}", self.topic),
                None => break,
            }
        }
        self.finished()
    }

    fn unassign(&self, partition: i32) {
        let mut list = TopicPartitionList::new();
        list.add_partition(&self.topic, partition);
        if let Err(e) = self.consumer.incremental_unassign(&list) {
            tracing::warn!("partition {partition}: unassigning its restore failed: {e}");
        }
    }

    /// Tasks at the end of what they can read ask whether that is everything.
    fn finished(&mut self) -> Result<Vec<(i32, StateStore, RestoreStats)>, ProcessorError> {
        let positions = self.consumer.position().map_err(fail("restore position"))?;
        let mut done = Vec::new();
        for (&partition, task) in self.tasks.iter_mut() {
            if !task.at_end || task.last_check.elapsed() < END_CHECK {
                continue;
            }
            task.last_check = Instant::now();
            // librdkafka's position passes transaction markers, which are no records.
            let reader_at = positions
                .find_partition(&self.topic, partition)
                .and_then(|e| match e.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                })
                .unwrap_or(0)
                .max(task.position);
            let asked = Instant::now();
            let (_, stable) = self
                .consumer
                .fetch_watermarks(&self.topic, partition, CALL_TIMEOUT)
                .map_err(fail("changelog stable end"))?;
            let (_, written) = self
                .written
                .fetch_watermarks(&self.topic, partition, CALL_TIMEOUT)
                .map_err(fail("changelog end"))?;
            task.stats.read += asked.elapsed();
            let end = restore_end(stable, written, reader_at);
            if end == RestoreEnd::WaitingForOpenTransaction {
                let since = *task.waiting_since.get_or_insert_with(Instant::now);
                if !task.noticed && since.elapsed() >= WAIT_NOTICE {
                    task.noticed = true;
                    tracing::warn!(
                        "partition {partition}: its changelog has a transaction still open (stable up to {stable}, \
                         written up to {written}); the restore waits for it to commit or abort"
                    );
                }
                continue;
            }
            task.waiting_since = None;
            if end == RestoreEnd::Done {
                done.push(partition);
            }
        }
        let mut restored = Vec::new();
        for partition in done {
            if let Some(task) = self.tasks.remove(&partition) {
                self.unassign(partition);
                let (store, stats) = finish(task, Ending::Complete)?;
                restored.push((partition, store, stats));
            }
        }
        Ok(restored)
    }
}

/// Hands the task's pending records to its writer with the offset its restore resumes from.
fn hand_over(task: &mut Restoring) -> Result<(), ProcessorError> {
    let records = std::mem::take(&mut task.pending);
    task.pending_bytes = 0;
    task.since_durable += 1;
    let durable = task.since_durable >= DURABLE_EVERY;
    if durable {
        task.since_durable = 0;
    }
    task.writer.write(records, task.restore.resume_offset(), durable)
}

/// How a task's restore ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// The partition was revoked: the restore resumes here if the task comes back.
    Revoked,
    /// The store is current: no resume offset any more.
    Complete,
}

/// Writes the task's last records durably and waits for its writer.
fn finish(mut task: Restoring, ending: Ending) -> Result<(StateStore, RestoreStats), ProcessorError> {
    let records = std::mem::take(&mut task.pending);
    let resume = (ending == Ending::Revoked).then(|| task.restore.resume_offset());
    let written = task.writer.finish(records, resume)?;
    let mut stats = task.stats;
    stats.entries = written.entries;
    stats.dropped = written.dropped + task.restore.dropped();
    stats.write = written.busy;
    stats.elapsed = task.started.elapsed();
    Ok((written.store, stats))
}

/// Restores task `partition`'s store to the changelog's end, on its own (tools, benches): the
/// processor restores its tasks a step at a time instead.
pub fn rebuild_store(
    config: &StreamConfig,
    partition: i32,
    mode: RestoreMode,
) -> Result<(StateStore, RestoreStats), ProcessorError> {
    let mut restorer = Restorer::new(config, mode)?;
    restorer.start(partition)?;
    loop {
        if let Some((_, store, stats)) = restorer.step(Duration::from_millis(200))?.pop() {
            return Ok((store, stats));
        }
    }
}
