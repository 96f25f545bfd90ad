//! The exactly-once processor runtime, in the manner of Kafka Streams exactly_once_v2: one
//! consumer (group = application.id, read_committed) and one transactional producer per
//! processor; every commit interval, the window results, the changelog records and the input
//! offsets (`send_offsets_to_transaction` with the group's metadata) go out in one Kafka
//! transaction. One task (store + changelog partition) per input partition.
//!
//! Counts are partial per counting partition: every output carries its partition, and sinks add
//! the partial counts of a (key, window) together. Without salting the input partitions are
//! counted directly (input is keyed by its aggregate, not by the grouping key, so no repartition
//! is needed for correctness). With `salts` > 1 a hot key is spread: stage one reads the input
//! and forwards each record to `<application.id>-repartition`, keyed by its salted key
//! (`key#n`), inside the same transaction as the input offsets; stage two counts the
//! repartition partitions, so one key's salts land on different partitions and processors.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use exactly_core::changelog::{RestoreMode, TxnSeq};
use exactly_core::window::{salted_key, unsalted_key, TumblingWindows};
use exactly_core::{GapVerdict, OffsetGapCheck, UnixMillis};
use exactly_kafka::TokenContext;
use exactly_kafka::{consumer_config, decode_message, follow_gap_verdict, producer_config, GapFollowed};
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rdkafka::topic_partition_list::TopicPartitionList;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::Offset;

use crate::changelog::{records_for, TXN_HEADER};
use crate::dsl::{InputRecord, MemoryState, Subtopology, Topology};
use crate::ordered::OrderedInputs;
use crate::restore::{RestoreStats, Restorer};
use crate::store::{Batch, Change, StateStore};
use crate::task::{Counted, Input, WindowedCount};
use crate::topology_task::TopologyTask;

/// Header on a dead letter: why the input was not counted.
pub const DEAD_REASON_HEADER: &str = "exactly-dead-reason";
/// Header on a dead letter: `topic/partition@offset` of the input.
pub const DEAD_ORIGIN_HEADER: &str = "exactly-dead-origin";

/// What the count groups by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupBy {
    /// A top-level string field of the JSON payload, for example `product_id`.
    PayloadField(String),
    /// The envelope's aggregate id.
    AggregateId,
}

/// What a processor promises (Kafka Streams' `processing.guarantee`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guarantee {
    /// Outputs, changelog and input offsets in one Kafka transaction per commit interval.
    ExactlyOnce,
    /// The same job without transactions: flush, then commit the input offsets. After a crash
    /// the outputs since the last offset commit are sent again (the counts stay right: the
    /// state is restored from the changelog and inputs are deduped per window).
    AtLeastOnce,
}

/// How a processor runs.
#[derive(Debug, Clone)]
pub struct StreamConfig {
    /// How to reach the cluster.
    pub kafka: exactly_kafka::KafkaSettings,
    /// Consumer group, transactional.id prefix and internal topic prefix.
    pub application_id: String,
    /// Distinguishes processors of one application (part of the transactional.id).
    pub instance: String,
    /// Input topic (outbox events with exactly headers).
    pub input: String,
    /// Output topic of window results.
    pub output: String,
    /// Grouping key.
    pub group_by: GroupBy,
    /// Window size, grace, retention.
    pub windows: TumblingWindows,
    /// Partial counts per hot key (1: off).
    pub salts: u32,
    /// Kafka transaction length.
    pub commit_interval: Duration,
    /// Transactions or not.
    pub guarantee: Guarantee,
    /// Where task stores live.
    pub state_dir: PathBuf,
    /// Replication factor of the internal topics.
    pub replication_factor: i32,
    /// `min.insync.replicas` of the internal topics.
    pub min_insync_replicas: i32,
    /// Event times further ahead of the wall clock go to the dead-letter topic instead of
    /// advancing stream time.
    pub max_event_time_skew_ms: i64,
    /// This processor's `group.instance.id` (static membership: a restart within the session
    /// timeout takes back its partitions without a rebalance); `None`: a dynamic member.
    pub group_instance_id: Option<String>,
    /// A DSL topology to run instead of the built-in count (`group_by`, `windows`, `salts`
    /// and `output` are then unused): one sub-topology reading `input` (and, for a join, other
    /// co-partitioned topics), or a stateless one reading `input` and writing a repartition
    /// topic that a second one reads ([`StreamConfig::check_topology`]).
    pub topology: Option<Arc<Topology>>,
}

impl StreamConfig {
    /// The changelog topic: `<application.id>-counts-changelog`; for a topology
    /// `<application.id>-<store>-changelog`, after the first store of its counted sub-topology.
    pub fn changelog_topic(&self) -> String {
        match self.counted_subtopology().and_then(|s| s.stores.first().cloned()) {
            Some(store) => format!("{}-{store}-changelog", self.application_id),
            None => format!("{}-counts-changelog", self.application_id),
        }
    }

    /// The sub-topology whose partitions are tasks with state (the one reading the counted
    /// topic).
    fn counted_subtopology(&self) -> Option<&Subtopology> {
        let topology = self.topology.as_ref()?;
        let subs = topology.subtopologies();
        subs.iter()
            .find(|s| !s.internal_sources.is_empty())
            .or_else(|| subs.first())
    }

    /// Whether the runtime can run the topology: one sub-topology reading `input` (a join:
    /// with other co-partitioned topics), or a stateless one reading `input` that repartitions
    /// into a second. Chains of repartitions and joins after a regrouping run in memory only.
    pub fn check_topology(&self) -> Result<(), ProcessorError> {
        let Some(topology) = &self.topology else {
            return Ok(());
        };
        let refuse = |why: &str| {
            Err(ProcessorError(format!(
                "{}: the broker runtime cannot run this topology yet ({why}); it runs in memory (TestDriver)",
                self.application_id
            )))
        };
        let subs = topology.subtopologies();
        if let [only] = subs {
            // Joins: one sub-topology reading co-partitioned topics, `input` among them.
            if only.internal_sources.is_empty() && only.sources.contains(&self.input) {
                return Ok(());
            }
        }
        if topology.input_topics() != [self.input.clone()] {
            return refuse("it must read exactly one input topic, or join co-partitioned topics in one step");
        }
        match subs {
            [only] if only.sources.len() == 1 => Ok(()),
            [a, b] => {
                let (first, second) = if a.internal_sources.is_empty() {
                    (a, b)
                } else {
                    (b, a)
                };
                let stateless_repartition = first.stores.is_empty()
                    && first.sources == [self.input.clone()]
                    && second.sources.len() == 1
                    && second.internal_sources == second.sources
                    && first.sinks.contains(&second.sources[0]);
                if stateless_repartition {
                    Ok(())
                } else {
                    refuse("only one repartition, after stateless steps, is supported")
                }
            }
            _ => refuse("it joins topics or repartitions more than once"),
        }
    }

