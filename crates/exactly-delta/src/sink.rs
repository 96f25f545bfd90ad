//! The sink's loop: poll records, turn each into a row (or park it), and append a batch to the
//! table with the positions it reached, by size or by time.
//!
//! Positions come from the Delta log, never from the group: on start and after every rebalance
//! the buffer is dropped, the log read again, and the first record of each partition checked
//! against the log's position (earlier records are in the table already and are skipped; a
//! later one is sought back to it). A failed or lost append does the same. The group's
//! committed offsets follow each append, for lag only.
//!
//! Dedupe: an envelope record whose idempotency key is in a file added within the horizon
//! (`dedupe_horizon_ms`, by the file's modification time), or earlier in the same batch, is
//! skipped. Keys of files other writers added are read back from the table (the key column
//! only) on start and after every rebalance; keys are kept in memory for the horizon.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use exactly_core::{IdempotencyKey, KeySet, OffsetGapCheck, UnixMillis};
use exactly_kafka::{Faults, GapFollowed, KafkaSettings};
use futures::FutureExt;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::producer::FutureProducer;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::watch;

use crate::appender::{Appender, Job, Move, Outcome, Parked};
use crate::schema::{InputKind, Layout, Origin, PlainRecord, Rows};
use crate::table::{AppendError, DeltaTarget};
use crate::DeltaSinkError;

/// Everything a Delta sink needs.
#[derive(Debug, Clone)]
pub struct SinkConfig {
    /// The cluster.
    pub kafka: KafkaSettings,
    /// Topics to read.
    pub topics: Vec<String>,
    /// The table: a local path or an object-store URL.
    pub table_uri: String,
    /// Object-store settings (credentials, region, endpoint), handed to delta-rs.
    pub storage_options: HashMap<String, String>,
    /// The sink's name: its positions' application ids in the log.
    pub name: String,
    /// Its consumer group (the name, unless two sinks are meant to race for one table).
    pub group: String,
    /// Static membership (`group.instance.id`).
    pub instance_id: Option<String>,
    /// Columns and partitioning.
    pub layout: Layout,
    /// Append when this many records are buffered.
    pub flush_records: usize,
    /// Append at least this often while records are buffered.
    pub flush_interval: Duration,
    /// Parquet files are cut at about this size.
    pub target_file_size: u64,
    /// Repeats of a key are skipped for this long after its file was added.
    pub dedupe_horizon_ms: i64,
    /// Where records that do not fit are parked.
    pub dead_letter_topic: String,
    /// The lab's kill points.
    pub faults: Faults,
}

/// What the sink did, for progress and metrics.
#[derive(Debug, Default)]
pub struct SinkCounters {
    /// Rows committed to the table.
    pub written: AtomicU64,
    /// Appends committed.
    pub commits: AtomicU64,
    /// Appends that lost to another writer.
    pub conflicts: AtomicU64,
    /// Repeats skipped.
    pub duplicates: AtomicU64,
    /// Records parked.
    pub parked: AtomicU64,
    /// Parquet bytes committed.
    pub bytes: AtomicU64,
    /// Parquet files committed.
    pub files: AtomicU64,
    /// Times a partition was read again from an offset the client had passed over.
    pub reread: AtomicU64,
}

/// The keys of what the table holds within the horizon: read back from its files, and added
/// after each of this sink's appends.
struct Committed {
    keys: KeySet,
    /// Files whose keys were read.
    loaded: HashSet<String>,
}

/// Notes every rebalance; the loop re-reads the log's positions after one.
struct SinkContext {
    rebalanced: AtomicBool,
}

impl ClientContext for SinkContext {
    const ENABLE_REFRESH_OAUTH_TOKEN: bool = true;

    fn generate_oauth_token(
        &self,
        oauthbearer_config: Option<&str>,
    ) -> Result<rdkafka::client::OAuthToken, Box<dyn std::error::Error>> {
        exactly_kafka::refresh_oauth_token(oauthbearer_config)
    }

    fn stats(&self, statistics: rdkafka::Statistics) {
        let _ = exactly_kafka::export_consumer_lag(&statistics, "exactly_delta_lag_records");
    }
}

impl ConsumerContext for SinkContext {
    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(list) | Rebalance::Revoke(list) => {
                let what = if matches!(rebalance, Rebalance::Assign(_)) {
                    "assigned"
                } else {
                    "revoked"
                };
                let parts: Vec<String> = list
                    .elements()
                    .iter()
                    .map(|e| format!("{}/{}", e.topic(), e.partition()))
                    .collect();
                tracing::info!("delta sink: the group {what} {parts:?}");
            }
            Rebalance::Error(e) => tracing::warn!("delta sink: rebalance error: {e}"),
        }
        self.rebalanced.store(true, Ordering::SeqCst);
    }
}

