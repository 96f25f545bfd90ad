//! Runs a topology in memory, without a broker (Kafka Streams' `TopologyTestDriver`): records
//! piped into input topics are processed at once, repartitioned records right after, each
//! task (sub-topology × partition) with its own stores. The broker runtime runs the same
//! [`Topology::process`]; this is how a job's results are checked against a reference.

use std::collections::{BTreeMap, VecDeque};

use super::graph::{InputRecord, OutputRecord, Topology};
use super::state::{MemoryState, StateError};

/// A record the driver parked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parked {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Why.
    pub reason: String,
}

/// The partition of a key among `partitions` (FNV-1a; keyless records go to partition 0).
pub fn partition_for(key: Option<&[u8]>, partitions: i32) -> i32 {
    let Some(key) = key else {
        return 0;
    };
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    (hash % partitions.max(1) as u64) as i32
}

struct Queued {
    topic: String,
    partition: i32,
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    headers: Vec<(String, Vec<u8>)>,
    timestamp: i64,
}

/// The in-memory runner.
pub struct TestDriver {
    topology: Topology,
    partitions: i32,
    states: BTreeMap<(usize, i32), MemoryState>,
    offsets: BTreeMap<(String, i32), i64>,
    outputs: Vec<OutputRecord>,
    parked: Vec<Parked>,
    late: u64,
    duplicates: u64,
    latest_event_time: Option<i64>,
}

impl TestDriver {
    /// Records with an event time after `latest` are parked (the broker runtime's wall clock
    /// plus allowed skew, fixed here).
    pub fn with_latest_event_time(mut self, latest: i64) -> Self {
        self.latest_event_time = Some(latest);
        self
    }

    /// Every topic has `partitions` partitions.
    pub fn new(topology: Topology, partitions: i32) -> Self {
        TestDriver {
            topology,
            partitions: partitions.max(1),
            states: BTreeMap::new(),
            offsets: BTreeMap::new(),
            outputs: Vec::new(),
            parked: Vec::new(),
            late: 0,
            duplicates: 0,
            latest_event_time: None,
        }
    }

    /// Pipes one record into `topic` (partitioned by its key) and processes it and everything
    /// it repartitions.
    pub fn pipe(
        &mut self,
        topic: &str,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &[(&str, Option<&[u8]>)],
        timestamp: i64,
    ) -> Result<(), StateError> {
        let partition = partition_for(key, self.partitions);
        self.pipe_to(topic, partition, key, value, headers, timestamp)
    }

    /// Pipes one record into a given partition of `topic`.
    pub fn pipe_to(
        &mut self,
        topic: &str,
        partition: i32,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &[(&str, Option<&[u8]>)],
        timestamp: i64,
    ) -> Result<(), StateError> {
        let mut queue = VecDeque::new();
        self.process(topic, partition, key, value, headers, timestamp, &mut queue)?;
        while let Some(q) = queue.pop_front() {
            let headers: Vec<(&str, Option<&[u8]>)> = q
                .headers
                .iter()
                .map(|(k, v)| (k.as_str(), Some(v.as_slice())))
                .collect();
            self.process(
                &q.topic,
                q.partition,
                q.key.as_deref(),
                q.value.as_deref(),
                &headers,
                q.timestamp,
                &mut queue,
            )?;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn process(
        &mut self,
        topic: &str,
        partition: i32,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &[(&str, Option<&[u8]>)],
        timestamp: i64,
        queue: &mut VecDeque<Queued>,
    ) -> Result<(), StateError> {
        let offset = {
            let next = self.offsets.entry((topic.to_owned(), partition)).or_insert(0);
            *next += 1;
            *next - 1
        };
        let Some(sub) = self.topology.subtopology_of(topic) else {
            self.parked.push(Parked {
                topic: topic.to_owned(),
                partition,
                offset,
                reason: format!("the topology does not read {topic}"),
            });
            return Ok(());
        };
        let state = self.states.entry((sub, partition)).or_default();
        let input = InputRecord {
            topic,
            partition,
            offset,
            key,
            value,
            headers,
            timestamp: Some(timestamp),
            latest_event_time: self.latest_event_time,
        };
        let processed = self.topology.process(&input, state)?;
        self.late += processed.late;
        self.duplicates += processed.duplicates;
        if let Some(reason) = processed.parked {
            self.parked.push(Parked {
                topic: topic.to_owned(),
                partition,
                offset,
                reason,
            });
        }
        for out in processed.outputs {
            if out.internal {
                queue.push_back(Queued {
                    partition: partition_for(out.key.as_deref(), self.partitions),
                    topic: out.topic,
                    key: out.key,
                    value: out.value,
                    headers: out.headers,
                    timestamp: out.timestamp,
                });
            } else {
                self.outputs.push(out);
            }
        }
        Ok(())
    }

    /// Every record sent to `topic`, in order.
    pub fn outputs(&self, topic: &str) -> Vec<&OutputRecord> {
        self.outputs.iter().filter(|o| o.topic == topic).collect()
    }

    /// `topic` as a compacted topic shows it: the last value per key (tombstones removed).
    pub fn latest(&self, topic: &str) -> BTreeMap<Vec<u8>, Vec<u8>> {
        let mut latest = BTreeMap::new();
        for o in self.outputs(topic) {
            let key = o.key.clone().unwrap_or_default();
            match &o.value {
                Some(v) => latest.insert(key, v.clone()),
                None => latest.remove(&key),
            };
        }
        latest
    }

    /// Records parked, in order.
    pub fn parked(&self) -> &[Parked] {
        &self.parked
    }

    /// Late drops so far.
    pub fn late(&self) -> u64 {
        self.late
    }

    /// Repeats skipped so far.
    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }

    /// State entries held, all tasks.
    pub fn state_entries(&self) -> usize {
        self.states.values().map(MemoryState::len).sum()
    }
}