    /// Refuses to start on an application whose changelog another kind of job wrote (the
    /// built-in count's `<app>-counts-changelog` under a topology, or a topology's under the
    /// built-in count): its state would be ignored while the group's committed input offsets
    /// are not, so the new job would silently start part-way through the input.
    fn refuse_other_jobs_changelog(&self) -> Result<(), ProcessorError> {
        let mine = self.changelog_topic();
        let legacy = format!("{}-counts-changelog", self.application_id);
        let other = if self.topology.is_some() {
            legacy
        } else {
            format!("{}-{}-changelog", self.application_id, crate::dsl::JOB_NAME)
        };
        if other == mine {
            return Ok(());
        }
        let exists = exactly_kafka::partition_count(&self.kafka, &other)
            .map_err(|e| ProcessorError(e.to_string()))?
            > 0;
        if exists {
            return Err(ProcessorError(format!(
                "application {} was run by another kind of job (its changelog {other} exists); this job keeps its \
                 state in {mine} and would start where the group's offsets are, not from its input's beginning: \
                 give it a new application_id, or delete the old application's topics and consumer group first",
                self.application_id
            )));
        }
        Ok(())
    }

    /// Stage one forwards the input to a repartition topic that stage two processes: salting,
    /// or a topology that regroups.
    pub fn two_stage(&self) -> bool {
        self.salted()
            || self
                .topology
                .as_ref()
                .is_some_and(|t| !t.internal_topics().is_empty())
    }

    /// A topic as the topology names it: internal ones without the `<application.id>-` prefix.
    fn topology_topic<'t>(&self, topic: &'t str) -> &'t str {
        topic
            .strip_prefix(self.application_id.as_str())
            .and_then(|t| t.strip_prefix('-'))
            .filter(|t| self.topology.as_ref().is_some_and(|top| top.is_internal(t)))
            .unwrap_or(topic)
    }

    /// The application's metadata (compacted, one partition): the restore mode its changelog
    /// is written in, under the key `restore-mode`.
    pub fn meta_topic(&self) -> String {
        format!("{}-meta", self.application_id)
    }

    /// The repartition topic: `<application.id>-repartition` (salted mode), or the topology's
    /// (`<application.id>-<name>-repartition`).
    pub fn repartition_topic(&self) -> String {
        match self
            .topology
            .as_ref()
            .and_then(|t| t.internal_topics().into_iter().next())
        {
            Some(internal) => format!("{}-{internal}", self.application_id),
            None => format!("{}-repartition", self.application_id),
        }
    }

    /// Whether hot keys are salted (two stages through the repartition topic).
    pub fn salted(&self) -> bool {
        self.salts > 1
    }

    /// The topic whose partitions are counted: the repartition topic in two stages, else the input.
    pub fn counted_topic(&self) -> String {
        if self.two_stage() {
            self.repartition_topic()
        } else {
            self.input.clone()
        }
    }

    /// Every topic whose partitions a task reads: the counted topic, and for a topology that
    /// joins, the other topics of its one sub-topology (co-partitioned: task n reads partition n
    /// of each).
    pub fn counted_topics(&self) -> Vec<String> {
        match self.topology.as_ref().map(|t| t.subtopologies()) {
            Some([only]) if only.sources.len() > 1 && only.internal_sources.is_empty() => {
                only.sources.clone()
            }
            _ => vec![self.counted_topic()],
        }
    }

    /// Where unreadable inputs are parked: `<application.id>-dead-letters`.
    pub fn dead_letter_topic(&self) -> String {
        format!("{}-dead-letters", self.application_id)
    }

    /// Creates what the processor writes to: the output topic and the internal topics (the
    /// changelog compacted, one partition per counted partition, so task n restores from
    /// changelog partition n). A missing input topic is created with `default_partitions`.
    /// Salted, the repartition topic gets max(input partitions, salts) partitions, so one key's
    /// salts can land on as many partitions as there are salts.
    pub async fn prepare_topics(&self, default_partitions: i32) -> Result<(), ProcessorError> {
        let kafka = |e: exactly_kafka::KafkaFlowError| ProcessorError(e.to_string());
        let mut partitions = exactly_kafka::partition_count(&self.kafka, &self.input).map_err(kafka)?;
        if partitions == 0 {
            exactly_kafka::ensure_topics(&self.kafka, &[&self.input], default_partitions)
                .await
                .map_err(kafka)?;
            partitions = default_partitions;
        }
        self.check_topology()?;
        self.refuse_other_jobs_changelog()?;
        let joined = self.counted_topics();
        for topic in joined.iter().filter(|t| joined.len() > 1 && **t != self.input) {
            let theirs = exactly_kafka::partition_count(&self.kafka, topic).map_err(kafka)?;
            let ours = exactly_kafka::partition_count(&self.kafka, &self.input).map_err(kafka)?;
            if theirs != ours {
                return Err(ProcessorError(format!(
                    "{topic} has {theirs} partitions and {} has {ours}: a join reads partition n of both in one task, \
                     so they must be co-partitioned (same key, same partition count)",
                    self.input
                )));
            }
        }
        let counted_partitions = if self.salted() {
            partitions.max(i32::try_from(self.salts).unwrap_or(i32::MAX))
        } else {
            partitions
        };
        let outputs = match &self.topology {
            Some(t) => t.output_topics(),
            None => vec![self.output.clone()],
        };
        let outputs: Vec<&str> = outputs.iter().map(String::as_str).collect();
        exactly_kafka::ensure_topics(&self.kafka, &outputs, counted_partitions)
            .await
            .map_err(kafka)?;
        let internal = |name: String, compacted: bool| exactly_kafka::InternalTopic {
            name,
            partitions: counted_partitions,
            replication_factor: self.replication_factor,
            min_insync_replicas: self.min_insync_replicas,
            compacted,
        };
        let mut topics = vec![
            internal(self.changelog_topic(), true),
            internal(self.dead_letter_topic(), false),
            exactly_kafka::InternalTopic {
                partitions: 1,
                ..internal(self.meta_topic(), true)
            },
        ];
        if self.two_stage() {
            topics.push(internal(self.repartition_topic(), false));
        }
        exactly_kafka::ensure_internal_topics(&self.kafka, &topics)
            .await
            .map_err(kafka)
    }
}

/// Counters a caller can read while the processor runs.
#[derive(Debug, Default)]
pub struct StreamCounters {
    /// Input records counted.
    pub counted: AtomicU64,
    /// Input records already counted in their window.
    pub duplicates: AtomicU64,
    /// Input records later than window end + grace.
    pub late: AtomicU64,
    /// Input records without readable headers or grouping key (parked on the dead-letter topic).
    pub unreadable: AtomicU64,
    /// Kafka transactions committed.
    pub commits: AtomicU64,
    /// Kafka transactions aborted.
    pub aborts: AtomicU64,
    /// Milliseconds the last restore took.
    pub last_restore_ms: AtomicU64,
    /// Tasks (input partitions) this processor holds now.
    pub tasks: AtomicU64,
}

/// The processor's `max.poll.interval.ms` (the rebalance timeout), unless the user sets one.
const PROCESSOR_MAX_POLL_INTERVAL_MS: &str = "30000";
/// How often a task whose restore could not start is tried again.
const RESTORE_RETRY: Duration = Duration::from_secs(1);
/// The longest a processing-loop turn reads changelogs for, so the group consumer is polled often.
const RESTORE_SLICE: Duration = Duration::from_millis(100);

/// The processor failed for good.
#[derive(Debug, thiserror::Error)]
#[error("stream processor: {0}")]
pub struct ProcessorError(String);

impl ProcessorError {
    pub(crate) fn new(message: impl Into<String>) -> Self {
        ProcessorError(message.into())
    }
}

fn fail(context: &str) -> impl Fn(KafkaError) -> ProcessorError + '_ {
    move |e| ProcessorError(format!("{context}: {e}"))
}