type Tp = (String, i32);

/// Maps and sets looked up per record: keyed fast hashing (a record costs several lookups).
type FastMap<K, V> = HashMap<K, V, ahash::RandomState>;
type FastSet<K> = HashSet<K, ahash::RandomState>;

/// At most this many records are taken per turn of the loop without looking at the stop signal
/// and the flush timer.
const DRAIN: usize = 10_000;

/// The buffer and what the loop knows of each partition since the last (re)sync.
struct Batch {
    rows: Rows,
    keys: FastSet<IdempotencyKey>,
    parked: Vec<Parked>,
    /// The next offset per partition after what the buffer holds (or skipped).
    next: FastMap<Tp, i64>,
    /// Partitions whose position moved since the last hand-off to the appender.
    moved: FastSet<Tp>,
    /// The log's position each partition's buffered records start from (after the running
    /// append, if any): an append is made only while the log still says so (another writer may
    /// have moved it, and a commit rebased over that writer's commits would not see it).
    base: FastMap<Tp, i64>,
    /// Partitions checked against the log since the last sync.
    positioned: FastSet<Tp>,
    gaps: OffsetGapCheck<Tp>,
    since: Option<Instant>,
    /// The keys of the append running, until it ends: repeats of them are skipped too.
    appending: FastSet<IdempotencyKey>,
}

impl Batch {
    /// The log says partition `tp` goes on from offset `p`.
    fn position(&mut self, tp: Tp, p: i64) {
        self.gaps.expect(&tp, p);
        self.base.insert(tp.clone(), p);
        self.next.insert(tp.clone(), p);
        self.positioned.insert(tp);
    }

    fn new(layout: &Layout) -> Self {
        Batch {
            rows: layout.rows(),
            keys: FastSet::default(),
            parked: Vec::new(),
            next: FastMap::default(),
            moved: FastSet::default(),
            base: FastMap::default(),
            positioned: FastSet::default(),
            gaps: OffsetGapCheck::default(),
            since: None,
            appending: FastSet::default(),
        }
    }

    fn len(&self) -> usize {
        self.rows.len() + self.parked.len()
    }

    /// The buffer as an append job; the next buffer starts where this one ends.
    fn hand_off(&mut self, layout: &Layout) -> Result<Job, DeltaSinkError> {
        let rows = layout
            .batch(&mut self.rows)
            .map_err(|e| DeltaSinkError::Appender(format!("building the batch: {e}")))?;
        let mut moves = Vec::with_capacity(self.moved.len());
        for tp in self.moved.drain() {
            // A partition moves only once positioned, which sets both.
            let (Some(base), Some(next)) = (self.base.get(&tp).copied(), self.next.get(&tp).copied()) else {
                return Err(DeltaSinkError::Appender(format!(
                    "{}/{} moved without a position from the log",
                    tp.0, tp.1
                )));
            };
            self.base.insert(tp.clone(), next);
            moves.push(Move {
                topic: tp.0,
                partition: tp.1,
                base,
                next,
            });
        }
        self.appending = std::mem::take(&mut self.keys);
        self.since = None;
        Ok(Job {
            rows,
            moves,
            parked: std::mem::take(&mut self.parked),
        })
    }
}

/// What the loop keeps between records.
struct Sink {
    config: SinkConfig,
    counters: Arc<SinkCounters>,
    keys: Committed,
    batch: Batch,
    appender: Appender,
}

