//! Tasks that read several co-partitioned topics (a join) take their records in timestamp
//! order, as Kafka Streams does: what the consumer hands over waits in the task's
//! [`TaskQueue`] until it is the earliest, or until the partitions that could bring an earlier
//! one are known to be read to their end ([`exactly_core::task_order`]).
//!
//! Nothing here moves the committed positions: a task commits the offsets of the records it
//! processed, so records still buffered when the process dies are read again; every path that
//! puts the consumer back (an abort, a rebalance, a task's start) clears the buffers first.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use exactly_core::task_order::{Lag, Next, TaskQueue};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::message::{BorrowedMessage, Message, OwnedMessage};
use rdkafka::Offset;

/// How long a task waits for a partition that has records it has not fetched yet, before it
/// goes on without it (Kafka Streams' enforced processing): a broker that never lets the
/// position reach the end it reports (an open transaction on a table's topic) slows the task
/// down by this much, once, and never stalls it.
pub const MAX_TASK_IDLE: Duration = Duration::from_secs(2);

/// The buffered records of every task of a processor whose tasks read several topics.
pub(crate) struct OrderedInputs {
    /// The topics a task reads, in the order ties go in (the topology's sources).
    topics: Vec<String>,
    queues: BTreeMap<i32, TaskQueue<OwnedMessage>>,
    /// Where each partition was last put (a seek or an assignment at an offset): its position
    /// until the client hands over a record of it (librdkafka forgets the position on a seek).
    positioned: HashMap<(String, i32), i64>,
    started: Instant,
}

impl OrderedInputs {
    /// Ordering for tasks reading `topics`, or `None` when a task reads one topic (nothing to
    /// order).
    pub(crate) fn for_topics(topics: Vec<String>) -> Option<Self> {
        (topics.len() > 1).then(|| OrderedInputs {
            topics,
            queues: BTreeMap::new(),
            positioned: HashMap::new(),
            started: Instant::now(),
        })
    }

    /// Buffers `m` if it is a task's input; otherwise hands it back.
    pub(crate) fn push<'m>(&mut self, m: BorrowedMessage<'m>) -> Option<BorrowedMessage<'m>> {
        let Some(input) = self.topics.iter().position(|t| t == m.topic()) else {
            return Some(m);
        };
        let timestamp = m.timestamp().to_millis().unwrap_or(i64::MIN);
        let inputs = self.topics.len();
        self.queues
            .entry(m.partition())
            .or_insert_with(|| TaskQueue::new(inputs, MAX_TASK_IDLE.as_millis() as u64))
            .push(input, timestamp, m.detach());
        metrics::gauge!("exactly_stream_buffered_records").set(self.len() as f64);
        None
    }

    /// The next record a task may process now, if any.
    pub(crate) fn take<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>) -> Option<OwnedMessage> {
        let now = self.started.elapsed().as_millis() as u64;
        let OrderedInputs {
            topics,
            queues,
            positioned,
            ..
        } = self;
        for (partition, queue) in queues.iter_mut() {
            let before = queue.enforced();
            let next = queue.next(now, |input| {
                lag(consumer, positioned, topics[input].as_str(), *partition)
            });
            if queue.enforced() > before {
                metrics::counter!("exactly_stream_task_idle_enforced_total").increment(1);
                tracing::debug!(
                    "partition {partition}: went on after waiting {MAX_TASK_IDLE:?} for a partition behind"
                );
            }
            if let Next::Take { record, .. } = next {
                return Some(record);
            }
        }
        None
    }

    /// `topic`/`partition` was put at `offset`.
    pub(crate) fn positioned(&mut self, topic: &str, partition: i32, offset: i64) {
        self.positioned.insert((topic.to_owned(), partition), offset);
    }

    /// Drops every buffered record: the consumer was put back where the tasks' state is.
    pub(crate) fn clear(&mut self) {
        for queue in self.queues.values_mut() {
            queue.clear();
        }
        metrics::gauge!("exactly_stream_buffered_records").set(0.0);
    }

    fn len(&self) -> usize {
        self.queues.values().map(TaskQueue::len).sum()
    }
}

/// Whether `topic`/`partition`, which has nothing buffered, may hold records not fetched yet:
/// its position (or where it was last put, before a record of it was handed over) against the
/// end its last fetch response reported (no round trip). Before a fetch response, or with no
/// position known (a partition read from its beginning), it counts as behind unless it is
/// empty.
fn lag<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    positioned: &HashMap<(String, i32), i64>,
    topic: &str,
    partition: i32,
) -> Lag {
    let Some((low, high)) = exactly_kafka::fetched_watermarks(consumer, topic, partition) else {
        return Lag::Behind;
    };
    let position = consumer
        .position()
        .ok()
        .and_then(|list| {
            list.find_partition(topic, partition)
                .and_then(|e| match e.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                })
        })
        .or_else(|| positioned.get(&(topic.to_owned(), partition)).copied());
    match position {
        Some(p) if p >= high => Lag::CaughtUp,
        None if high <= low => Lag::CaughtUp,
        _ => Lag::Behind,
    }
}