/// The processor's producer: transactional (`<application.id>-<instance>`, fencing an earlier
/// one of this instance) for exactly-once.
fn new_producer(config: &StreamConfig) -> Result<ThreadedProducer<TokenContext>, ProcessorError> {
    let mut producer_settings = producer_config(&config.kafka, true);
    if config.guarantee == Guarantee::ExactlyOnce {
        let transactional_id = format!("{}-{}", config.application_id, config.instance);
        producer_settings
            .set("transactional.id", &transactional_id)
            .set("transaction.timeout.ms", "60000");
    }
    let producer: ThreadedProducer<TokenContext> = producer_settings
        .create_with_context(TokenContext)
        .map_err(fail("create producer"))?;
    if config.guarantee == Guarantee::ExactlyOnce {
        producer
            .init_transactions(Duration::from_secs(30))
            .map_err(fail("init transactions"))?;
    }
    Ok(producer)
}

/// The processor's group consumer, subscribed to what it reads.
fn new_consumer(
    config: &StreamConfig,
    shared: &Arc<Mutex<Shared>>,
) -> Result<BaseConsumer<RebalanceContext>, ProcessorError> {
    {
        let mut client = consumer_config(&config.kafka, &config.application_id);
        exactly_kafka::static_membership(&mut client, config.group_instance_id.as_deref());
        // The rebalance timeout: how long a rebalance waits for a member that joined and died
        // (Kafka counts it as joined until then; the issue saw a group wait 268 s). A processor
        // polls between slices of at most a commit and a 100 ms restore step, so 30 s is
        // ample; a member that does exceed it has its commit refused and goes on.
        if config.kafka.client().get("max.poll.interval.ms").is_none() {
            client.set("max.poll.interval.ms", PROCESSOR_MAX_POLL_INTERVAL_MS);
        }
        // A join's task reads partition n of each co-partitioned topic: the range assignor
        // gives one member the same partition numbers of topics with equal partition counts.
        if config.counted_topics().len() > 1 {
            client.set("partition.assignment.strategy", "range");
        }
        let consumer: BaseConsumer<RebalanceContext> = client
            .create_with_context(RebalanceContext {
                shared: shared.clone(),
            })
            .map_err(fail("create consumer"))?;
        let repartition = config.repartition_topic();
        let counted = config.counted_topics();
        let topics: Vec<&str> = if config.two_stage() {
            vec![&config.input, &repartition]
        } else {
            counted.iter().map(String::as_str).collect()
        };
        consumer.subscribe(&topics).map_err(fail("subscribe"))?;
        tracing::info!(
            "joining group {} as {}",
            config.application_id,
            config.group_instance_id.as_deref().map_or_else(
                || "a dynamic member".to_owned(),
                |id| format!("static member {id}")
            )
        );
        Ok(consumer)
    }
}

/// State shared with the rebalance callback.
struct Shared {
    /// Counting tasks, by partition of the counted topic.
    tasks: BTreeMap<i32, TaskSlot>,
    /// Salted mode, stage one: per input partition, the next offset to commit with the open
    /// transaction, and the offset the last committed transaction left it at (where an abort
    /// seeks back to).
    forwarded: BTreeMap<i32, i64>,
    forward_committed: BTreeMap<i32, i64>,
    /// Counted partitions assigned here (tasks, and partitions whose store is being restored,
    /// paused until it is current).
    assigned: BTreeSet<i32>,
    /// A rebalance happened: the open transaction must be aborted and overlays discarded.
    rebalanced: bool,
    /// Partitions just put at a known offset (topic, partition, offset), for the processing
    /// loop's gap check: a first record past it is a gap to read twice.
    positioned: Vec<(String, i32, i64)>,
    config: StreamConfig,
    counters: Arc<StreamCounters>,
}

/// A task's state: the built-in count, or a topology's stores.
enum TaskState {
    Count(WindowedCount),
    Topology(TopologyTask),
}

impl TaskState {
    fn store(&self) -> &StateStore {
        match self {
            TaskState::Count(c) => c.store(),
            TaskState::Topology(t) => t.store(),
        }
    }

    fn take_batch(&mut self) -> Result<Batch, ProcessorError> {
        match self {
            TaskState::Count(c) => c.take_batch().map_err(|e| ProcessorError(e.to_string())),
            TaskState::Topology(t) => Ok(t.take_batch()),
        }
    }

    fn discard(&mut self) -> Result<(), ProcessorError> {
        match self {
            TaskState::Count(c) => c.discard().map_err(|e| ProcessorError(e.to_string())),
            TaskState::Topology(t) => {
                t.discard();
                Ok(())
            }
        }
    }

    fn skip(&mut self, topic: &str, partition: i32, offset: i64) {
        match self {
            TaskState::Count(c) => c.skip(topic, partition, offset),
            TaskState::Topology(t) => t.advance(topic, partition, offset),
        }
    }
}

struct TaskSlot {
    count: TaskState,
    /// The last transaction of this task that committed and is not yet marked in its changelog.
    unmarked: Option<TxnSeq>,
    touched: bool,
}

struct RebalanceContext {
    shared: Arc<Mutex<Shared>>,
}

fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl ClientContext for RebalanceContext {
    const ENABLE_REFRESH_OAUTH_TOKEN: bool = true;

    fn generate_oauth_token(
        &self,
        oauthbearer_config: Option<&str>,
    ) -> Result<rdkafka::client::OAuthToken, Box<dyn std::error::Error>> {
        exactly_kafka::refresh_oauth_token(oauthbearer_config)
    }

    fn stats(&self, statistics: rdkafka::Statistics) {
        let _ = exactly_kafka::export_consumer_lag(&statistics, "exactly_stream_lag_records");
    }
}

impl ConsumerContext for RebalanceContext {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let mut shared = lock(&self.shared);
        shared.rebalanced = true;
        if let Rebalance::Revoke(list) = rebalance {
            let counted = shared.config.counted_topics();
            for e in list.elements() {
                if counted.iter().any(|t| t == e.topic()) {
                    shared.tasks.remove(&e.partition());
                    shared.assigned.remove(&e.partition());
                } else {
                    shared.forwarded.remove(&e.partition());
                    shared.forward_committed.remove(&e.partition());
                }
            }
            shared.count_tasks();
        }
    }

    fn rebalance(
        &self,
        base_consumer: &BaseConsumer<Self>,
        err: rdkafka::types::RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let partitions: Vec<String> = tpl
            .elements()
            .iter()
            .map(|e| format!("{}/{}", e.topic(), e.partition()))
            .collect();
        if err == rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS {
            tracing::info!("the group assigned {partitions:?}");
            self.pre_rebalance(base_consumer, &Rebalance::Assign(tpl));
            // A counted partition with its task here goes on where its state says; one new here
            // waits, paused, while the processing loop restores its store (never in this
            // callback, which would hold up the group); a salted input partition (stateless
            // forwarding) starts at the group's offset.
            let mut shared = lock(&self.shared);
            let counted = shared.config.counted_topics();
            let mut positioned = TopicPartitionList::new();
            let mut waiting = TopicPartitionList::new();
            for e in tpl.elements() {
                let partition = e.partition();
                let in_task = counted.iter().any(|t| t == e.topic());
                let at = if !in_task {
                    Offset::Stored
                } else if shared.tasks.contains_key(&partition) {
                    shared.resume_offset(e.topic(), partition)
                } else {
                    waiting.add_partition(e.topic(), partition);
                    Offset::Beginning
                };
                if in_task {
                    shared.assigned.insert(partition);
                }
                if let Err(e) = positioned.add_partition_offset(e.topic(), partition, at) {
                    tracing::error!("cannot position partition {partition}: {e}");
                }
                if let Offset::Offset(offset) = at {
                    shared.positioned.push((e.topic().to_owned(), partition, offset));
                }
            }
            shared.count_tasks();
            drop(shared);
            if let Err(e) = base_consumer.assign(&positioned) {
                tracing::error!("assign failed: {e}");
            }
            if waiting.count() > 0 {
                if let Err(e) = base_consumer.pause(&waiting) {
                    tracing::error!("pausing partitions that wait for their restore failed: {e}");
                }
            }
        } else {
            tracing::info!("the group revoked {partitions:?}");
            let revoke = Rebalance::Revoke(tpl);
            self.pre_rebalance(base_consumer, &revoke);
            if let Err(e) = base_consumer.unassign() {
                tracing::error!("unassign failed: {e}");
            }
        }
    }
}