/// Runs the sink until `stop`: what is buffered then is dropped (it is read again on the next
/// start), so a stop never writes a partial batch; an append already running is waited for.
pub async fn run(
    config: SinkConfig,
    counters: Arc<SinkCounters>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), DeltaSinkError> {
    config.layout.validate().map_err(DeltaSinkError::Layout)?;
    let target = DeltaTarget::open(
        &config.table_uri,
        &config.storage_options,
        &config.layout,
        &config.name,
    )
    .await?
    .with_target_file_size(config.target_file_size);
    exactly_kafka::ensure_topics(&config.kafka, &[&config.dead_letter_topic], 1)
        .await
        .map_err(DeltaSinkError::DeadLetterTopic)?;
    let mut client = exactly_kafka::consumer_config(&config.kafka, &config.group);
    exactly_kafka::static_membership(&mut client, config.instance_id.as_deref());
    let consumer: StreamConsumer<SinkContext> = client.create_with_context(SinkContext {
        rebalanced: AtomicBool::new(false),
    })?;
    let topics: Vec<&str> = config.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;
    let producer: FutureProducer<exactly_kafka::TokenContext> =
        exactly_kafka::producer_config(&config.kafka, false)
            .create_with_context(exactly_kafka::TokenContext)?;
    let mut keys = Committed {
        keys: KeySet::new(config.dedupe_horizon_ms),
        loaded: HashSet::new(),
    };
    load_keys(&target, &config, &mut keys).await?;
    tracing::info!(
        "delta sink {} from {:?} into {} at version {:?}",
        config.name,
        config.topics,
        config.table_uri,
        target.version()
    );
    let appender = Appender::new(
        target,
        producer,
        config.dead_letter_topic.clone(),
        config.faults.clone(),
    );
    let mut sink = Sink {
        batch: Batch::new(&config.layout),
        config,
        counters,
        keys,
        appender,
    };
    loop {
        let due = sink.batch.since.map(|s| s + sink.config.flush_interval);
        let mut received = tokio::select! {
            _ = stop.changed() => {
                // An append running is let end (committed or not, never cut off), and counted.
                if let (Some(outcome), _) = sink.appender.idle().await? {
                    record_append(&sink.counters, &outcome);
                }
                return Ok(());
            }
            _ = sleep_until(due) => None,
            ended = sink.appender.finish(), if sink.appender.running() => {
                ended?;
                None
            }
            m = consumer.recv() => Some(m),
        };
        if sink.appender.ended() {
            sink.settle(&consumer, &mut stop).await?;
        }
        // What the client has ready is taken without arming the select again: one turn of
        // the loop per record would cost more than the record.
        for turn in 0..DRAIN {
            // Only a record this turn judges is taken from the client: one taken and dropped
            // would be a gap, read again at the cost of a seek.
            if turn > 0 {
                match consumer.recv().now_or_never() {
                    Some(next) => received = Some(next),
                    None => break,
                }
            }
            if consumer.context().rebalanced.swap(false, Ordering::SeqCst) {
                sink.resync(&consumer, &mut stop).await?;
                // The record that came with the rebalance is judged like any other below.
            }
            let unpositioned = match received.take() {
                Some(Ok(m)) => {
                    if sink.positioned(&m) {
                        sink.take(&consumer, &m);
                        None
                    } else {
                        Some(m.detach())
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!("delta sink: {e}");
                    None
                }
                None => None,
            };
            if let Some(m) = unpositioned {
                // Positioning reads the log: the running append ends first.
                sink.settle(&consumer, &mut stop).await?;
                if !sink.positioned(&m) {
                    let (_, target) = sink.appender.idle().await?;
                    ensure_positioned(&consumer, target, &mut sink.batch, &m).await?;
                }
                sink.take(&consumer, &m);
            }
            if sink.batch.len() >= sink.config.flush_records {
                break;
            }
        }
        let full = sink.batch.len() >= sink.config.flush_records;
        let late = sink
            .batch
            .since
            .is_some_and(|s| s.elapsed() >= sink.config.flush_interval);
        if (full || late) && !sink.batch.moved.is_empty() {
            // One append at a time: the next starts from where the running one ends.
            if sink.settle(&consumer, &mut stop).await? {
                let job = sink.batch.hand_off(&sink.config.layout)?;
                sink.appender.start(job)?;
            }
        }
    }
}

impl Sink {
    /// Whether the record's partition was checked against the log since the last sync.
    fn positioned(&self, m: &impl Message) -> bool {
        self.batch
            .positioned
            .iter()
            .any(|(t, p)| *p == m.partition() && t == m.topic())
    }

    fn take(&mut self, consumer: &StreamConsumer<SinkContext>, m: &impl Message) {
        take(
            consumer,
            &self.config,
            &self.keys,
            &self.counters,
            &mut self.batch,
            m,
        );
    }

    /// Waits for the running append, if any, and follows how it ended: the group's offsets
    /// and the dedupe keys after a commit, the log's positions again after a loss. False when
    /// the positions were read again (the buffer was dropped).
    async fn settle(
        &mut self,
        consumer: &StreamConsumer<SinkContext>,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<bool, DeltaSinkError> {
        let (outcome, _) = self.appender.idle().await?;
        let Some(outcome) = outcome else {
            return Ok(true);
        };
        let appending = std::mem::take(&mut self.batch.appending);
        record_append(&self.counters, &outcome);
        match outcome.result {
            Ok(_) => {
                let now = exactly_kafka::now();
                for key in appending {
                    self.keys.keys.observe(&key, now);
                }
                commit_group_offsets(consumer, &outcome.started.moves);
                Ok(true)
            }
            Err(lost) => {
                if matches!(lost, AppendError::Conflict(_)) {
                    self.counters.conflicts.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("exactly_delta_commit_conflicts_total").increment(1);
                }
                tracing::warn!("delta sink: {lost}; reading the positions from the log again");
                if matches!(lost, AppendError::Failed(_)) {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                self.resync(consumer, stop).await?;
                Ok(false)
            }
        }
    }

    /// Drops the buffer, reads the log's newest version and the keys of files added since, and
    /// seeks the assigned partitions to the log's positions (after the running append ends).
    async fn resync(
        &mut self,
        consumer: &StreamConsumer<SinkContext>,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), DeltaSinkError> {
        let (outcome, target) = self.appender.idle().await?;
        // A commit that ended meanwhile is counted; its keys are read back from its files.
        if let Some(outcome) = outcome {
            record_append(&self.counters, &outcome);
        }
        self.batch = Batch::new(&self.config.layout);
        loop {
            match target.refresh().await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!("delta sink: reading the log (will retry): {e}");
                    tokio::select! {
                        _ = stop.changed() => return Ok(()),
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
        load_keys(target, &self.config, &mut self.keys).await?;
        position_assigned(consumer, target, &mut self.batch).await
    }
}

/// Counts an append that committed (one that did not, nothing).
fn record_append(counters: &SinkCounters, outcome: &Outcome) {
    let Ok(appended) = &outcome.result else {
        return;
    };
    let (rows, parked) = (outcome.started.written, outcome.started.parked);
    counters.written.fetch_add(rows, Ordering::Relaxed);
    counters.parked.fetch_add(parked, Ordering::Relaxed);
    counters.commits.fetch_add(1, Ordering::Relaxed);
    counters.files.fetch_add(appended.files as u64, Ordering::Relaxed);
    counters
        .bytes
        .fetch_add(appended.bytes.max(0) as u64, Ordering::Relaxed);
    metrics::counter!("exactly_delta_records_written_total").increment(rows);
    metrics::counter!("exactly_delta_records_parked_total").increment(parked);
    metrics::counter!("exactly_delta_commits_total").increment(1);
    metrics::counter!("exactly_delta_files_written_total").increment(appended.files as u64);
    metrics::counter!("exactly_delta_bytes_written_total").increment(appended.bytes.max(0) as u64);
    metrics::histogram!("exactly_delta_commit_seconds").record(outcome.started.at.elapsed().as_secs_f64());
    metrics::gauge!("exactly_delta_table_version").set(appended.version as f64);
}

/// Seeks every assigned partition to the log's position (the beginning where the log has
/// none), so the records a dropped buffer held are read again even from a partition that gets
/// nothing new. A seek the client refuses (a partition not fetching yet) leaves the partition
/// to be positioned by its first record.
async fn position_assigned(
    consumer: &StreamConsumer<SinkContext>,
    target: &DeltaTarget,
    batch: &mut Batch,
) -> Result<(), DeltaSinkError> {
    let assigned: Vec<Tp> = consumer
        .assignment()?
        .elements()
        .iter()
        .map(|e| (e.topic().to_owned(), e.partition()))
        .collect();
    for tp in assigned {
        let p = position_of(target, &tp).await?;
        if consumer
            .seek(&tp.0, tp.1, Offset::Offset(p), Duration::from_secs(10))
            .is_err()
        {
            continue;
        }
        batch.position(tp, p);
    }
    Ok(())
}

async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

async fn load_keys(
    target: &DeltaTarget,
    config: &SinkConfig,
    keys: &mut Committed,
) -> Result<(), DeltaSinkError> {
    let now = exactly_kafka::now();
    let since = now.0.saturating_sub(config.dedupe_horizon_ms);
    let recent = target
        .recent_keys(&config.layout, since, &mut keys.loaded)
        .await?;
    let n = recent.len();
    for (at, text) in recent {
        if let Ok(key) = text.parse::<IdempotencyKey>() {
            keys.keys.observe(&key, UnixMillis(at.min(now.0)));
        }
    }
    if n > 0 {
        tracing::info!("delta sink: {n} idempotency keys read back from the table's recent files");
    }
    Ok(())
}

/// Where the log says a partition's next record is: the beginning of the partition when this
/// sink never wrote it (the log is the only truth; a group offset without a position in the
/// log, from a table since replaced, is not trusted).
async fn position_of(target: &DeltaTarget, tp: &Tp) -> Result<i64, DeltaSinkError> {
    let position = target.position(&tp.0, tp.1).await.map_err(DeltaSinkError::Read)?;
    Ok(position.unwrap_or(0))
}

/// Puts partition `tp` at the log's position before its first record since the last sync
/// (the only step of a record that waits on the table).
async fn ensure_positioned(
    consumer: &StreamConsumer<SinkContext>,
    target: &DeltaTarget,
    batch: &mut Batch,
    m: &OwnedMessage,
) -> Result<(), DeltaSinkError> {
    let tp: Tp = (m.topic().to_owned(), m.partition());
    let p = position_of(target, &tp).await?;
    batch.position(tp.clone(), p);
    if m.offset() < p {
        // The group's offset is behind the log (a stop between an append and the group
        // commit): go to the log's position at once. (Past it, the gap rule reads back.)
        let _ = consumer.seek(&tp.0, tp.1, Offset::Offset(p), Duration::from_secs(10));
    }
    Ok(())
}

/// Judges one record of a positioned partition: skipped (before the position, a repeat, a
/// gap read again), buffered as a row, or buffered to be parked.
fn take(
    consumer: &StreamConsumer<SinkContext>,
    config: &SinkConfig,
    keys: &Committed,
    counters: &SinkCounters,
    batch: &mut Batch,
    m: &impl Message,
) {
    let tp: Tp = (m.topic().to_owned(), m.partition());
    if batch.next.get(&tp).is_some_and(|next| m.offset() < *next) {
        return;
    }
    let verdict = batch.gaps.observe(&tp, m.offset());
    match exactly_kafka::follow_gap_verdict(consumer, m, verdict) {
        GapFollowed::Take => {}
        GapFollowed::Rereading => {
            counters.reread.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("exactly_delta_gaps_reread_total").increment(1);
            return;
        }
        GapFollowed::SeekFailed => {
            batch.gaps.refetch_failed(&tp);
            return;
        }
    }
    if !batch.moved.contains(&tp) {
        batch.moved.insert(tp.clone());
    }
    batch.since.get_or_insert_with(Instant::now);
    let origin = Origin {
        topic: m.topic(),
        partition: m.partition(),
        offset: m.offset(),
    };
    let payload = m.payload().unwrap_or_default();
    let pushed = match config.layout.input {
        InputKind::Envelope => match exactly_kafka::decode_message(m) {
            Err(e) => Err(format!("not an exactly event: {e}")),
            Ok(delivery) => {
                let key = delivery.key;
                // Recorded before the row is added (one lookup), taken back if it does not fit.
                if keys.keys.contains(&key)
                    || batch.appending.contains(&key)
                    || !batch.keys.insert(key.clone())
                {
                    batch.next.insert(tp, m.offset() + 1);
                    return;
                }
                let pushed = config
                    .layout
                    .push_envelope(&mut batch.rows, &key, &delivery.envelope, origin);
                if pushed.is_err() {
                    batch.keys.remove(&key);
                }
                pushed
            }
        },
        InputKind::Plain => {
            let record = PlainRecord {
                key: m.key(),
                timestamp_ms: m.timestamp().to_millis(),
                payload,
            };
            config
                .layout
                .push_plain(&mut batch.rows, record, origin, exactly_kafka::now().0)
        }
    };
    match pushed {
        Ok(()) => {}
        Err(reason) => batch.parked.push(Parked {
            topic: tp.0.clone(),
            partition: tp.1,
            offset: m.offset(),
            key: m.key().map(<[u8]>::to_vec),
            payload: payload.to_vec(),
            reason,
        }),
    }
    batch.next.insert(tp, m.offset() + 1);
}

/// The group's offsets follow the log (for lag and for a faster start); the log decides.
fn commit_group_offsets(consumer: &StreamConsumer<SinkContext>, moves: &[Move]) {
    let mut list = TopicPartitionList::new();
    for m in moves {
        let _ = list.add_partition_offset(&m.topic, m.partition, Offset::Offset(m.next));
    }
    if list.count() > 0 {
        if let Err(e) = consumer.commit(&list, CommitMode::Async) {
            tracing::debug!("delta sink: committing the group's offsets: {e}");
        }
    }
}