impl Shared {
    fn count_tasks(&self) {
        let n = self.tasks.len() as u64;
        self.counters.tasks.store(n, Ordering::Relaxed);
        metrics::gauge!("exactly_stream_tasks").set(n as f64);
    }

    /// Where task `partition` resumes reading `counted` (one of its topics): the offset its
    /// restored state reflects, or the beginning when it has none.
    fn resume_offset(&self, counted: &str, partition: i32) -> Offset {
        self.tasks
            .get(&partition)
            .and_then(|t| {
                t.count
                    .store()
                    .offsets()
                    .ok()?
                    .into_iter()
                    .find(|(topic, p, _)| *topic == counted && *p == partition)
                    .map(|(_, _, o)| o)
            })
            .map_or(Offset::Beginning, Offset::Offset)
    }
}

/// How to restore on `config`'s broker: without transactions nothing is ever aborted; with
/// them, a proven probe on the application's meta topic (an aborted record, then a committed
/// sentinel read back; [`exactly_kafka::prove_broker_hides_aborted_records`]) says whether
/// read_committed readers miss aborted records (Kafka) or see them (Tansu 0.6.0).
pub fn probe_restore_mode(config: &StreamConfig) -> Result<RestoreMode, ProcessorError> {
    let decided = if config.guarantee == Guarantee::AtLeastOnce {
        RestoreMode::ReadCommitted
    } else {
        // Its own transactional id per instance: a probe killed half-way is aborted by the
        // next start of the same instance, not left to hold the meta topic back.
        let probe_id = format!("{}-{}-probe", config.application_id, config.instance);
        let hides =
            exactly_kafka::prove_broker_hides_aborted_records(&config.kafka, &config.meta_topic(), &probe_id)
                .map_err(|e| ProcessorError(format!("abort probe: {e}")))?;
        if !hides {
            tracing::warn!(
                "this broker shows aborted records to read_committed readers: changelogs are restored \
                 through commit markers (Kafka hides them; see docs/guarantees.md)"
            );
        }
        RestoreMode::for_broker(hides)
    };
    settle_restore_mode(config, decided)
}

/// The key of the restore mode in the application's meta topic.
const MODE_KEY: &str = "restore-mode";

/// Checks `decided` against the mode the application's changelog was written in (its meta
/// topic), records it on the first start, and refuses a different one
/// ([`exactly_core::changelog::settle_mode`]).
fn settle_restore_mode(config: &StreamConfig, decided: RestoreMode) -> Result<RestoreMode, ProcessorError> {
    let topic = config.meta_topic();
    let mut written = None;
    exactly_kafka::read_to_stable_end(&config.kafka, &topic, 0, Duration::from_secs(60), |m| {
        if m.key() == Some(MODE_KEY.as_bytes()) {
            written = Some(m.payload().unwrap_or_default().to_vec());
        }
    })
    .map_err(|e| ProcessorError(format!("reading {topic}: {e}")))?;
    let written = match written {
        None => None,
        Some(bytes) => Some(
            RestoreMode::parse(&String::from_utf8_lossy(&bytes))
                .ok_or_else(|| ProcessorError(format!("{topic}: {MODE_KEY} holds an unknown mode")))?,
        ),
    };
    let (mode, record) = exactly_core::changelog::settle_mode(written, decided)
        .map_err(|e| ProcessorError(format!("{}: {e}", config.application_id)))?;
    if record {
        let producer: ThreadedProducer<TokenContext> = producer_config(&config.kafka, true)
            .create_with_context(TokenContext)
            .map_err(fail("create meta producer"))?;
        producer
            .send(
                BaseRecord::<str, str>::to(&topic)
                    .key(MODE_KEY)
                    .payload(mode.as_str()),
            )
            .map_err(|(e, _)| ProcessorError(format!("record the restore mode: {e}")))?;
        producer
            .flush(Duration::from_secs(30))
            .map_err(fail("record the restore mode"))?;
    }
    Ok(mode)
}

/// A count input as it travels on the repartition topic (salted mode): the salted grouping key,
/// the input's idempotency key (so stage two dedupes per window) and its event time.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Repartitioned {
    key: String,
    idempotency_key: String,
    event_time: UnixMillis,
}

impl Repartitioned {
    fn encode(&self) -> String {
        serde_json::json!({ "key": self.key, "id": self.idempotency_key, "t": self.event_time.0 }).to_string()
    }

    fn decode(payload: &[u8]) -> Result<Repartitioned, String> {
        let value: serde_json::Value =
            serde_json::from_slice(payload).map_err(|e| format!("repartition record is not JSON: {e}"))?;
        let field = |name: &str| {
            value
                .get(name)
                .and_then(|v| v.as_str())
                .map(str::to_owned)
                .ok_or_else(|| format!("repartition record has no {name}"))
        };
        Ok(Repartitioned {
            key: field("key")?,
            idempotency_key: field("id")?,
            event_time: UnixMillis(
                value
                    .get("t")
                    .and_then(serde_json::Value::as_i64)
                    .ok_or_else(|| "repartition record has no event time".to_owned())?,
            ),
        })
    }
}

/// Reads a gap in a partition's offsets twice (see [`exactly_core::offset_gap`]): the first
/// time, seek back to its first offset and drop this record (false), so records the broker
/// served past, if any, are counted before it; a gap still there on the second read holds
/// no record (a transaction marker) and is stepped over.
fn gap_checked(
    gaps: &mut OffsetGapCheck<(String, i32)>,
    consumer: &BaseConsumer<RebalanceContext>,
    m: &rdkafka::message::BorrowedMessage<'_>,
) -> bool {
    let tp = (m.topic().to_owned(), m.partition());
    let verdict = gaps.observe(&tp, m.offset());
    match verdict {
        GapVerdict::Refetch { .. } => {
            metrics::counter!("exactly_stream_offset_gap_refetches_total").increment(1)
        }
        GapVerdict::Filled { .. } => {
            metrics::counter!("exactly_stream_offset_gaps_filled_total").increment(1)
        }
        GapVerdict::Take | GapVerdict::AcrossGap { .. } => {}
    }
    match follow_gap_verdict(consumer, m, verdict) {
        GapFollowed::Take => true,
        GapFollowed::Rereading => false,
        GapFollowed::SeekFailed => {
            gaps.refetch_failed(&tp);
            false
        }
    }
}

/// Runs one processor until `stop` is set.
pub struct Processor {
    config: StreamConfig,
    consumer: BaseConsumer<RebalanceContext>,
    producer: ThreadedProducer<TokenContext>,
    shared: Arc<Mutex<Shared>>,
    counters: Arc<StreamCounters>,
    /// A new epoch on every start and after every abort, so that inside one epoch every
    /// transaction before a committed one committed too (what a per-epoch marker claims).
    epoch: u64,
    seq: u64,
    restore_mode: RestoreMode,
    /// The offsets handed to this consumer, per partition, to read each gap in them twice.
    gaps: OffsetGapCheck<(String, i32)>,
    faults: exactly_kafka::Faults,
    /// Restores the stores of tasks new here, a slice per loop turn.
    restorer: Restorer,
    /// Partitions whose restore could not start, and when it was last tried.
    restore_failed: BTreeMap<i32, Instant>,
    /// Tasks reading several topics (a join) take their records in timestamp order: fetched
    /// records wait here until then.
    ordered: Option<OrderedInputs>,
    /// The topics whose partitions are tasks ([`StreamConfig::counted_topics`], asked per
    /// record).
    counted_topics: Vec<String>,
}

/// Why a commit was refused because this member no longer owns what it processed: the group
/// rebalanced between its last poll and the commit (a stale generation, an unknown member, a
/// rebalance in progress, another static member with its id). The partitions' next owner
/// resumes from the committed offsets; this member drops what it did not commit and rejoins.
fn lost_ownership(error: &KafkaError) -> Option<RDKafkaErrorCode> {
    let code = match error {
        KafkaError::ConsumerCommit(code) => *code,
        KafkaError::Transaction(e) => e.code(),
        _ => return None,
    };
    matches!(
        code,
        RDKafkaErrorCode::IllegalGeneration
            | RDKafkaErrorCode::UnknownMemberId
            | RDKafkaErrorCode::RebalanceInProgress
            | RDKafkaErrorCode::FencedInstanceId
    )
    .then_some(code)
}

impl Processor {
    /// Creates the internal topics, the transactional producer (fencing an earlier one of this
    /// instance) and the consumer.
    pub fn new(config: StreamConfig, counters: Arc<StreamCounters>) -> Result<Self, ProcessorError> {
        let producer = new_producer(&config)?;
        let restore_mode = probe_restore_mode(&config)?;
        let shared = Arc::new(Mutex::new(Shared {
            tasks: BTreeMap::new(),
            forwarded: BTreeMap::new(),
            forward_committed: BTreeMap::new(),
            assigned: BTreeSet::new(),
            rebalanced: false,
            positioned: Vec::new(),
            config: config.clone(),
            counters: counters.clone(),
        }));
        let consumer = new_consumer(&config, &shared)?;
        let epoch = exactly_kafka::now().0.max(0) as u64;
        let restorer = Restorer::new(&config, restore_mode)?;
        let config_topics = config.counted_topics();
        Ok(Processor {
            config,
            consumer,
            producer,
            shared,
            counters,
            epoch,
            seq: 0,
            restore_mode,
            gaps: OffsetGapCheck::default(),
            faults: exactly_kafka::Faults::none(),
            restorer,
            restore_failed: BTreeMap::new(),
            ordered: OrderedInputs::for_topics(config_topics.clone()),
            counted_topics: config_topics,
        })
    }

    /// Adds fault points (tests).
    pub fn with_faults(mut self, faults: exactly_kafka::Faults) -> Self {
        self.faults = faults;
        self
    }

    /// Processes until `stop` turns true, then commits what is open.
    pub fn run(&mut self, stop: &AtomicBool) -> Result<(), ProcessorError> {
        let mut open_since: Option<Instant> = None;
        while !stop.load(Ordering::Relaxed) {
            // A restore waits for the changelog's open transactions to end; this processor's
            // own never writes to a partition being restored (a rebalance aborts it first).
            self.restore_step()?;
            let message = self.consumer.poll(Duration::from_millis(20));
            if std::mem::take(&mut lock(&self.shared).rebalanced) {
                // Partitions start anew where the group or their state puts them.
                self.gaps = OffsetGapCheck::default();
                self.expect_positioned();
                if let Some(ordered) = &mut self.ordered {
                    ordered.clear();
                }
                if open_since.take().is_some() {
                    self.abort()?;
                }
                // The message, if any, was fetched before the new positions: it comes again.
                continue;
            }
            match message {
                Some(Ok(m)) => {
                    if !gap_checked(&mut self.gaps, &self.consumer, &m) {
                        continue;
                    }
                    let unordered = match &mut self.ordered {
                        Some(ordered) => ordered.push(m),
                        None => Some(m),
                    };
                    if let Some(m) = unordered {
                        self.begin(&mut open_since)?;
                        self.process(&m)?;
                    }
                }
                Some(Err(e)) => tracing::debug!("consumer: {e}"),
                None => {}
            }
            // A join's tasks: every record that is the earliest of its task now.
            while open_since.is_none_or(|t| t.elapsed() < self.config.commit_interval) {
                let Some(m) = self.ordered.as_mut().and_then(|o| o.take(&self.consumer)) else {
                    break;
                };
                self.begin(&mut open_since)?;
                self.process(&m)?;
            }
            if open_since.is_some_and(|t| t.elapsed() >= self.config.commit_interval) {
                open_since = None;
                self.commit()?;
            }
        }
        if open_since.is_some() {
            self.commit()?;
        }
        Ok(())
    }

    /// Opens a transaction (exactly once) for the record about to be processed, unless one is
    /// open.
    fn begin(&self, open_since: &mut Option<Instant>) -> Result<(), ProcessorError> {
        if open_since.is_none() {
            if self.transactional() {
                self.producer
                    .begin_transaction()
                    .map_err(fail("begin transaction"))?;
            }
            *open_since = Some(Instant::now());
        }
        Ok(())
    }

    /// One turn of the restores: starts those of tasks newly assigned, stops those of tasks
    /// revoked, reads a slice of the changelogs, and starts the tasks whose stores are current
    /// where their state says. Until then their input partitions stay paused: counting them
    /// without their state would count again what the changelog already holds.
    fn restore_step(&mut self) -> Result<(), ProcessorError> {
        let (assigned, tasks): (BTreeSet<i32>, BTreeSet<i32>) = {
            let shared = lock(&self.shared);
            (shared.assigned.clone(), shared.tasks.keys().copied().collect())
        };
        let restoring: BTreeSet<i32> = self.restorer.restoring().collect();
        for &partition in restoring.difference(&assigned) {
            self.restorer.stop(partition);
        }
        self.restore_failed.retain(|p, _| assigned.contains(p));
        for &partition in assigned.difference(&tasks) {
            if restoring.contains(&partition)
                || self
                    .restore_failed
                    .get(&partition)
                    .is_some_and(|t| t.elapsed() < RESTORE_RETRY)
            {
                continue;
            }
            match self.restorer.start(partition) {
                Ok(()) => {
                    self.restore_failed.remove(&partition);
                }
                Err(e) => {
                    tracing::warn!(
                        "partition {partition}: its restore cannot start yet; it stays paused: {e}"
                    );
                    self.restore_failed.insert(partition, Instant::now());
                }
            }
        }
        metrics::gauge!("exactly_stream_tasks_restoring")
            .set((self.restorer.len() + self.restore_failed.len()) as f64);
        if self.restorer.is_empty() {
            return Ok(());
        }
        let restored = match self.restorer.step(RESTORE_SLICE) {
            Ok(restored) => restored,
            Err(e) => {
                // The broker did not answer: the restores go on at the next turn.
                tracing::warn!("restore: {e}");
                return Ok(());
            }
        };
        for (partition, store, stats) in restored {
            self.start_task(partition, store, stats)?;
        }
        self.expect_positioned();
        Ok(())
    }

    /// A task whose store is current: it counts from the input offset its state reflects.
    fn start_task(
        &mut self,
        partition: i32,
        store: StateStore,
        stats: RestoreStats,
    ) -> Result<(), ProcessorError> {
        // Salting happens before the repartition topic; the count sees salted keys as they are.
        let count = if self.config.topology.is_some() {
            TaskState::Topology(TopologyTask::new(store))
        } else {
            TaskState::Count(
                WindowedCount::new(store, self.config.windows, 1)
                    .map_err(|e| ProcessorError(e.to_string()))?
                    .with_max_skew_ms(self.config.max_event_time_skew_ms),
            )
        };
        self.counters
            .last_restore_ms
            .store(stats.elapsed.as_millis() as u64, Ordering::Relaxed);
        metrics::gauge!("exactly_stream_restore_seconds").set(stats.elapsed.as_secs_f64());
        metrics::gauge!("exactly_stream_task_restore_seconds", "partition" => partition.to_string())
            .set(stats.elapsed.as_secs_f64());
        tracing::info!(
            "partition {partition}: restored {} changes from {} changelog records (from offset {}, {} uncommitted or unusable dropped) in {:?}",
            stats.entries,
            stats.records,
            stats.resumed_at,
            stats.dropped,
            stats.elapsed
        );
        let mut shared = lock(&self.shared);
        if !shared.assigned.contains(&partition) {
            // Revoked in the meantime.
            return Ok(());
        }
        // Unmarked commits before this restore stay unmarked for good: their changes were not
        // restored, their inputs are read again.
        shared.tasks.insert(
            partition,
            TaskSlot {
                count,
                unmarked: None,
                touched: false,
            },
        );
        shared.count_tasks();
        let positions: Vec<(String, Offset)> = shared
            .config
            .counted_topics()
            .into_iter()
            .map(|t| {
                let at = shared.resume_offset(&t, partition);
                (t, at)
            })
            .collect();
        drop(shared);
        let mut started = TopicPartitionList::new();
        for (counted, at) in &positions {
            started
                .add_partition_offset(counted, partition, *at)
                .map_err(fail("position"))?;
        }
        // The partitions are paused: seek, then resume. A seek librdkafka refuses (the partition
        // not fetching yet) is tried again shortly; if it still fails, the task restores again.
        let mut sought = Ok(());
        for (counted, at) in &positions {
            sought = self
                .consumer
                .seek(counted, partition, *at, Duration::from_secs(10));
            for _ in 0..10 {
                if sought.is_ok() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
                sought = self
                    .consumer
                    .seek(counted, partition, *at, Duration::from_secs(10));
            }
            if sought.is_err() {
                break;
            }
        }
        let at = positions.first().map_or(Offset::Beginning, |(_, at)| *at);
        if let Err(e) = sought {
            tracing::warn!(
                "partition {partition}: cannot seek to {at:?} after its restore ({e}); restoring it again"
            );
            lock(&self.shared).tasks.remove(&partition);
            self.restore_failed.insert(partition, Instant::now());
            return Ok(());
        }
        if let Err(e) = self.consumer.resume(&started) {
            tracing::warn!(
                "partition {partition}: resume after its restore failed ({e}); restoring it again"
            );
            lock(&self.shared).tasks.remove(&partition);
            self.restore_failed.insert(partition, Instant::now());
            return Ok(());
        }
        for (counted, at) in positions {
            if let Offset::Offset(offset) = at {
                lock(&self.shared).positioned.push((counted, partition, offset));
            }
        }
        tracing::info!("partition {partition}: processing from {at:?}");
        Ok(())
    }

    /// Hands the partitions just put at a known offset to the gap check.
    fn expect_positioned(&mut self) {
        for (topic, partition, offset) in std::mem::take(&mut lock(&self.shared).positioned) {
            if let Some(ordered) = &mut self.ordered {
                ordered.positioned(&topic, partition, offset);
            }
            self.gaps.expect(&(topic, partition), offset);
        }
    }

    fn transactional(&self) -> bool {
        self.config.guarantee == Guarantee::ExactlyOnce
    }

    /// Routes a record: salted input goes to the repartition topic; everything else is counted.
    fn process(&self, m: &impl Message) -> Result<(), ProcessorError> {
        if let Some(topology) = &self.config.topology {
            return self.process_topology(topology, m);
        }
        if self.config.salted() && m.topic() == self.config.input {
            return self.forward(m);
        }
        let counted = if self.config.salted() {
            match Repartitioned::decode(m.payload().unwrap_or_default()) {
                Ok(r) => r,
                Err(why) => return self.unreadable(m, &why),
            }
        } else {
            match self.read_input(m) {
                Ok(r) => r,
                Err(why) => return self.unreadable(m, &why),
            }
        };
        self.count(m, counted)
    }

    /// Runs a record through the topology: in its task (the counted topic), or, in stage one,
    /// statelessly; its outputs go out in the open transaction, repartitioned records to the
    /// application's internal topic; a record the topology refuses is parked.
    fn process_topology(&self, topology: &Topology, m: &impl Message) -> Result<(), ProcessorError> {
        let partition = m.partition();
        let header_list: Vec<(&str, Option<&[u8]>)> = m
            .headers()
            .map(|h| h.iter().map(|h| (h.key, h.value)).collect())
            .unwrap_or_default();
        let input = InputRecord {
            topic: self.config.topology_topic(m.topic()),
            partition,
            offset: m.offset(),
            key: m.key(),
            value: m.payload(),
            headers: &header_list,
            timestamp: m.timestamp().to_millis(),
            // As the built-in job: far-future event times are parked, not counted.
            latest_event_time: Some(
                exactly_kafka::now()
                    .0
                    .saturating_add(self.config.max_event_time_skew_ms),
            ),
        };
        let in_task = self.counted_topics.iter().any(|t| t == m.topic());
        let processed = {
            let mut shared = lock(&self.shared);
            if in_task {
                let Some(slot) = shared.tasks.get_mut(&partition) else {
                    // Not (or no longer) assigned here.
                    return Ok(());
                };
                slot.touched = true;
                let TaskState::Topology(task) = &mut slot.count else {
                    return Err(ProcessorError("a built-in task got a topology's record".into()));
                };
                let processed = topology
                    .process(&input, task)
                    .map_err(|e| ProcessorError(format!("partition {partition}: {e}")))?;
                task.advance(m.topic(), partition, m.offset());
                processed
            } else {
                shared.forward_committed.entry(partition).or_insert(m.offset());
                shared.forwarded.insert(partition, m.offset() + 1);
                topology
                    .process(&input, &mut MemoryState::default())
                    .map_err(|e| ProcessorError(format!("partition {partition}: {e}")))?
            }
        };
        if processed.late > 0 {
            self.counters.late.fetch_add(processed.late, Ordering::Relaxed);
            metrics::counter!("exactly_stream_late_dropped_total").increment(processed.late);
        }
        if processed.duplicates > 0 {
            self.counters
                .duplicates
                .fetch_add(processed.duplicates, Ordering::Relaxed);
            metrics::counter!("exactly_stream_duplicates_total").increment(processed.duplicates);
        }
        if let Some(reason) = processed.parked {
            return self.unreadable(m, &reason);
        }
        if in_task {
            self.counters.counted.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("exactly_stream_records_total").increment(1);
        }
        for out in processed.outputs {
            let topic = if out.internal {
                format!("{}-{}", self.config.application_id, out.topic)
            } else {
                out.topic
            };
            let mut headers = OwnedHeaders::new();
            for (k, v) in &out.headers {
                headers = headers.insert(Header {
                    key: k,
                    value: Some(v),
                });
            }
            let mut record = BaseRecord::<[u8], [u8]>::to(&topic)
                .headers(headers)
                .timestamp(out.timestamp);
            if let Some(key) = &out.key {
                record = record.key(key);
            }
            if let Some(value) = &out.value {
                record = record.payload(value);
            }
            self.send(record)?;
        }
        Ok(())
    }

    /// What the count needs from an input record: its grouping key, idempotency key and event
    /// time; an error is the reason to park it.
    fn read_input(&self, m: &impl Message) -> Result<Repartitioned, String> {
        let delivery = decode_message(m).map_err(|e| e.to_string())?;
        let payload = &delivery.envelope.payload;
        let key = match &self.config.group_by {
            GroupBy::AggregateId => Some(delivery.envelope.aggregate_id.clone()),
            GroupBy::PayloadField(field) => serde_json::from_slice::<serde_json::Value>(payload)
                .ok()
                .and_then(|v| v.get(field)?.as_str().map(str::to_owned)),
        };
        let key = key.ok_or_else(|| "grouping key missing from the payload".to_owned())?;
        Ok(Repartitioned {
            key,
            idempotency_key: delivery.key.to_string(),
            event_time: delivery.envelope.occurred_at,
        })
    }

    /// Salted mode, stage one: sends the record's count input to the repartition topic, keyed
    /// by its salted key (so the default partitioner spreads one key's salts), inside the open
    /// transaction; its input offset commits with it.
    fn forward(&self, m: &impl Message) -> Result<(), ProcessorError> {
        let partition = m.partition();
        {
            let mut shared = lock(&self.shared);
            shared.forward_committed.entry(partition).or_insert(m.offset());
        }
        let mut input = match self.read_input(m) {
            Ok(r) => r,
            Err(why) => {
                self.unreadable(m, &why)?;
                lock(&self.shared).forwarded.insert(partition, m.offset() + 1);
                return Ok(());
            }
        };
        input.key = salted_key(&input.key, &input.idempotency_key, self.config.salts);
        let value = input.encode();
        self.send(
            BaseRecord::<str, str>::to(&self.config.repartition_topic())
                .key(&input.key)
                .payload(&value),
        )?;
        lock(&self.shared).forwarded.insert(partition, m.offset() + 1);
        Ok(())
    }

    /// Counts one record in its task.
    fn count(&self, m: &impl Message, input: Repartitioned) -> Result<(), ProcessorError> {
        let Repartitioned {
            key,
            idempotency_key,
            event_time,
        } = input;
        let partition = m.partition();
        let outcome = {
            let mut shared = lock(&self.shared);
            let Some(slot) = shared.tasks.get_mut(&partition) else {
                // Not (or no longer) assigned here.
                return Ok(());
            };
            slot.touched = true;
            let TaskState::Count(count) = &mut slot.count else {
                return Err(ProcessorError(
                    "a topology task got a record of the built-in job".into(),
                ));
            };
            count
                .process(Input {
                    topic: m.topic(),
                    partition,
                    offset: m.offset(),
                    key: &key,
                    idempotency_key: &idempotency_key,
                    event_time,
                    now: exactly_kafka::now(),
                })
                .map_err(|e| ProcessorError(e.to_string()))?
        };
        match outcome {
            Counted::Updated {
                window_start,
                key,
                count,
            } => {
                self.counters.counted.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("exactly_stream_records_total").increment(1);
                metrics::histogram!("exactly_stream_latency_seconds")
                    .record(exactly_kafka::now().millis_since(event_time) as f64 / 1000.0);
                self.emit(partition, window_start, &key, count)?;
            }
            Counted::Duplicate => {
                self.counters.duplicates.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("exactly_stream_duplicates_total").increment(1);
            }
            Counted::Late => {
                self.counters.late.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("exactly_stream_late_dropped_total").increment(1);
            }
            Counted::Refused(why) => return self.unreadable(m, &why.to_string()),
        }
        Ok(())
    }

    /// Parks an input that cannot be counted on the dead-letter topic, with its bytes, its
    /// headers and the reason, inside the open transaction (so it is parked exactly once, and
    /// its offset commits with the state).
    fn unreadable(&self, m: &impl Message, why: &str) -> Result<(), ProcessorError> {
        let origin = format!("{}/{}@{}", m.topic(), m.partition(), m.offset());
        tracing::warn!("{origin} parked on {}: {why}", self.config.dead_letter_topic());
        let mut headers = OwnedHeaders::new();
        if let Some(original) = m.headers() {
            for h in original.iter() {
                headers = headers.insert(Header {
                    key: h.key,
                    value: h.value,
                });
            }
        }
        let headers = headers
            .insert(Header {
                key: DEAD_REASON_HEADER,
                value: Some(why),
            })
            .insert(Header {
                key: DEAD_ORIGIN_HEADER,
                value: Some(&origin),
            });
        let topic = self.config.dead_letter_topic();
        let mut record = BaseRecord::<[u8], [u8]>::to(&topic)
            .partition(m.partition())
            .headers(headers);
        if let Some(key) = m.key() {
            record = record.key(key);
        }
        if let Some(payload) = m.payload() {
            record = record.payload(payload);
        }
        self.send(record)?;
        self.counters.unreadable.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("exactly_stream_dead_letters_total").increment(1);
        let mut shared = lock(&self.shared);
        if self.counted_topics.iter().any(|t| t == m.topic()) {
            if let Some(slot) = shared.tasks.get_mut(&m.partition()) {
                slot.touched = true;
                slot.count.skip(m.topic(), m.partition(), m.offset());
            }
        }
        Ok(())
    }

    fn emit(
        &self,
        partition: i32,
        window_start: UnixMillis,
        key: &str,
        count: u64,
    ) -> Result<(), ProcessorError> {
        // Only a salted key is unsalted: with salting off a key such as `P#3` is the key itself.
        let unsalted = if self.config.salted() {
            unsalted_key(key)
        } else {
            key
        };
        let value = serde_json::json!({
            "key": unsalted,
            "partial": format!("{key}#p{partition}"),
            "window_start": window_start.0,
            "window_end": window_start.0 + self.config.windows.size_ms,
            "count": count,
        })
        .to_string();
        let record_key = format!("{key}@{}#p{partition}", window_start.0);
        self.send(
            BaseRecord::<str, str>::to(&self.config.output)
                .key(&record_key)
                .payload(&value),
        )
    }

    fn send<K: rdkafka::message::ToBytes + ?Sized, P: rdkafka::message::ToBytes + ?Sized>(
        &self,
        mut record: BaseRecord<'_, K, P>,
    ) -> Result<(), ProcessorError> {
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((e, _)) => return Err(ProcessorError(format!("send: {e}"))),
            }
        }
    }

    /// Changelog records, input offsets and the commit, then the local stores.
    fn commit(&mut self) -> Result<(), ProcessorError> {
        let txn = TxnSeq {
            epoch: self.epoch,
            seq: self.seq,
        };
        self.seq += 1;
        let changelog = self.config.changelog_topic();
        let mut batches = Vec::new();
        let mut offsets = TopicPartitionList::new();
        let forwarded: Vec<(i32, i64)>;
        {
            let mut shared = lock(&self.shared);
            forwarded = shared.forwarded.iter().map(|(p, o)| (*p, *o)).collect();
            for (partition, offset) in &forwarded {
                offsets
                    .add_partition_offset(&self.config.input, *partition, Offset::Offset(*offset))
                    .map_err(fail("offsets"))?;
            }
            for (partition, slot) in shared.tasks.iter_mut() {
                if !std::mem::take(&mut slot.touched) {
                    continue;
                }
                let batch = slot.count.take_batch()?;
                for change in &batch.changes {
                    if let Change::Offset {
                        topic,
                        partition,
                        offset,
                    } = change
                    {
                        offsets
                            .add_partition_offset(topic, *partition, Offset::Offset(*offset))
                            .map_err(fail("offsets"))?;
                    }
                }
                let marker = slot.unmarked.filter(|_| self.restore_mode.writes_markers());
                for record in records_for(txn, marker, &batch) {
                    let headers = OwnedHeaders::new().insert(Header {
                        key: TXN_HEADER,
                        value: Some(&record.txn),
                    });
                    let mut r = BaseRecord::<str, str>::to(&changelog)
                        .key(&record.key)
                        .partition(*partition)
                        .headers(headers);
                    if let Some(v) = &record.value {
                        r = r.payload(v);
                    }
                    self.send(r)?;
                }
                batches.push((*partition, batch));
            }
        }
        let started = Instant::now();
        let result = if self.faults.fires(exactly_kafka::FaultPoint::StreamCommitRefused) {
            Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::IllegalGeneration))
        } else if self.transactional() {
            let metadata = self
                .consumer
                .group_metadata()
                .ok_or_else(|| ProcessorError("no group metadata".into()))?;
            self.producer
                .send_offsets_to_transaction(&offsets, &metadata, Duration::from_secs(30))
                .and_then(|()| {
                    self.producer.flush(Duration::from_secs(30))?;
                    self.producer.commit_transaction(Duration::from_secs(30))
                })
        } else {
            // At least once: what was sent is acknowledged before the offsets move past it.
            self.producer.flush(Duration::from_secs(30)).and_then(|()| {
                self.consumer
                    .commit(&offsets, rdkafka::consumer::CommitMode::Sync)
            })
        };
        match result {
            Ok(()) => {
                self.counters.commits.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("exactly_stream_commits_total").increment(1);
                metrics::histogram!("exactly_stream_commit_seconds").record(started.elapsed().as_secs_f64());
                let mut shared = lock(&self.shared);
                for (partition, offset) in forwarded {
                    shared.forward_committed.insert(partition, offset);
                }
                shared.forwarded.clear();
                let mut bytes = 0u64;
                for (partition, batch) in batches {
                    if let Some(slot) = shared.tasks.get_mut(&partition) {
                        slot.count
                            .store()
                            .commit(&batch)
                            .map_err(|e| ProcessorError(e.to_string()))?;
                        slot.unmarked = Some(txn);
                    }
                }
                for partition in shared.tasks.keys() {
                    let path = crate::restore::store_path(&shared.config.state_dir, *partition);
                    bytes += std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
                }
                metrics::gauge!("exactly_stream_store_bytes").set(bytes as f64);
                Ok(())
            }
            Err(e) => {
                if let Some(code) = lost_ownership(&e) {
                    tracing::warn!(
                        "commit refused ({code:?}): the group moved on; dropping what was not committed, \
                         rejoining, and going on from the committed offsets"
                    );
                    metrics::counter!("exactly_stream_commits_refused_total").increment(1);
                    return self.abort();
                }
                match &e {
                    KafkaError::Transaction(t) if t.txn_requires_abort() => {
                        tracing::warn!("transaction aborted: {e}");
                        self.abort()
                    }
                    KafkaError::Transaction(t) if t.is_fatal() => {
                        // Fenced: another producer with this transactional id started (a second
                        // process with this instance name, or this one's zombie). Start a new
                        // producer, which fences it in turn, and go on from the committed state.
                        tracing::warn!("producer fenced ({e}): starting a new one");
                        self.producer = new_producer(&self.config)?;
                        self.reset_to_committed()
                    }
                    _ => Err(ProcessorError(format!("commit: {e}"))),
                }
            }
        }
    }

    /// Aborts the open transaction, drops every overlay and puts each partition back at the
    /// offset its committed state reflects.
    fn abort(&mut self) -> Result<(), ProcessorError> {
        if self.transactional() {
            self.producer
                .abort_transaction(Duration::from_secs(30))
                .map_err(fail("abort"))?;
        }
        self.reset_to_committed()
    }

    /// Drops every overlay and puts each partition back at the offset its committed state
    /// reflects; a new epoch starts.
    fn reset_to_committed(&mut self) -> Result<(), ProcessorError> {
        self.counters.aborts.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("exactly_stream_aborts_total").increment(1);
        // The aborted transaction ends its epoch: a later marker of this epoch would otherwise
        // claim it committed.
        self.epoch = (exactly_kafka::now().0.max(0) as u64).max(self.epoch + 1);
        self.seq = 0;
        // Every partition is put back: what it hands next is a redelivery, not a gap, and
        // what was buffered comes again.
        self.gaps = OffsetGapCheck::default();
        if let Some(ordered) = &mut self.ordered {
            ordered.clear();
        }
        let mut shared = lock(&self.shared);
        shared.forwarded.clear();
        let input = shared.config.input.clone();
        if shared.config.two_stage() {
            for (partition, offset) in &shared.forward_committed {
                if let Err(e) = self.consumer.seek(
                    &input,
                    *partition,
                    Offset::Offset(*offset),
                    Duration::from_secs(10),
                ) {
                    tracing::warn!("seek back of input partition {partition} failed: {e}");
                } else {
                    self.gaps.expect(&(input.clone(), *partition), *offset);
                }
            }
        }
        let counted_topics = shared.config.counted_topics();
        for (partition, slot) in shared.tasks.iter_mut() {
            slot.touched = false;
            slot.count.discard()?;
            let offsets = slot
                .count
                .store()
                .offsets()
                .map_err(|e| ProcessorError(e.to_string()))?;
            for counted in &counted_topics {
                let offset = offsets
                    .iter()
                    .find(|(t, p, _)| t == counted && p == partition)
                    .map_or(Offset::Beginning, |(_, _, o)| Offset::Offset(*o));
                match self
                    .consumer
                    .seek(counted, *partition, offset, Duration::from_secs(10))
                {
                    Err(e) => tracing::warn!("seek back of {counted}/{partition} failed: {e}"),
                    Ok(()) => {
                        if let Offset::Offset(offset) = offset {
                            self.gaps.expect(&(counted.clone(), *partition), offset);
                            if let Some(ordered) = &mut self.ordered {
                                ordered.positioned(counted, *partition, offset);
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }
}
